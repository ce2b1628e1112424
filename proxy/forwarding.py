"""The ``/openapi/`` handler: action, confined URL, header policy, body in, answer streamed back."""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Final
from urllib.parse import unquote

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.appkeys import (
    ACTIONS,
    SETTINGS,
    UPSTREAM,
    context,
    credentials_of,
    current_tenant,
)
from proxy.errors import NotFound, PayloadTooLarge, RequestError
from proxy.nxlink import KNOWN_ACTIONS
from proxy.upstream import LARGE_BODY, Response, StreamFactory, UpstreamRequest

logger = logging.getLogger(__name__)

HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
CLIENT_CREDENTIALS: Final = frozenset(
    {
        "x-api-key",
        "authorization",
        "cookie",
        "accesskey",
        "accesssecret",
        "ts",
        "sign",
        "biztype",
        "algorithm",
        "action",
    }
)
FORWARDED: Final = frozenset({"forwarded", "x-real-ip"})
FORWARDED_PREFIX: Final = "x-forwarded-"
# Set by the gateway itself (Host: the upstream's; lengths: recomputed for signed bodies).
# Content-Encoding: aiohttp's server already decoded the body, so the forwarded bytes are plain.
GATEWAY_SET: Final = frozenset(
    {"host", "content-length", "content-encoding", "expect", "x-request-id"}
)
REQUEST_DROP: Final = HOP_BY_HOP | CLIENT_CREDENTIALS | FORWARDED | GATEWAY_SET
RESPONSE_DROP: Final = HOP_BY_HOP | frozenset({"set-cookie", "x-request-id"})
ACTION_NAME: Final = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")
MULTIPART: Final = "multipart/form-data"
READ_CHUNK: Final = 256 * 1024
MAX_DECODES: Final = 3


def action_table(extra: tuple[tuple[str, str], ...]) -> dict[str, str]:
    """The path → action table: the known operations plus ``OPENAPI_ACTIONS``."""
    return {**KNOWN_ACTIONS, **dict(extra)}


def resolve_action(headers: Mapping[str, str], path: str, table: Mapping[str, str]) -> str:
    """The client's ``action`` header if given, else the table's entry for ``path``."""
    given = headers.get("action", "").strip()
    if given:
        if not ACTION_NAME.fullmatch(given):
            raise RequestError(
                "action header must be a plain operation name such as callAppend",
                error="INVALID_ACTION",
            )
        return given
    action = table.get(path.rstrip("/"))
    if action is None:
        raise RequestError(
            f"No known action for {path}; send the nxlink action name in an 'action' header",
            error="UNKNOWN_ACTION",
        )
    return action


def build_upstream_url(base_url: str, raw_path: str, raw_query: str) -> URL:
    """Base URL + normalised request path (+ the query verbatim), never leaving the base."""
    if not raw_query:
        return _build_url(base_url, raw_path)
    return _checked(URL(f"{_build_url(base_url, raw_path)}?{raw_query}", encoded=True), base_url)


@functools.lru_cache(maxsize=1024)
def _build_url(base_url: str, raw_path: str) -> URL:
    """Cached: a tenant calls the same few paths over and over (refusals raise, uncached)."""
    if not raw_path.startswith("/openapi/"):
        raise RequestError("Request target must be a path under /openapi/", error="INVALID_PATH")
    for segment in raw_path.split("/")[1:]:
        decoded = _fully_decoded(segment) if "%" in segment else segment
        # "..;x" is ".." to servlet containers (path parameters), so it counts as a dot segment.
        if (
            decoded is None
            or decoded.split(";", 1)[0] in ("", ".", "..")
            or any(c in decoded for c in "/\\\x00?#")
        ):
            raise RequestError(
                "Path has an empty, dot or encoded-slash segment", error="INVALID_PATH"
            )
    return _checked(URL(base_url + raw_path, encoded=True), base_url)


