"""The gateway's one exception tree and its JSON envelope.

GatewayError                      any failure answered with an envelope
├── AuthError                     the client's API key (401/403)
│   ├── MissingApiKey             401 MISSING_API_KEY
│   ├── InvalidApiKey             403 INVALID_API_KEY
│   └── ApiKeyExpired             403 API_KEY_EXPIRED
├── RequestError                  the client's request (400 and kin)
│   ├── NotFound                  404 NOT_FOUND
│   ├── MethodNotAllowed          405 METHOD_NOT_ALLOWED
│   ├── IdempotencyInProgress     409 IDEMPOTENCY_IN_PROGRESS
│   ├── IdempotencyKeyReused      422 IDEMPOTENCY_KEY_REUSED
│   ├── PayloadTooLarge           413 PAYLOAD_TOO_LARGE
│   └── TooManyRequests           429 RATE_LIMITED / TENANT_BUSY / QUOTA_EXCEEDED
├── ConfigIncomplete              500 OPENAPI_CONFIG_INCOMPLETE
├── InternalError                 500 INTERNAL_ERROR
├── NotReady                      503 NOT_READY
├── StateUnreachable              503 STATE_UNAVAILABLE
└── UpstreamError                 nxlink could not be reached (502/504)
    ├── UpstreamUnavailable       502 UPSTREAM_UNAVAILABLE
    └── UpstreamTimeout           504 UPSTREAM_TIMEOUT
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

from aiohttp import web


class GatewayError(Exception):
    """A failure the gateway answers with ``{"code", "message", "error", ...}``."""

    status: int = 500
    error: ClassVar[str] = "INTERNAL_ERROR"
    default_message: ClassVar[str] = "Internal server error"

    def __init__(
        self,
        message: str | None = None,
        *,
        error: str | None = None,
        status: int | None = None,
        retry_after: int | None = None,
        **extra: Any,
    ):
        self.message = message or self.default_message
        self.code = error or self.error
        self.status = status or type(self).status
        self.retry_after = None if retry_after is None else max(1, retry_after)
        self.extra = extra
        super().__init__(self.message)

    def headers(self) -> dict[str, str]:
        """Extra response headers this error calls for (``Retry-After`` when it has one)."""
        return {} if self.retry_after is None else {"Retry-After": str(self.retry_after)}

    def envelope(self) -> dict[str, Any]:
        """The JSON body: status as ``code``, then message, error code and extra fields."""
        return {"code": self.status, "message": self.message, "error": self.code, **self.extra}

    def body(self) -> bytes:
        """The envelope encoded as UTF-8 JSON (non-ASCII kept readable)."""
        # A wrong key echoed masked may hold undecodable header bytes: keep them as escapes.
        return json.dumps(self.envelope(), ensure_ascii=False).encode("utf-8", "backslashreplace")

    def response(self) -> web.Response:
        """The envelope as a JSON response with this error's status and headers."""
        return web.Response(
            body=self.body(),
            status=self.status,
            content_type="application/json",
            charset="utf-8",
            headers=self.headers(),
        )


class AuthError(GatewayError):
    """The client's API key is missing, unknown or expired."""

    status = 401


class MissingApiKey(AuthError):
    """No API key in ``x-api-key`` or ``Authorization: Bearer``."""

    error = "MISSING_API_KEY"
    default_message = "API key is required. Send it as x-api-key or Authorization: Bearer <key>"


class InvalidApiKey(AuthError):
    """The API key matches no tenant."""

    status = 403
    error = "INVALID_API_KEY"
    default_message = "Invalid API key"


class ApiKeyExpired(AuthError):
    """The API key is known but past its ``notAfter``."""

    status = 403
    error = "API_KEY_EXPIRED"
    default_message = "API key has expired; ask the gateway operator for the new key"


class RequestError(GatewayError):
    """The client's request cannot be served as sent."""

    status = 400
    error = "BAD_REQUEST"
    default_message = "Bad request"


class NotFound(RequestError):
    """No route, or a path that would leave the tenant's base URL."""

    status = 404
    error = "NOT_FOUND"
    default_message = "Not found"


class MethodNotAllowed(RequestError):
    """The route exists but not for this method."""

    status = 405
    error = "METHOD_NOT_ALLOWED"
    default_message = "Method not allowed"

    def __init__(self, message: str | None = None, *, allowed: str = "", **kw: Any):
        super().__init__(message, **kw)
        self.allowed = allowed

    def headers(self) -> dict[str, str]:
        # RFC 9110 section 15.5.6: a 405 lists the methods the resource supports.
        return {"Allow": self.allowed} if self.allowed else {}


class IdempotencyInProgress(RequestError):
    """The first request with this ``Idempotency-Key`` still runs; carries ``Retry-After``."""

    status = 409
    error = "IDEMPOTENCY_IN_PROGRESS"
    default_message = "A request with this Idempotency-Key is still being processed; retry later"


class IdempotencyKeyReused(RequestError):
    """An ``Idempotency-Key`` was sent again with a different body."""

    status = 422
    error = "IDEMPOTENCY_KEY_REUSED"
    default_message = "Idempotency-Key was already used with a different request body"


class PayloadTooLarge(RequestError):
    """The body is larger than the configured bound."""

    status = 413
    error = "PAYLOAD_TOO_LARGE"
    default_message = "Request body too large"


class TooManyRequests(RequestError):
    """A per-tenant limit refused the request; carries ``Retry-After``."""

    status = 429
    error = "RATE_LIMITED"
    default_message = "Rate limit exceeded"

    def __init__(self, message: str | None = None, *, retry_after: int = 1, **kw: Any):
        super().__init__(message, retry_after=retry_after, **kw)


class ConfigIncomplete(GatewayError):
    """The tenant has no nxlink accessKey/accessSecret configured."""

    error = "OPENAPI_CONFIG_INCOMPLETE"
    default_message = "OpenAPI credentials are not configured for this API key"


class InternalError(GatewayError):
    """An unexpected failure; the client gets no detail."""


class NotReady(GatewayError):
    """The gateway is starting or draining."""

    status = 503
    error = "NOT_READY"
    default_message = "Service not ready"


class StateUnreachable(GatewayError):
    """The state backend is down and the request cannot go on without it (Idempotency-Key)."""

    status = 503
    error = "STATE_UNAVAILABLE"
    default_message = (
        "The shared state backend is unavailable; retry with the same Idempotency-Key later"
    )


class UpstreamError(GatewayError):
    """nxlink could not be reached or did not answer in time; ``sent`` when the request had
    been written to it (nxlink may have acted on it: not safe to send again)."""

    status = 502
    error = "UPSTREAM_ERROR"
    default_message = "Upstream error"

    def __init__(self, message: str | None = None, *, sent: bool = False, **kw: Any):
        super().__init__(message, **kw)
        self.sent = sent


class UpstreamUnavailable(UpstreamError):
    """Connecting to nxlink failed, or the connection broke before an answer."""

    error = "UPSTREAM_UNAVAILABLE"
    default_message = "Upstream service unavailable"


class UpstreamTimeout(UpstreamError):
    """nxlink did not send response headers within ``UPSTREAM_TIMEOUT``."""

    status = 504
    error = "UPSTREAM_TIMEOUT"
    default_message = "Upstream service timed out"
