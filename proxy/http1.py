"""The upstream HTTP/1.1 client: pooled keep-alive connections, httptools parsing, both bodies
streamed with flow control.

aiohttp's ClientSession spends most of a forward on per-request machinery the gateway does not
use (cookies, redirects, tracing, decompression, auto headers); measured under ``make bench`` it
was the largest single cost. This client keeps only what a signed forward needs.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Final, NamedTuple, cast

import aiohappyeyeballs
import httptools
from multidict import CIMultiDict
from yarl import URL

HIGH_WATER: Final = 512 * 1024  # response bytes buffered before reading from nxlink pauses
LOW_WATER: Final = 128 * 1024
KEEPALIVE: Final = 15.0  # idle seconds a pooled connection is kept (servers allow 60-75)
BODY_METHODS: Final = frozenset({"POST", "PUT", "PATCH"})
DEFAULT_PORTS: Final = {"http": 80, "https": 443}
MAX_FIELD: Final = 8190  # bytes in the status line or one header (aiohttp's client limits)
MAX_HEADERS: Final = 128
HAPPY_EYEBALLS_DELAY: Final = 0.25  # seconds before trying a host's next address in parallel
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


class Response:
    """One upstream answer: status and headers first, then the body as it arrives."""

    __slots__ = (
        "status",
        "reason",
        "raw_headers",
        "_headers",
        "_connection",
        "_chunks",
        "_buffered",
        "_waiter",
        "_complete",
        "_error",
        "_released",
    )

    def __init__(
        self, connection: _Connection, status: int, reason: str, headers: list[tuple[str, str]]
    ):
        self.status = status
        self.reason = reason
        self.raw_headers = headers  # as received, in order
        self._headers: CIMultiDict[str] | None = None
        self._connection = connection
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._complete = False
        self._error: BaseException | None = None
        self._released = False

    @property
    def headers(self) -> CIMultiDict[str]:
        """The headers as a case-insensitive multidict (built on first use)."""
        if self._headers is None:
            self._headers = CIMultiDict(self.raw_headers)
        return self._headers

    @property
    def complete(self) -> bool:
        """True once the whole body has arrived."""
        return self._complete

    def body_if_complete(self) -> bytes | None:
        """The whole body when it has already arrived (small answers), else None."""
        if not self._complete:
            return None
        body = b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        return body

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """The body in the pieces it arrives in; ConnectionError if it is cut short."""
        while True:
            if self._chunks:
                chunk = self._chunks.popleft()
                self._buffered -= len(chunk)
                if self._buffered <= LOW_WATER:
                    self._connection.resume_reading()
                yield chunk
            elif self._error is not None:
                raise self._error
            elif self._complete:
                return
            else:
                self._waiter = asyncio.get_running_loop().create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None

    async def read(self) -> bytes:
        """The whole body."""
        return b"".join([chunk async for chunk in self.iter_chunks()])

    def release(self) -> None:
        """Hand the connection back to the pool if it is clean, else close it."""
        if not self._released:
            self._released = True
            self._connection.finished(self)

    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > HIGH_WATER:
            self._connection.pause_reading()
        self._wake()

    def _finish(self) -> None:
        self._complete = True
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        if not self._complete and self._error is None:
            self._error = exc
            self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class _Connection(asyncio.Protocol):
    """One keep-alive connection; at most one request on it at a time."""

    def __init__(self, pool: Pool, origin: Origin):
        self.pool = pool
        self.origin = origin
        self.closed = False
        self.idle_since = 0.0
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._reading_paused = False
        self._writing_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._head: asyncio.Future[Response] | None = None
        self._response: Response | None = None
        self._reason = b""
        self._headers: list[tuple[str, str]] = []
        self._no_body = False  # the answer to HEAD: headers only, whatever they announce
        self._keep_alive = False  # read at the headers: llhttp resets it once a message ends
        self._writer: asyncio.Task[None] | None = None

    @property
    def usable(self) -> bool:
        """Open, and not closing (uvloop refuses writes to a closing transport)."""
        return not self.closed and self._transport is not None and not self._transport.is_closing()

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self._head is None:  # bytes with no request waiting (e.g. an unsolicited 408)
            self.close()
            return
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            # An upgrade (101) is refused too: the gateway never asks for one. A callback's
            # ResponseTooLarge reaches here as the HttpParserError's cause.
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, ResponseTooLarge):
                self._broken(ResponseBroken(f"Upstream answer's {cause} exceed the limits"))
            elif isinstance(cause, UnexpectedAnswer):
                self._broken(ResponseBroken("Upstream sent more than one answer"))
            else:
                self._broken(ResponseBroken(f"Malformed answer from upstream ({exc!r})"))

    def eof_received(self) -> bool:
        self.closed = True  # no reuse from now on, before connection_lost gets to run
        return False  # close the transport; connection_lost settles the response

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(ResponseBroken("Upstream closed the connection"))
        response = self._response
        if self._head is not None and not self._head.done():
            self._head.set_exception(ResponseBroken("Upstream closed the connection"))
        elif response is not None and not response.complete:
            if exc is None and self._reads_until_close():
                response._finish()
            else:
                response._fail(ResponseBroken("Upstream closed the connection mid-answer"))

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # httptools callbacks

    def on_message_begin(self) -> None:
        if self._response is not None:
            raise UnexpectedAnswer  # a second answer to one request
        self._reason, self._headers = b"", []

    def on_status(self, reason: bytes) -> None:
        self._reason += reason
        if len(self._reason) > MAX_FIELD:
            raise ResponseTooLarge("status line")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._response is not None:
            return  # a trailer after a chunked body: not forwarded, never kept
        if len(name) + len(value) > MAX_FIELD or len(self._headers) >= MAX_HEADERS:
            raise ResponseTooLarge("headers")
        self._headers.append(
            (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
        )

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:  # an interim answer (100 Continue): the real one follows
            self._reason, self._headers = b"", []
            return
        reason = self._reason.decode("latin-1")
        self._keep_alive = self._parser.should_keep_alive()
        response = Response(self, status, reason, self._headers)
        self._response, self._reason, self._headers = response, b"", []
        if self._head is not None and not self._head.done():
            self._head.set_result(response)
        if self._no_body:
            response._finish()

    def on_body(self, body: bytes) -> None:
        if self._response is not None and not self._no_body:
            self._response._feed(body)

    def on_message_complete(self) -> None:
        if self._response is not None:
            self._response._finish()

    # used by Pool and Response

    async def send(
        self,
        method: str,
        head: Head,
        body: bytes | None,
        stream: BodyStream | None,
        deadline: float | None,
    ) -> Response:
        """Write the request and wait for the answer's status and headers (TimeoutError past
        ``deadline``, in loop time)."""
        assert self._transport is not None
        if not self.usable:
            raise ConnectFailed("Upstream closed the connection before the request was sent")
        loop = asyncio.get_running_loop()
        self._no_body = method == "HEAD"
        self._keep_alive = False
        self._head = loop.create_future()
        self._response = None
        # One timer handle, not asyncio.timeout: a third of the cost on every forward.
        timer = None if deadline is None else loop.call_at(deadline, self._expire)
        try:
            if stream is None:
                self._transport.write(head.data + body if body else head.data)
                return await self._head
            self._transport.write(head.data)
            head_future = self._head
            writer = self._writer = loop.create_task(self._write_stream(stream, head.chunked))
            await asyncio.wait((head_future, writer), return_when=asyncio.FIRST_COMPLETED)
            upstream_failed = head_future.done() and head_future.exception() is not None
            failed = writer.exception() if writer.done() and not writer.cancelled() else None
            if failed is not None and not upstream_failed:
                # The client's body broke or was refused before any answer.
                head_future.cancel()
                self.close()
                raise failed
            return await head_future
        finally:
            if timer is not None:
                timer.cancel()

    def _expire(self) -> None:
        if self._head is not None and not self._head.done():
            self._head.set_exception(TimeoutError("No answer before the deadline"))

    async def _write_stream(self, stream: BodyStream, chunked: bool) -> None:
        assert self._transport is not None
        async for chunk in stream:
            if not chunk:
                continue
            if not self.usable:  # uvloop raises RuntimeError on a write to a closing transport
                raise ResponseBroken("Upstream closed the connection during the upload")
            if chunked:
                self._transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
            else:
                self._transport.write(chunk)
            if self._writing_paused:
                await self._drained()
        if chunked:
            self._transport.write(b"0\r\n\r\n")

    async def _drained(self) -> None:
        if self.closed:
            raise ResponseBroken("Upstream closed the connection")
        self._drain = asyncio.get_running_loop().create_future()
        try:
            await self._drain
        finally:
            self._drain = None

    def pause_reading(self) -> None:
        if not self._reading_paused and self._transport is not None:
            self._reading_paused = True
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self._reading_paused and self._transport is not None:
            self._reading_paused = False
            self._transport.resume_reading()

    def finished(self, response: Response) -> None:
        """The caller is done with ``response``: back to the pool, or closed."""
        clean = (
            self._stop_writer()
            and response.complete
            and not self._no_body
            and not self.closed
            and self._keep_alive
        )
        self._response, self._head = None, None
        self.resume_reading()
        if clean:
            self.pool.put(self)
        else:
            self.close()
        self.pool.release_slot()

    def close(self) -> None:
        self.closed = True
        self._stop_writer()
        if self._transport is not None:
            self._transport.close()

    def _stop_writer(self) -> bool:
        """Stop a body upload still running; True if there was none or it ended well."""
        writer, self._writer = self._writer, None
        if writer is None:
            return True
        if not writer.done():
            writer.cancel()
            return False
        return not writer.cancelled() and writer.exception() is None

    def _broken(self, exc: ResponseBroken) -> None:
        if self._head is not None and not self._head.done():
            self._head.set_exception(exc)
        elif self._response is not None:
            self._response._fail(exc)
        self.close()

    def _reads_until_close(self) -> bool:
        """An answer not framed by chunking or a length ends when the connection does
        (RFC 9112 6.3: a Transfer-Encoding other than chunked outranks Content-Length)."""
        assert self._response is not None
        headers = self._response.headers
        codings = ",".join(headers.getall("Transfer-Encoding", ()))
        if not codings:
            return "Content-Length" not in headers
        return codings.rsplit(",", 1)[-1].strip().lower() != "chunked"


class Pool:
    """Keep-alive connections per origin, at most ``limit`` busy at once."""

    def __init__(
        self,
        *,
        limit: int,
        connect_timeout: float,
        keepalive: float = KEEPALIVE,
        ssl_context: ssl.SSLContext | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.connect_timeout = connect_timeout
        self.keepalive = keepalive
        self._ssl = ssl_context
        self._clock = clock
        self._slots = asyncio.Semaphore(limit)
        self._idle: dict[Origin, list[_Connection]] = {}
        self._open: set[_Connection] = set()
        self._closed = False

    async def request(
        self,
        method: str,
        url: URL,
        headers: Iterable[tuple[str, str]],
        *,
        body: bytes | None = None,
        stream: BodyStream | None = None,
        deadline: float | None = None,
    ) -> Response:
        """Send one request; the caller must ``release()`` the response it gets.

        ``deadline`` (loop time) bounds waiting for a free slot, connecting and the answer's
        headers: past it, TimeoutError. A connect failure before it is ConnectFailed."""
        origin = _origin(url)
        head = _head(method, url, headers, body, stream)
        if self._slots.locked():
            async with asyncio.timeout_at(deadline):
                await self._slots.acquire()
        else:
            await self._slots.acquire()
        try:
            connection = self._idle_connection(origin) or await self._connect(origin, deadline)
            try:
                return await connection.send(method, head, body, stream, deadline)
            except BaseException:
                connection.close()
                raise
        except BaseException:
            self._slots.release()
            raise

    def put(self, connection: _Connection) -> None:
        connection.idle_since = self._clock()
        self._idle.setdefault(connection.origin, []).append(connection)

    def release_slot(self) -> None:
        self._slots.release()

    def forget(self, connection: _Connection) -> None:
        """``connection`` is closed: drop it from the open set and the idle list."""
        self._open.discard(connection)
        idle = self._idle.get(connection.origin)
        if idle and connection in idle:
            idle.remove(connection)

    async def close(self) -> None:
        """Close every connection, idle or not; later connects fail."""
        self._closed = True
        for connection in list(self._open):
            connection.close()
        self._open.clear()
        self._idle.clear()

    def _idle_connection(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        deadline = self._clock() - self.keepalive
        while idle:
            connection = idle.pop()  # the most recent: the least likely to be closed
            if connection.usable and connection.idle_since >= deadline:
                return connection
            connection.close()
        return None

    async def _connect(self, origin: Origin, deadline: float | None) -> _Connection:
        scheme, host, port = origin
        loop = asyncio.get_running_loop()
        tls = None
        if scheme == "https":
            tls = self._ssl or _default_ssl()
        limit = loop.time() + self.connect_timeout
        if deadline is not None and deadline < limit:
            limit = deadline
        try:
            async with asyncio.timeout_at(limit):
                sock = await _open_socket(host, port)
                try:
                    _, connection = await loop.create_connection(
                        lambda: _Connection(self, origin),
                        sock=sock,
                        ssl=tls,
                        server_hostname=host if tls else None,
                    )
                except BaseException:
                    sock.close()
                    raise
        except OSError as exc:  # TimeoutError included: the kernel's or the timer's
            if deadline is not None and loop.time() >= deadline:
                raise TimeoutError("The deadline passed while connecting") from exc
            kind = "timed out" if isinstance(exc, TimeoutError) else exc.__class__.__name__
            raise ConnectFailed(f"Cannot connect to {host}:{port} ({kind})") from exc
        if self._closed:
            connection.close()
            raise ConnectFailed("The connection pool is closed")
        self._open.add(connection)
        return connection


async def _open_socket(host: str, port: int) -> socket.socket:
    """A connected socket to ``host``, its addresses raced the Happy Eyeballs way (RFC 8305),
    as aiohttp's connector does: a blackholed IPv6 route does not cost the whole timeout."""
    loop = asyncio.get_running_loop()
    addresses = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return await aiohappyeyeballs.start_connection(
        addresses, happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY
    )


def _origin(url: URL) -> Origin:
    scheme = url.scheme
    if scheme not in DEFAULT_PORTS or not url.raw_host:
        raise ValueError(f"Unsupported upstream URL scheme or host: {scheme}")
    return scheme, url.raw_host, url.port or DEFAULT_PORTS[scheme]


class Head(NamedTuple):
    """A serialised request head, and whether the body that follows is chunked."""

    data: bytes
    chunked: bool


def _head(
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


_DEFAULT_SSL: ssl.SSLContext | None = None


def _default_ssl() -> ssl.SSLContext:
    global _DEFAULT_SSL  # one context per process: building one loads the CA store
    if _DEFAULT_SSL is None:
        _DEFAULT_SSL = ssl.create_default_context()
    return _DEFAULT_SSL