def _fully_decoded(segment: str) -> str | None:
    """The segment percent-decoded until it stops changing; None past MAX_DECODES rounds.
    A server (or a proxy in front of it) that decodes twice takes ``%252e%252e`` for ``..``."""
    for _ in range(MAX_DECODES):
        decoded = unquote(segment)
        if decoded == segment:
            return segment
        segment = decoded
    return None


def _checked(url: URL, base_url: str) -> URL:
    """Checked again on the built URL: whatever the parts were, it must stay under the base."""
    origin, prefix = _base_parts(base_url)
    if (url.scheme, url.host, url.port) != origin or not url.path.startswith(prefix):
        raise NotFound("Path does not stay under the upstream base URL")
    return url


@functools.lru_cache(maxsize=1024)
def _base_parts(base_url: str) -> tuple[tuple[str, str | None, int | None], str]:
    """A base URL's (scheme, host, port) and the path every upstream URL must start with."""
    base = URL(base_url)
    return (base.scheme, base.host, base.port), base.path.rstrip("/") + "/openapi/"


def filter_request_headers(
    headers: CIMultiDictProxy[str], *, streamed: bool
) -> list[tuple[str, str]]:
    """End-to-end client headers minus credentials, forwarding and hop-by-hop ones."""
    dropped = REQUEST_DROP | _connection_tokens(headers.getall("Connection", ()))
    kept = [
        (name, value)
        for name, value in headers.items()
        if (lower := name.lower()) not in dropped and not lower.startswith(FORWARDED_PREFIX)
    ]
    if streamed and "Content-Length" in headers and "Content-Encoding" not in headers:
        kept.append(("Content-Length", headers["Content-Length"]))
    return kept


def filter_response_headers(headers: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Upstream response headers minus hop-by-hop ones and cookies."""
    listed = [value for name, value in headers if name.lower() == "connection"]
    dropped = RESPONSE_DROP | _connection_tokens(listed)
    return [(name, value) for name, value in headers if name.lower() not in dropped]


def _connection_tokens(values: Iterable[str]) -> frozenset[str]:
    """Header names listed in ``Connection`` (hop-by-hop by declaration)."""
    tokens = ",".join(values)
    if not tokens:
        return frozenset()
    return frozenset(t.strip().lower() for t in tokens.split(",") if t.strip())


def is_multipart(request: web.Request) -> bool:
    """True for multipart/form-data bodies, which are streamed and left out of the signature."""
    return request.content_type == MULTIPART


async def read_body(request: web.Request, limit: int, timeout: float) -> bytes:
    """The exact body bytes, at most ``limit`` of them within ``timeout``, checked to be UTF-8."""
    length = request.content_length
    if length is not None and length > limit:
        raise PayloadTooLarge(f"Request body exceeds {limit} bytes")
    content = request.content
    try:
        if content.is_eof():  # the whole body came with the head (most calls): no waiting
            body = content.read_nowait()
            if len(body) > limit:
                raise PayloadTooLarge(f"Request body exceeds {limit} bytes")
        else:
            async with asyncio.timeout(timeout):
                body = await _read_all(request, limit)
    except TimeoutError as exc:
        raise RequestError(
            f"Request body not received within {timeout:g}s", error="BODY_TIMEOUT", status=408
        ) from exc
    except (ConnectionError, aiohttp.ClientPayloadError) as exc:
        raise RequestError("Request body was cut off", error="INCOMPLETE_BODY") from exc
    try:
        if len(body) > LARGE_BODY:  # a 10 MiB check takes ~10 ms: not on the event loop
            await asyncio.to_thread(body.decode, "utf-8")
        else:
            body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(
            f"Request body is not valid UTF-8 (byte {exc.start})", error="INVALID_ENCODING"
        ) from exc
    return body


async def _read_all(request: web.Request, limit: int) -> bytes:
    chunks, size = [], 0
    async for chunk in request.content.iter_chunked(READ_CHUNK):
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"Request body exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def stream_body(request: web.Request, limit: int) -> StreamFactory:
    """A factory of one pass over the client's body, refusing more than ``limit`` bytes."""
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"Upload exceeds {limit} bytes")

    async def chunks() -> AsyncIterator[bytes]:
        size = 0
        try:
            async for chunk in request.content.iter_any():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"Upload exceeds {limit} bytes")
                yield chunk
        except (ConnectionError, aiohttp.ClientPayloadError) as exc:
            raise RequestError("Request body was cut off", error="INCOMPLETE_BODY") from exc

    return chunks


