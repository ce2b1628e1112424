"""The gateway's error codes by status, and the answers built from them."""

from __future__ import annotations

from typing import Final

from proxy.apidoc.components import JSON, ref

# error code → (status, when): the README's error table, and SPEC's.
ERROR_CODES: Final[dict[str, tuple[int, str]]] = {
    "BAD_REQUEST": (400, "a request aiohttp could not read"),
    "INVALID_JSON": (400, "the body is not a JSON document (or not an object)"),
    "INVALID_ENCODING": (400, "the body is not UTF-8"),
    "INVALID_FIELD": (400, "a field of the wrong type"),
    "MISSING_TASK_ID": (400, "append-numbers without `taskId`"),
    "INVALID_PHONE_NUMBERS": (400, "`phoneNumbers` is not a non-empty array"),
    "UNKNOWN_ACTION": (400, "no action known for the path and no `action` header"),
    "INVALID_ACTION": (400, "a malformed `action` header"),
    "INVALID_PATH": (400, "a path with dot, empty or encoded-slash segments"),
    "INVALID_IDEMPOTENCY_KEY": (400, "an `Idempotency-Key` longer than 255 characters"),
    "INCOMPLETE_BODY": (400, "the body was cut off before its end"),
    "INVALID_DAYS": (400, "usage `days` that is not a whole number from 1 to 90"),
    "MISSING_API_KEY": (401, "no API key given"),
    "INVALID_API_KEY": (
        403,
        "unknown key (echoed masked, with `availableKeys` unless the public key directory is off)",
    ),
    "API_KEY_EXPIRED": (403, "a key past its `notAfter` (`apiKeyAlias` added)"),
    "NOT_FOUND": (
        404,
        "no such route, a directory switched off, or a path that would not "
        "stay under the tenant's base URL",
    ),
    "METHOD_NOT_ALLOWED": (405, "the path exists, not for this method (`Allow` lists them)"),
    "BODY_TIMEOUT": (408, "the body did not arrive within `UPSTREAM_TIMEOUT`"),
    "IDEMPOTENCY_IN_PROGRESS": (409, "the first request with this key still runs"),
    "PAYLOAD_TOO_LARGE": (413, "body or upload larger than the configured bound"),
    "TOO_MANY_NUMBERS": (413, "more than `APPEND_MAX_NUMBERS` numbers"),
    "IDEMPOTENCY_KEY_REUSED": (422, "an `Idempotency-Key` repeated with another body"),
    "RATE_LIMITED": (429, "the tenant's rate limit"),
    "TENANT_BUSY": (429, "the tenant's in-flight limit"),
    "QUOTA_EXCEEDED": (429, "a quota is used up (`quota` added)"),
    "OPENAPI_CONFIG_INCOMPLETE": (
        500,
        "the tenant has no nxlink accessKey/accessSecret (`apiKeyAlias` added)",
    ),
    "INTERNAL_ERROR": (500, "an unexpected failure (logged with the request id, no detail)"),
    "UPSTREAM_UNAVAILABLE": (502, "nxlink could not be reached"),
    "UPSTREAM_ERROR": (502, "nxlink's answer was broken"),
    "NOT_READY": (503, "configuration not loaded yet, or draining for shutdown"),
    "STATE_UNAVAILABLE": (
        503,
        "an Idempotency-Key request, or a usage read, while the state backend is unreachable",
    ),
    "UPSTREAM_TIMEOUT": (504, "no answer head from nxlink within `UPSTREAM_TIMEOUT`"),
}
# The first release answered a reused key with 409: clients may still see either.
EXTRA_CODES: Final = {409: ("IDEMPOTENCY_KEY_REUSED",)}
NAMES: Final = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    408: "RequestTimeout",
    409: "Conflict",
    413: "ContentTooLarge",
    422: "UnprocessableContent",
    429: "TooManyRequests",
    500: "InternalServerError",
    502: "BadGateway",
    503: "ServiceUnavailable",
    504: "GatewayTimeout",
}
# Response header → its component, by status (a 409 has Retry-After only while a run is going).
HEADERS_BY_STATUS: Final = {
    405: {"Allow": "Allow"},
    409: {"Retry-After": "RetryAfterWhileRunning"},
    429: {"Retry-After": "Retry-After"},
}


def codes_of(status: int) -> list[str]:
    """The error codes answered with ``status``."""
    own = [code for code, (given, _) in ERROR_CODES.items() if given == status]
    return own + list(EXTRA_CODES.get(status, ()))


def error_schema(status: int) -> JSON:
    """The envelope of an error answered with ``status``: its code and its ``error`` values."""
    narrowed = {"properties": {"code": {"const": status}, "error": {"enum": codes_of(status)}}}
    return {"allOf": [ref("schemas", "Error"), narrowed]}


def _description(status: int) -> str:
    lines = [f"`{code}`: {ERROR_CODES[code][1]}" for code in codes_of(status)]
    return "\n".join(f"* {line}" for line in lines)


def headers(*names: str, always: tuple[str, ...] = ("X-Request-Id",)) -> JSON:
    """Response headers by their component names."""
    return {name: ref("headers", name) for name in (*always, *names)}


def _error_headers(status: int) -> JSON:
    extra = {name: ref("headers", part) for name, part in HEADERS_BY_STATUS.get(status, {}).items()}
    return headers() | extra


def error_response(status: int) -> JSON:
    """The gateway's own error answer with ``status``."""
    return {
        "description": _description(status),
        "headers": _error_headers(status),
        "content": {"application/json": {"schema": ref("schemas", f"{NAMES[status]}Error")}},
    }


def forward_error(status: int) -> JSON:
    """A forwarded request's answer with ``status``: the gateway's error, or nxlink's own."""
    either = {"anyOf": [ref("schemas", f"{NAMES[status]}Error"), ref("schemas", "NxlinkAnswer")]}
    return {
        "description": f"{_description(status)}\n\nor nxlink's own answer with this status, "
        "passed through as it came",
        "headers": _error_headers(status),
        "content": {"application/json": {"schema": either}, "*/*": {"schema": {}}},
    }


def answer(description: str, schema: JSON, *names: str) -> JSON:
    """A JSON answer that is not an error."""
    return {
        "description": description,
        "headers": headers(*names),
        "content": {"application/json": {"schema": schema}},
    }


def error_schemas() -> JSON:
    """One schema component per error status."""
    return {f"{name}Error": error_schema(status) for status, name in NAMES.items()}


def error_responses() -> JSON:
    """One response component per error status."""
    return {name: error_response(status) for status, name in NAMES.items()}
