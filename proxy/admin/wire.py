"""JSON in and out of the admin API: bounded bodies, query numbers, the answer envelope."""

from __future__ import annotations

import json
from typing import Any, Final

from aiohttp import web

from proxy.errors import PayloadTooLarge, RequestError

MAX_BODY: Final = 64 * 1024


async def read_json(request: web.Request, *, optional: bool = False) -> Any:
    """The request's JSON body: 413 past 64 KiB, 415 unless ``application/json``, 400 if broken.
    ``optional``: an empty body reads as ``{}``."""
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise PayloadTooLarge(f"Request body over {MAX_BODY} bytes")
    if optional and not request.body_exists:
        return {}
    if request.content_type != "application/json":
        raise RequestError(
            "Send the body as JSON with Content-Type: application/json",
            error="UNSUPPORTED_MEDIA_TYPE",
            status=415,
        )
    try:
        raw = await request.read()  # the app's client_max_size stops a longer chunked body
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"Request body over {MAX_BODY} bytes") from None
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise RequestError(f"The body is not valid JSON: {exc}", error="INVALID_JSON") from None


def int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    """A whole-number query parameter within ``low..high``, or 400 naming it."""
    raw = request.query.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or not low <= int(raw) <= high:
        problem = f"{name}: must be a whole number from {low} to {high}"
        raise RequestError(problem, error="INVALID_REQUEST", errors=[problem])
    return int(raw)


def envelope(
    status: int, message: str, data: dict[str, Any], *, etag: str | None = None
) -> web.Response:
    """``{"code", "message", "data"}`` with ``ETag`` when the answer has a version."""
    body = json.dumps({"code": status, "message": message, "data": data}, ensure_ascii=False)
    response = web.Response(
        text=body, status=status, content_type="application/json", charset="utf-8"
    )
    if etag is not None:
        response.headers["ETag"] = etag
    return response