async def handle_forward(request: web.Request) -> web.StreamResponse:
    """Sign the request for the caller's tenant and stream it to nxlink and back."""
    started = time.perf_counter()
    app, ctx = request.app, context(request)
    tenant = current_tenant(request)
    credentials = credentials_of(tenant)
    settings = app[SETTINGS]
    # The path first: one that tries to leave the base URL is INVALID_PATH, whatever its action.
    url = build_upstream_url(
        tenant.base_url, request.raw_path.partition("?")[0], request.rel_url.raw_query_string
    )
    action = ctx.action = resolve_action(request.headers, request.path, app[ACTIONS])
    streamed = is_multipart(request)
    headers = filter_request_headers(request.headers, streamed=streamed)
    headers.append(("X-Request-Id", ctx.request_id))
    body, stream = None, None
    if streamed:
        stream = stream_body(request, settings.max_upload_bytes)
    elif request.body_exists:
        body = await read_body(request, settings.max_body_bytes, settings.upstream_timeout)
    upstream = UpstreamRequest(
        request.method, url, headers, action, credentials, body, stream, tenant.alias, tenant.id
    )
    sent = time.perf_counter()
    async with app[UPSTREAM].open(upstream) as answer:
        timing = _server_timing(started, sent, time.perf_counter())
        return await stream_back(request, answer, timing)


def _server_timing(started: float, sent: float, answered: float) -> str:
    gateway_ms = (sent - started) * 1000
    upstream_ms = (answered - sent) * 1000
    return f"gateway;dur={gateway_ms:.2f}, upstream;dur={upstream_ms:.2f}"


async def stream_back(request: web.Request, answer: Response, timing: str) -> web.StreamResponse:
    """Copy the upstream status, end-to-end headers and body to the client as it arrives."""
    headers = CIMultiDict(filter_response_headers(answer.raw_headers))
    ctx = context(request)
    headers["X-Request-Id"] = ctx.request_id
    headers["Server-Timing"] = timing
    if ctx.limits is not None:
        headers.extend(ctx.limits.headers())
    ctx.upstream_status = answer.status
    body = answer.body_if_complete()
    if body is not None and request.method != "HEAD":
        # The whole answer is here already (most nxlink answers): one write, one response.
        # Prepared here, inside the error boundary, as the streamed answer is below.
        complete = web.Response(
            status=answer.status, reason=answer.reason, body=body, headers=headers
        )
        await complete.prepare(request)
        ctx.response_started = True
        return complete
    response = web.StreamResponse(status=answer.status, reason=answer.reason, headers=headers)
    await response.prepare(request)
    ctx.response_started = True
    ctx.body_sent = 0
    try:
        async for chunk in answer.iter_chunks():
            await response.write(chunk)
            ctx.body_sent += len(chunk)
    except ConnectionError as exc:
        # Headers are gone already: no envelope is possible, so the connection is dropped.
        # One line, not aiohttp's traceback: a hostile upstream must not flood the logs.
        logger.warning("response stream cut after %d bytes: %s", ctx.body_sent, exc)
        drop_connection(request)
        return response
    await response.write_eof()
    return response


def drop_connection(request: web.Request) -> None:
    """Close the client's connection mid-answer: it sees a cut, never a clean end (aiohttp's
    closing ``write_eof`` then fails quietly)."""
    if request.transport is not None:
        request.transport.close()
