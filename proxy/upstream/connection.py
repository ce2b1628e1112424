"""One keep-alive connection to nxlink: the request written, the answer parsed, reusable or not."""

from __future__ import annotations

import asyncio
import socket
from typing import TYPE_CHECKING, cast

import httptools

from proxy.upstream.framing import (
    MAX_FIELD,
    MAX_HEADERS,
    BodyStream,
    ConnectFailed,
    Head,
    Origin,
    ResponseBroken,
    ResponseTooLarge,
    UnexpectedAnswer,
)
from proxy.upstream.response import Response

if TYPE_CHECKING:
    from proxy.upstream.pool import Pool


class Connection(asyncio.Protocol):
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
