"""The admin listener's middleware: request id → security headers → errors → token."""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from proxy.appkeys import CONTEXT, RequestContext
from proxy.errors import AuthError, GatewayError, InternalError, NotFound, RequestError
from proxy.logs import request_id_var

logger = logging.getLogger(__name__)

API_PREFIX: Final = "/admin/api/"
REQUEST_ID_HEADER: Final = "X-Request-Id"
# The console loads only its own files; nothing may frame it, nothing is cached or referred.
SECURITY_HEADERS: Final = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@web.middleware
async def request_id_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A fresh id per admin request (a client's own id is not taken: audit entries cite it)."""
    request_id = secrets.token_hex(16)
    request[CONTEXT] = RequestContext(request_id, time.perf_counter())
    token = request_id_var.set(request_id)
    try:
        response = await handler(request)
    finally:
        request_id_var.reset(token)
    response.headers[REQUEST_ID_HEADER] = request_id
    return response


@web.middleware
async def headers_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The security headers, on every answer the admin listener gives."""
    response = await handler(request)
    response.headers.update(SECURITY_HEADERS)
    return response


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Failures as the gateway's JSON envelope; anything unexpected as a bare 500."""
    try:
        return await handler(request)
    except GatewayError as exc:
        return render_error(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        cls = NotFound if exc.status == 404 else RequestError
        return render_error(cls(exc.reason, status=exc.status, error=_http_code(exc.status)))
    except Exception:
        logger.exception("unhandled admin error on %s %s", request.method, request.path)
        return render_error(InternalError())


def _http_code(status: int) -> str:
    return {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED", 413: "PAYLOAD_TOO_LARGE"}.get(
        status, "BAD_REQUEST"
    )


def render_error(exc: GatewayError) -> web.Response:
    """The envelope response for ``exc``."""
    if exc.status >= 500:
        logger.warning("admin request failed: %s %s", exc.code, exc.message)
    return exc.response()


def token_middleware(*, digest: bytes | None) -> Middleware:
    """``Authorization: Bearer <admin token>`` on every ``/admin/api/`` path, compared as
    SHA-256 digests in constant time; the console's page and files need none.

    By path prefix rather than route name: without the token, an unknown API path answers
    like a known one, so the routes tell nothing."""

    @web.middleware
    async def token(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith(API_PREFIX):
            return await handler(request)
        scheme, _, given = request.headers.get("Authorization", "").strip().partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise AuthError(
                "Admin token required: send Authorization: Bearer <ADMIN_TOKEN>",
                error="MISSING_ADMIN_TOKEN",
            )
        presented = hashlib.sha256(given.strip().encode("utf-8", "surrogatepass")).digest()
        if digest is None or not hmac.compare_digest(presented, digest):
            raise AuthError("Invalid admin token", error="INVALID_ADMIN_TOKEN", status=403)
        return await handler(request)

    return token
