"""HTTP/1.1 framing for the upstream client: the request head written, the limits an answer's
head must keep, and the errors a broken exchange raises."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from typing import Final, NamedTuple

from yarl import URL

BODY_METHODS: Final = frozenset({"POST", "PUT", "PATCH"})
DEFAULT_PORTS: Final = {"http": 80, "https": 443}
MAX_FIELD: Final = 8190  # bytes in the status line or one header (aiohttp's client limits)
MAX_HEADERS: Final = 128
# Set from the request itself; a caller's own would contradict the framing or the target.
FRAMING: Final = frozenset({"host", "content-length", "transfer-encoding"})

BodyStream = AsyncIterator[bytes]
Origin = tuple[str, str, int]


class ConnectFailed(ConnectionError):
    """No connection could be made: nothing was sent, so the request may be tried again."""


class ResponseBroken(ConnectionError):
    """The connection failed or nxlink sent something that is not HTTP/1.1 after the request
    was (partly) sent."""


class ResponseTooLarge(Exception):
    """Raised inside a parser callback: the answer's status line or headers are too big."""


class UnexpectedAnswer(Exception):
    """Raised inside a parser callback: bytes for a second answer to the same request."""


def origin_of(url: URL) -> Origin:
    scheme = url.scheme
    if scheme not in DEFAULT_PORTS or not url.raw_host:
        raise ValueError(f"Unsupported upstream URL scheme or host: {scheme}")
    return scheme, url.raw_host, url.port or DEFAULT_PORTS[scheme]


class Head(NamedTuple):
    """A serialised request head, and whether the body that follows is chunked."""

    data: bytes
    chunked: bool


def build_head(
    method: str,
    url: URL,
    headers: Iterable[tuple[str, str]],
    body: bytes | None,
    stream: BodyStream | None,
) -> Head:
    """The request line and headers, ``Host`` from the URL and the body's framing added."""
    host = url.raw_host or ""
    if ":" in host:
        host = f"[{host}]"
    if url.port is not None and url.port != DEFAULT_PORTS.get(url.scheme):
        host = f"{host}:{url.port}"
    lines = [f"{method} {url.raw_path_qs} HTTP/1.1", f"Host: {host}"]
    has_length = False
    for name, value in headers:
        if (lower := name.lower()) in FRAMING:
            # A given length is kept only for a stream, which cannot be counted.
            if lower != "content-length" or stream is None:
                continue
            has_length = True
        lines.append(f"{name}: {value}")
    chunked = stream is not None and not has_length
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    elif stream is None and (body or method in BODY_METHODS):
        lines.append(f"Content-Length: {len(body) if body else 0}")
    text = "\r\n".join(lines)
    if text.count("\n") != len(lines) - 1 or text.count("\r") != len(lines) - 1:
        raise ValueError("A request header holds a line break")
    return Head((text + "\r\n\r\n").encode("utf-8", "surrogateescape"), chunked)
