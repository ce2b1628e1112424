"""The pool of keep-alive upstream connections: slots, idle connections per origin, connecting."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import Callable, Iterable
from typing import Final

import aiohappyeyeballs
from yarl import URL

from proxy.upstream.connection import Connection
from proxy.upstream.faults import ConnectFailed, TLSFailed
from proxy.upstream.framing import BodyStream, PoolKey, build_head, origin_of
from proxy.upstream.response import Response

KEEPALIVE: Final = 15.0  # idle seconds a pooled connection is kept (servers allow 60-75)
READ_TIMEOUT: Final = 30.0  # UPSTREAM_READ_TIMEOUT's default
HAPPY_EYEBALLS_DELAY: Final = 0.25  # seconds before trying a host's next address in parallel


class Pool:
    """Keep-alive connections per tenant and origin, at most ``limit`` busy at once.

    A connection is reused only for the tenant that opened it: whatever a broken answer
    leaves on it can never reach another tenant's request."""

    def __init__(
        self,
        *,
        limit: int,
        connect_timeout: float,
        keepalive: float = KEEPALIVE,
        read_timeout: float = READ_TIMEOUT,
        ssl_context: ssl.SSLContext | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.connect_timeout = connect_timeout
        self.keepalive = keepalive
        self.read_timeout = read_timeout
        self._ssl = ssl_context
        self._clock = clock
        self._slots = asyncio.Semaphore(limit)
        self._idle: dict[PoolKey, list[Connection]] = {}
        self._open: set[Connection] = set()
        self._closed = False
        self._sweeper: asyncio.TimerHandle | None = None

    async def request(
        self,
        method: str,
        url: URL,
        headers: Iterable[tuple[str, str]],
        *,
        body: bytes | None = None,
        stream: BodyStream | None = None,
        deadline: float | None = None,
        tenant: str = "",
        fresh: bool = False,
    ) -> Response:
        """Send one request; the caller must ``release()`` the response it gets.

        ``deadline`` (loop time) bounds waiting for a free slot, connecting and the answer's
        headers: past it, TimeoutError (AnswerTimedOut once the request was written). A
        connect failure before it is ConnectFailed.
        ``fresh`` skips the idle connections (a retry after one turned out closed)."""
        key = (tenant, *origin_of(url))
        head = build_head(method, url, headers, body, stream)
        if self._slots.locked():
            async with asyncio.timeout_at(deadline):
                await self._slots.acquire()
        else:
            await self._slots.acquire()
        try:
            idle = None if fresh else self._idle_connection(key)
            connection = idle or await self._connect(key, deadline)
            try:
                return await connection.send(method, head, body, stream, deadline)
            except BaseException:
                connection.close()
                raise
        except BaseException:
            self._slots.release()
            raise

    def put(self, connection: Connection) -> None:
        """Keep ``connection`` for its tenant's next request to the same origin."""
        connection.idle_since = self._clock()
        connection.reused = True
        self._idle.setdefault(connection.key, []).append(connection)
        if self._sweeper is None:
            loop = asyncio.get_running_loop()
            self._sweeper = loop.call_later(self.keepalive, self._sweep)

    def release_slot(self) -> None:
        self._slots.release()

    def forget(self, connection: Connection) -> None:
        """``connection`` is closed: drop it from the open set and the idle list."""
        self._open.discard(connection)
        idle = self._idle.get(connection.key)
        if idle and connection in idle:
            idle.remove(connection)
            if not idle:
                del self._idle[connection.key]

    async def close(self) -> None:
        """Close every connection, idle or not; later connects fail."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for connection in list(self._open):
            connection.close()
        self._open.clear()
        self._idle.clear()

    def _sweep(self) -> None:
        """Close the connections idle past ``keepalive``; come back while any are kept."""
        self._sweeper = None
        expired = self._clock() - self.keepalive
        for key, idle in list(self._idle.items()):
            kept = [connection for connection in idle if connection.idle_since >= expired]
            for connection in idle:
                if connection.idle_since < expired:
                    connection.close()
            if kept:
                self._idle[key] = kept
            else:
                del self._idle[key]
        if self._idle:
            loop = asyncio.get_running_loop()
            self._sweeper = loop.call_later(self.keepalive / 2, self._sweep)

    def _idle_connection(self, key: PoolKey) -> Connection | None:
        idle = self._idle.get(key)
        deadline = self._clock() - self.keepalive
        while idle:
            connection = idle.pop()  # the most recent: the least likely to be closed
            if connection.usable and connection.idle_since >= deadline:
                return connection
            connection.close()
        return None

    async def _connect(self, key: PoolKey, deadline: float | None) -> Connection:
        _tenant, scheme, host, port = key
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
                        lambda: Connection(self, key),
                        sock=sock,
                        ssl=tls,
                        server_hostname=host if tls else None,
                    )
                except BaseException:
                    sock.close()
                    raise
        except ssl.SSLCertVerificationError as exc:  # the same certificate on every try
            raise TLSFailed(f"TLS with {host}:{port} failed ({exc.verify_message})") from exc
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


_DEFAULT_SSL: ssl.SSLContext | None = None


def _default_ssl() -> ssl.SSLContext:
    global _DEFAULT_SSL  # one context per process: building one loads the CA store
    if _DEFAULT_SSL is None:
        _DEFAULT_SSL = ssl.create_default_context()
    return _DEFAULT_SSL
