"""One keep-alive connection to nxlink: the request written, the answer parsed, reusable or not."""

from __future__ import annotations

import asyncio
import socket
from typing import TYPE_CHECKING, cast

from proxy.upstream.faults import AnswerTimedOut, ConnectFailed, ResponseBroken, StaleConnection
from proxy.upstream.framing import AnswerParser, BodyStream, Head, PoolKey
from proxy.upstream.response import Response

if TYPE_CHECKING:
    from proxy.upstream.pool import Pool


class Connection(asyncio.Protocol):
    """One keep-alive connection; at most one request on it at a time."""

    def __init__(self, pool: Pool, key: PoolKey):
        self.pool = pool
        self.key = key
        self.read_timeout = pool.read_timeout
        self.closed = False
        self.reused = False  # served a request before: nxlink may have closed it meanwhile
        self.idle_since = 0.0
        self._transport: asyncio.Transport | None = None
        self._parser = AnswerParser(self)
        self._reading_paused = False
        self._writing_paused = False
        self._drain: asyncio.Future[None] | None = None
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
        if self._parser.head is None:  # bytes with no request waiting (e.g. a stray 408)
            self.close()
            return
        try:
            self._parser.feed(data)
        except ResponseBroken as exc:
            self._broken(exc)

    def eof_received(self) -> bool:
        self.closed = True  # no reuse from now on, before connection_lost gets to run
        return False  # close the transport; connection_lost settles the response

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(ResponseBroken("Upstream closed the connection"))
        head, response = self._parser.head, self._parser.response
        if head is not None and not head.done():
            if self.reused and not self._parser.received:
                head.set_exception(StaleConnection("Upstream closed a kept-alive connection"))
            else:
                head.set_exception(ResponseBroken("Upstream closed the connection"))
        elif response is not None and not response.complete:
            if exc is None and self._reads_until_close(response):
                response._finish()
            else:
                response._fail(ResponseBroken("Upstream closed the connection mid-answer"))

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # used by Pool and Response

    async def send(
        self,
        method: str,
        head: Head,
        body: bytes | None,
        stream: BodyStream | None,
        deadline: float | None,
    ) -> Response:
        """Write the request and wait for the answer's status and headers (AnswerTimedOut past
        ``deadline``, in loop time)."""
        assert self._transport is not None
        if not self.usable:
            raise ConnectFailed("Upstream closed the connection before the request was sent")
        loop = asyncio.get_running_loop()
        head_future: asyncio.Future[Response] = loop.create_future()
        self._parser.expect(head_future, method == "HEAD")
        # One timer handle, not asyncio.timeout: a third of the cost on every forward.
        timer = None if deadline is None else loop.call_at(deadline, self._expire)
        try:
            if stream is None:
                self._transport.write(head.data + body if body else head.data)
                return await head_future
            self._transport.write(head.data)
            writer = self._writer = loop.create_task(self._write_stream(stream, head.chunked))
            await asyncio.wait((head_future, writer), return_when=asyncio.FIRST_COMPLETED)
            failed = writer.exception() if writer.done() and not writer.cancelled() else None
            if failed is not None and not head_future.done():
                # The client's body broke or was refused before any answer; an answer that
                # came with the failure is kept (the connection is then not reused).
                head_future.cancel()
                self.close()
                raise failed
            return await head_future
        finally:
            if timer is not None:
                timer.cancel()

    def _expire(self) -> None:
        head = self._parser.head
        if head is not None and not head.done():
            head.set_exception(AnswerTimedOut("No answer before the deadline"))

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
            if not self.usable:
                raise ResponseBroken("Upstream closed the connection during the upload")
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
        parser = self._parser
        # A request still in the write buffer (an upload answered early) would delay the
        # next one, or mix with it: such a connection is closed, not pooled.
        clean = (
            self._stop_writer()
            and response.complete
            and not parser.no_body
            and not self.closed
            and parser.keep_alive
            and self._transport is not None
            and not self._transport.get_write_buffer_size()
        )
        parser.response, parser.head = None, None
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
        head, response = self._parser.head, self._parser.response
        if head is not None and not head.done():
            head.set_exception(exc)
        elif response is not None:
            response._fail(exc)
        self.close()

    @staticmethod
    def _reads_until_close(response: Response) -> bool:
        """An answer not framed by chunking or a length ends when the connection does
        (RFC 9112 6.3: a Transfer-Encoding other than chunked outranks Content-Length)."""
        headers = response.headers
        codings = ",".join(headers.getall("Transfer-Encoding", ()))
        if not codings:
            return "Content-Length" not in headers
        return codings.rsplit(",", 1)[-1].strip().lower() != "chunked"
