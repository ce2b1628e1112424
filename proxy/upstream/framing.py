"""HTTP/1.1 framing for the upstream client: the request head serialised, and the answer
parsed over httptools with its head and trailers bounded while they arrive."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING, Final, NamedTuple

import httptools
from yarl import URL

from proxy.upstream.faults import ResponseBroken
from proxy.upstream.response import Response

if TYPE_CHECKING:
    from proxy.upstream.connection import Connection

BODY_METHODS: Final = frozenset({"POST", "PUT", "PATCH"})
DEFAULT_PORTS: Final = {"http": 80, "https": 443}
MAX_LINE: Final = 8 * 1024  # bytes in the status line, one header or one trailer
MAX_HEAD: Final = 64 * 1024  # bytes in an answer's head (1xx heads included) or its trailers
MAX_HEADERS: Final = 128
# Set from the request itself; a caller's own would contradict the framing or the target.
FRAMING: Final = frozenset({"host", "content-length", "transfer-encoding"})

BodyStream = AsyncIterator[bytes]
Origin = tuple[str, str, int]
PoolKey = tuple[str, str, str, int]  # tenant, scheme, lower-cased host, port


class AnswerRefused(Exception):
    """Raised inside a parser callback: the answer breaks a limit or the protocol."""


class AnswerParser:
    """httptools' response parser with the answer's head and trailers bounded while their
    bytes arrive: ``MAX_LINE`` a line, ``MAX_HEAD`` for a head (1xx heads included) or for
    the trailers, counted as the parser is fed, so it never buffers more."""

    __slots__ = (
        "connection",
        "head",
        "response",
        "no_body",
        "keep_alive",
        "received",
        "_parser",
        "_framing",
        "_size",
        "_run",
        "_reason",
        "_headers",
    )

    def __init__(self, connection: Connection):
        self.connection = connection
        self.head: asyncio.Future[Response] | None = None
        self.response: Response | None = None
        self.no_body = False  # the answer to HEAD: headers only, whatever they announce
        self.keep_alive = False  # read at the headers: llhttp resets it once a message ends
        self.received = False  # any byte of an answer since the request was sent
        self._parser = httptools.HttpResponseParser(self)
        self._framing = False  # in a head, or maybe in trailers: bytes the parser buffers
        self._size = 0  # bytes of the current head or trailers
        self._run = 0  # bytes since the last line feed while in a head or trailers
        self._reason = b""
        self._headers: list[tuple[str, str]] = []

    def expect(self, head: asyncio.Future[Response], no_body: bool) -> None:
        """Ready for the answer to a request that is being sent."""
        self.head, self.response, self.no_body = head, None, no_body
        self.keep_alive = self.received = False
        self._framing, self._size, self._run = True, 0, 0

    def feed(self, data: bytes) -> None:
        """Parse ``data``; ResponseBroken when it is not HTTP/1.1 or passes a limit."""
        self.received = True
        try:
            if self._framing:
                self._feed_bounded(data)
            else:
                self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            # An upgrade (101) is refused too: the gateway never asks for one.
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, AnswerRefused):
                raise ResponseBroken(f"Upstream answer refused: {cause}") from exc
            raise ResponseBroken(f"Malformed answer from upstream ({exc!r})") from exc

    def _feed_bounded(self, data: bytes) -> None:
        """Feed at most what the head's budget allows, checking the line being received."""
        while data and self._framing:
            room = MAX_HEAD - self._size
            if room <= 0:
                raise ResponseBroken(f"Upstream answer's head or trailers exceed {MAX_HEAD} bytes")
            piece, data = data[:room], data[room:]
            self._size += len(piece)
            self._parser.feed_data(piece)
            if self._framing:  # all of ``piece`` was head or trailers
                newline = piece.rfind(b"\n")
                self._run = self._run + len(piece) if newline < 0 else len(piece) - newline - 1
                if self._run > MAX_LINE:
                    raise ResponseBroken(f"Upstream answer has a line over {MAX_LINE} bytes")
        if data:
            self._parser.feed_data(data)

    # httptools callbacks

    def on_message_begin(self) -> None:
        if self.response is not None:
            raise AnswerRefused("more than one answer to one request")
        self._reason, self._headers = b"", []

    def on_status(self, reason: bytes) -> None:
        self._reason += reason
        if len(self._reason) > MAX_LINE:
            raise AnswerRefused("status line too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) + len(value) > MAX_LINE:
            raise AnswerRefused("header line too long")
        if self.response is not None:
            return  # a trailer after a chunked body: not forwarded, never kept
        if len(self._headers) >= MAX_HEADERS:
            raise AnswerRefused(f"more than {MAX_HEADERS} headers")
        self._headers.append(
            (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
        )

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if not 100 <= status <= 599:
            raise AnswerRefused(f"status {status} is outside 100-599")
        if status < 200:  # an interim answer (100 Continue): the real one follows
            self._reason, self._headers = b"", []
            return
        self._framing = False
        self.keep_alive = self._parser.should_keep_alive()
        response = Response(self.connection, status, self._reason.decode("latin-1"), self._headers)
        self.response, self._reason, self._headers = response, b"", []
        if self.head is not None and not self.head.done():
            self.head.set_result(response)
        if self.no_body:
            response._finish()

    def on_chunk_header(self) -> None:
        # After the last chunk's size line come the trailers; after any other, its data.
        self._framing, self._size, self._run = True, 0, 0

    def on_chunk_complete(self) -> None:
        self._framing = False

    def on_body(self, body: bytes) -> None:
        self._framing = False
        if self.response is not None and not self.no_body:
            self.response._feed(body)

    def on_message_complete(self) -> None:
        if self.response is not None:  # else a 1xx ended: the next head counts on
            self._framing = False
            self.response._finish()


def origin_of(url: URL) -> Origin:
    """(scheme, lower-cased host, port): hosts differ in case only, origins do not."""
    scheme = url.scheme
    if scheme not in DEFAULT_PORTS or not url.raw_host:
        raise ValueError(f"Unsupported upstream URL scheme or host: {scheme}")
    return scheme, url.raw_host.lower(), url.port or DEFAULT_PORTS[scheme]


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
