"""A scripted raw-socket upstream for the hostile-answer tests: an asyncio TCP server on
127.0.0.1 that runs one script per connection and records what each connection received."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Final

from yarl import URL

HEAD_END: Final = b"\r\n\r\n"
MAX_REQUEST_HEAD: Final = 64 * 1024


@dataclass(slots=True)
class Peer:
    """One accepted connection: its streams, its number, and the request heads it got."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    number: int
    heads: list[bytes] = field(default_factory=list)
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    async def request(self) -> bytes:
        """The next request's head (its body read and dropped); b"" once the peer closed."""
        try:
            head = await self.reader.readuntil(HEAD_END)
        except (asyncio.IncompleteReadError, ConnectionError):
            return b""
        self.heads.append(head)
        length = _content_length(head)
        if length:
            await self.reader.readexactly(length)
        elif b"transfer-encoding: chunked" in head.lower():
            await _skip_chunked(self.reader)
        return head

    async def hold(self) -> None:
        """Send nothing more; return once the client closed the connection."""
        while await self.reader.read(65536):
            pass

    async def send(self, data: bytes) -> None:
        """Write ``data`` and wait until the kernel took it."""
        self.writer.write(data)
        await self.writer.drain()

    def reset(self) -> None:
        """Drop the connection with a TCP RST (SO_LINGER 0), not a clean FIN."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


Script = Callable[[Peer], Awaitable[None]]


@dataclass(slots=True)
class RawUpstream:
    """The running server: its URL and every connection it accepted."""

    port: int
    peers: list[Peer] = field(default_factory=list)

    def url(self, path: str = "/openapi/test") -> URL:
        return URL(f"http://127.0.0.1:{self.port}{path}")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def tenants_per_connection(self) -> list[set[str]]:
        """For each connection, the tenants (``X-Tenant`` values) whose requests it carried."""
        return [{_header(head, b"x-tenant") for head in peer.heads} for peer in self.peers]


@asynccontextmanager
async def raw_upstream(script: Script) -> AsyncIterator[RawUpstream]:
    """Serve ``script`` on a free loopback port until the block ends; a script still running
    (e.g. holding a stalled answer) is cancelled, its connection closed."""
    tasks: set[asyncio.Task[None]] = set()
    upstream = RawUpstream(0)

    async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = Peer(reader, writer, len(upstream.peers))
        upstream.peers.append(peer)
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await script(peer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away: what several hostile cases want
        finally:
            tasks.discard(task)
            writer.transport.abort()
            peer.ended.set()

    server = await asyncio.start_server(accepted, "127.0.0.1", 0)
    upstream.port = server.sockets[0].getsockname()[1]
    try:
        yield upstream
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


async def answer_each(peer: Peer, answer: bytes) -> None:
    """Answer every request on the connection with the same bytes."""
    while await peer.request():
        await peer.send(answer)


async def endless(peer: Peer, piece: bytes, limit: int) -> None:
    """Write ``piece`` over and over, up to ``limit`` bytes, while the client reads."""
    sent = 0
    while sent < limit:
        await peer.send(piece)
        sent += len(piece)


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return 0


def _header(head: bytes, wanted: bytes) -> str:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == wanted:
            return value.strip().decode()
    return ""


async def _skip_chunked(reader: asyncio.StreamReader) -> None:
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        await reader.readexactly(size + 2)
        if size == 0:
            return
