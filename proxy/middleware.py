"""The middleware chain: request id → metrics → errors → auth → limits, one concern each."""

from __future__ import annotations

import logging
import random
import re
import time
from datetime import UTC, datetime
from typing import Any, Final

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from proxy.appkeys import (
    CONTEXT,
    LIMITER,
    QUOTAS,
    SETTINGS,
    STATE,
    USAGE,
    RequestContext,
    metrics,
)
from proxy.config import mask_key
from proxy.errors import (
    ApiKeyExpired,
    GatewayError,
    InternalError,
    InvalidApiKey,
    MethodNotAllowed,
    MissingApiKey,
    NotFound,
    PayloadTooLarge,
    RequestError,
    TooManyRequests,
)
from proxy.limits import Admission, TenantPolicy
from proxy.logs import request_id_var
from proxy.ratelimit_headers import RATE_ITEM, learn_quotas, limit_state
from proxy.tenants import Tenant

logger = logging.getLogger(__name__)


REQUEST_ID_HEADER: Final = "X-Request-Id"
SANE_REQUEST_ID: Final = re.compile(r"[A-Za-z0-9._:-]{1,128}")
HTTP_ERRORS: Final[dict[int, type[GatewayError]]] = {
    404: NotFound,
    405: MethodNotAllowed,
    413: PayloadTooLarge,
}


def new_request_id() -> str:
    """32 random hex digits. An id only has to be unique, not secret: Python's PRNG instead of
    a urandom system call on every request."""
    return f"{random.getrandbits(128):032x}"


@web.middleware
async def request_id_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Take a sane client ``X-Request-Id`` or make one; stamp logs and the answer with it."""
    given = request.headers.get(REQUEST_ID_HEADER, "")
    request_id = given if given and SANE_REQUEST_ID.fullmatch(given) else new_request_id()
    request[CONTEXT] = RequestContext(request_id, time.perf_counter())
    token = request_id_var.set(request_id)
    try:
        response = await handler(request)
    finally:
        request_id_var.reset(token)
    if not response.prepared:
        response.headers[REQUEST_ID_HEADER] = request_id
        limits = request[CONTEXT].limits
        if limits is not None:
            response.headers.extend(limits.headers())
    return response


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count every answer by tenant alias, route and status class; track requests in flight."""
    registry = metrics(request)
    registry.in_flight += 1
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    finally:
        registry.in_flight -= 1
        ctx = request[CONTEXT]
        tenant = ctx.tenant
        route = request.match_info.route.name or "unmatched"
        alias = tenant.alias if tenant is not None else ""
        registry.count_request(alias, route, status)
        if tenant is not None:
            request.app[USAGE].count_request(tenant, ctx.action or route, status)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The one place failures become the JSON envelope; nothing renders once a stream began."""
    try:
        return await handler(request)
    except GatewayError as exc:
        if request[CONTEXT].response_started:
            raise
        return render_error(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if isinstance(exc, web.HTTPMethodNotAllowed):
            allowed = ", ".join(sorted(exc.allowed_methods))
            return render_error(MethodNotAllowed(exc.reason, allowed=allowed))
        cls = HTTP_ERRORS.get(exc.status, RequestError)
        return render_error(cls(exc.reason, status=exc.status))
    except Exception:
        if request[CONTEXT].response_started:
            raise
        logger.exception("unhandled error on %s %s", request.method, request.path)
        return render_error(InternalError())


def render_error(exc: GatewayError) -> web.Response:
    """The envelope response for ``exc``; server-side failures are logged."""
    if exc.status >= 500:
        logger.warning("request failed: %s %s", exc.code, exc.message)
    return exc.response()


def presented_key(request: web.Request) -> str:
    """The client's key from ``x-api-key`` or ``Authorization: Bearer``; empty when absent."""
    key = request.headers.get("x-api-key", "").strip()
    if key:
        return key
    scheme, _, token = request.headers.get("Authorization", "").strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def auth_middleware(*, public_routes: frozenset[str]) -> Middleware:
    """Resolve the tenant from the API key on every route not in ``public_routes``."""

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if _is_public(request, public_routes):
            return await handler(request)
        key = presented_key(request)
        if not key:
            raise _rejected(request, MissingApiKey())
        match = request.app[STATE].registry.lookup(key)
        if match is None:
            raise _rejected(request, InvalidApiKey(apiKey=mask_key(key), **_directory(request)))
        if match.key.expired(datetime.now(UTC)):
            expired = ApiKeyExpired(apiKey=mask_key(key), apiKeyAlias=match.tenant.alias)
            raise _rejected(request, expired)
        ctx = request[CONTEXT]
        ctx.tenant, ctx.api_key = match.tenant, key
        return await handler(request)

    return auth


def _is_public(request: web.Request, public_routes: frozenset[str]) -> bool:
    """Named public routes, unmatched paths (404/405) and CORS preflights need no key."""
    if request.match_info.route.name in public_routes:
        return True
    if request.match_info.http_exception is not None:
        return True
    # Preflights carry no credentials by design; only aiohttp-cors answers OPTIONS here.
    return request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers


def _rejected(request: web.Request, exc: GatewayError) -> GatewayError:
    metrics(request).rejected.labels(exc.code).inc()
    return exc


def limits_middleware(*, counted_routes: frozenset[str]) -> Middleware:
    """Per-tenant rate limit, in-flight cap and requests quotas (on ``counted_routes``); public
    routes have no tenant and pass."""

    @web.middleware
    async def limits(request: web.Request, handler: Handler) -> web.StreamResponse:
        tenant = request[CONTEXT].tenant
        if tenant is None or request.app[LIMITER].free(tenant):
            return await handler(request)  # no limit, no quota: no policy, no state call
        counted = request.match_info.route.name in counted_routes
        return await _limited(request, handler, tenant, counted)

    return limits


async def _limited(
    request: web.Request, handler: Handler, tenant: Tenant, counted: bool
) -> web.StreamResponse:
    """The request within the tenant's limits, and its requests quotas when ``counted``."""
    ctx, app = request[CONTEXT], request.app
    try:
        async with app[LIMITER].admit(tenant) as admitted:
            ctx.limits = limit_state(app[QUOTAS], tenant, admitted)
            ctx.slot = None if admitted is None else admitted.slot
            if ctx.limits is not None and counted:
                reserved = await app[QUOTAS].reserve(tenant, "requests", 1)
                learn_quotas(ctx.limits, reserved.statuses)
            return await handler(request)
    except TooManyRequests as exc:
        metrics(request).limited.labels(tenant.alias, exc.code).inc()
        _learn_refusal(request, tenant, exc)
        raise


def _learn_refusal(request: web.Request, tenant: Tenant, exc: TooManyRequests) -> None:
    """The RateLimit headers of a 429: nothing left of the limit that refused."""
    ctx, app = request[CONTEXT], request.app
    if ctx.limits is None:
        admitted = Admission(TenantPolicy.of(tenant, app[SETTINGS]), None)
        ctx.limits = limit_state(app[QUOTAS], tenant, admitted)
    quota = exc.extra.get("quota", {"name": RATE_ITEM, "remaining": 0})
    if ctx.limits is not None and exc.code != "TENANT_BUSY":
        ctx.limits.learn(quota["name"], quota["remaining"], exc.retry_after or 1)


def _directory(request: web.Request) -> dict[str, Any]:
    """``availableKeys`` for a 403, unless the public key directory is off."""
    if not request.app[SETTINGS].public_key_directory:
        return {}
    tenants = request.app[STATE].registry.tenants
    return {"availableKeys": [{"alias": t.alias, "description": t.description} for t in tenants]}
