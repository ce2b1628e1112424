"""One upstream answer: its status and headers, then its body buffered with flow control."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Final

from multidict import CIMultiDict

from proxy.upstream.faults import ReadTimedOut

if TYPE_CHECKING:
    from proxy.upstream.connection import Connection

HIGH_WATER: Final = 512 * 1024  # response bytes buffered before reading from nxlink pauses
LOW_WATER: Final = 128 * 1024


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
        "_timeout",
        "_watchdog",
        "_waiting_since",
    )

    def __init__(
        self, connection: Connection, status: int, reason: str, headers: list[tuple[str, str]]
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
        self._timeout = connection.read_timeout
        self._watchdog: asyncio.TimerHandle | None = None
        self._waiting_since = 0.0

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
                await self._next_piece()

    async def _next_piece(self) -> None:
        """Wait for more of the body; past the read timeout the answer fails, and its
        connection is closed: a stalled body must not hold a slot."""
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        self._waiting_since = loop.time()
        if self._watchdog is None:
            # One timer re-armed on expiry, not one per wait: a long body waits thousands
            # of times.
            self._watchdog = loop.call_at(self._waiting_since + self._timeout, self._watch)
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _watch(self) -> None:
        self._watchdog = None
        if self._waiter is None or self._complete or self._error is not None:
            return  # not waiting now: the next wait arms a new timer
        loop = asyncio.get_running_loop()
        deadline = self._waiting_since + self._timeout
        if loop.time() < deadline:
            self._watchdog = loop.call_at(deadline, self._watch)
            return
        message = f"Upstream sent nothing for {self._timeout:g}s in the middle of a body"
        self._fail(ReadTimedOut(message))
        self._connection.close()

    async def read(self) -> bytes:
        """The whole body."""
        return b"".join([chunk async for chunk in self.iter_chunks()])

    def release(self) -> None:
        """Hand the connection back to the pool if it is clean, else close it."""
        if not self._released:
            self._released = True
            if self._watchdog is not None:
                self._watchdog.cancel()
                self._watchdog = None
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
