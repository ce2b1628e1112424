"""The HTTP/1.1 upstream client on its own, against real loopback servers: framing on the wire,
keep-alive reuse and expiry, body decoding, cut answers, back-pressure, uploads, the pool limit
and TLS."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import logging
import random
import select
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

from proxy.errors import UpstreamUnavailable
from proxy.upstream import (
    HIGH_WATER,
    ConnectFailed,
    Pool,
    ResponseBroken,
    UpstreamClient,
    UpstreamRequest,
)
from proxy.upstream.faults import TLSFailed
from tests.conftest import CREDS_A

LIMIT: Final = 3.0  # seconds any one test may spend waiting on the network
SERVER_LIFETIME: Final = 10.0  # a raw server connection never outlives this
READ_MAX: Final = 256 * 1024  # the most one recv() of asyncio's socket transport returns
OK: Final = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
MIB: Final = 1024 * 1024

Headers = Iterable[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class RawRequest:
    """One request exactly as it crossed the wire: the head and the body with its framing."""

    connection: int  # the server's count of the connection it came on, from 0
    head: bytes
    body: bytes

    def header_values(self, name: str) -> list[str]:
        lines = self.head.decode("latin-1").split("\r\n")[1:]
        pairs = [line.split(":", 1) for line in lines if ":" in line]
        return [value.strip() for key, value in pairs if key.lower() == name.lower()]


# Answers one request: writes what it likes, True to keep the connection for the next one.
Reply = Callable[[RawRequest, asyncio.StreamWriter], Awaitable[bool]]


@dataclass(slots=True)
class RawServer:
    """A TCP server on 127.0.0.1 that records raw requests and answers with scripted bytes."""

    port: int
    requests: list[RawRequest] = field(default_factory=list)
    connections: int = 0
    closed_by_client: list[int] = field(default_factory=list)  # connections the client ended

    def url(self, path_qs: str = "/") -> URL:
        return URL(f"http://127.0.0.1:{self.port}{path_qs}", encoded=True)


StartRaw = Callable[[Reply], Awaitable[RawServer]]
MakePool = Callable[..., Pool]


def answer(*pieces: bytes, close: bool = False, pause: float = 0.0) -> Reply:
    """A reply writing ``pieces`` in order (``pause`` seconds apart), then closing if asked."""

    async def reply(request: RawRequest, writer: asyncio.StreamWriter) -> bool:
        for index, piece in enumerate(pieces):
            if index and pause:
                await asyncio.sleep(pause)
            writer.write(piece)
            await writer.drain()
        return not close

    return reply


def split(data: bytes, size: int) -> list[bytes]:
    return [data[start : start + size] for start in range(0, len(data), size)]


async def read_body(reader: asyncio.StreamReader, head: bytes) -> bytes:
    """The body that follows ``head``, framing included (chunk sizes and the last chunk)."""
    request = RawRequest(-1, head, b"")
    if "chunked" in request.header_values("Transfer-Encoding"):
        raw = bytearray()
        while True:
            line = await reader.readuntil(b"\r\n")
            raw += line
            size = int(line[:-2].split(b";")[0], 16)
            if size == 0:
                raw += await reader.readuntil(b"\r\n")  # no trailers: the closing empty line
                return bytes(raw)
            raw += await reader.readexactly(size + 2)
    lengths = request.header_values("Content-Length")
    return await reader.readexactly(int(lengths[0])) if lengths else b""


@pytest.fixture
async def raw_server() -> AsyncIterator[StartRaw]:
    """Start raw servers with a reply; every connection is cut when the test ends."""
    servers: list[asyncio.Server] = []
    handlers: set[asyncio.Task[None]] = set()
    writers: list[asyncio.StreamWriter] = []

    async def start(reply: Reply) -> RawServer:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            handlers.add(task)
            writers.append(writer)
            index = raw.connections
            raw.connections += 1
            try:
                async with asyncio.timeout(SERVER_LIFETIME):
                    while True:
                        try:
                            head = await reader.readuntil(b"\r\n\r\n")
                            body = await read_body(reader, head)
                        except (asyncio.IncompleteReadError, ConnectionError):
                            raw.closed_by_client.append(index)
                            return
                        except ValueError:
                            return  # framing this server cannot read: drop the connection
                        request = RawRequest(index, head, body)
                        raw.requests.append(request)
                        if not await reply(request, writer):
                            return
            except (TimeoutError, ConnectionError):
                pass  # a safety net only: the test's own timeout reports the failure
            finally:
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(server)
        raw = RawServer(server.sockets[0].getsockname()[1])
        return raw

    yield start
    for server in servers:
        server.close()
    for writer in writers:
        writer.close()  # each handler then sees the end of its connection and returns
    async with asyncio.timeout(LIMIT):
        await asyncio.gather(*handlers, return_exceptions=True)
        for server in servers:
            await server.wait_closed()


@pytest.fixture
async def make_pool() -> AsyncIterator[MakePool]:
    """Build pools (limit 4, 2 s to connect unless told otherwise), all closed at the end."""
    pools: list[Pool] = []

    def make(limit: int = 4, connect_timeout: float = 2.0, **options: Any) -> Pool:
        pool = Pool(limit=limit, connect_timeout=connect_timeout, **options)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        await pool.close()
    await asyncio.sleep(0)  # let the transports finish closing


@pytest.fixture
def pool(make_pool: MakePool) -> Pool:
    """A pool with the defaults."""
    return make_pool()


async def call(
    pool: Pool,
    method: str,
    url: URL,
    headers: Headers = (),
    *,
    body: bytes | None = None,
) -> tuple[int, bytes]:
    """One whole request: status and body, the response released."""
    response = await pool.request(method, url, headers, body=body)
    try:
        return response.status, await response.read()
    finally:
        response.release()


async def eventually(check: Callable[[], bool]) -> None:
    """Wait (bounded) until ``check()`` holds."""
    async with asyncio.timeout(LIMIT):
        while not check():
            await asyncio.sleep(0.005)


async def chunks_of(*pieces: bytes) -> AsyncIterator[bytes]:
    for piece in pieces:
        await asyncio.sleep(0)
        yield piece


# Keep-alive and request framing


async def test_sequential_requests_reuse_one_connection_and_send_exact_heads(
    pool: Pool, raw_server: StartRaw
) -> None:
    server = await raw_server(answer(OK))
    host = f"127.0.0.1:{server.port}"
    async with asyncio.timeout(LIMIT):
        got = [
            await call(
                pool,
                "GET",
                server.url("/p/a%20b?q=1&r=%2F&s=a+b"),
                [("X-Trace", "1"), ("Accept", "*/*"), ("X-Trace", "2")],
            ),
            await call(
                pool,
                "POST",
                server.url("/submit"),
                [("Content-Type", "application/json")],
                body=b'{"a": 1}',
            ),
            await call(pool, "POST", server.url("/empty")),
        ]
    assert got == [(200, b"ok")] * 3
    assert server.connections == 1
    assert [(r.connection, r.head, r.body) for r in server.requests] == [
        (
            0,
            b"GET /p/a%20b?q=1&r=%2F&s=a+b HTTP/1.1\r\n"
            b"Host: " + host.encode() + b"\r\n"
            b"X-Trace: 1\r\nAccept: */*\r\nX-Trace: 2\r\n\r\n",
            b"",
        ),
        (
            0,
            b"POST /submit HTTP/1.1\r\nHost: " + host.encode() + b"\r\n"
            b"Content-Type: application/json\r\nContent-Length: 8\r\n\r\n",
            b'{"a": 1}',
        ),
        (
            0,
            b"POST /empty HTTP/1.1\r\nHost: " + host.encode() + b"\r\nContent-Length: 0\r\n\r\n",
            b"",
        ),
    ]


@pytest.mark.parametrize(
    ("method", "body", "framing"),
    [
        ("GET", None, b""),
        ("GET", b"", b""),
        ("HEAD", None, b""),
        ("DELETE", None, b""),
        ("DELETE", b"abc", b"Content-Length: 3\r\n"),
        ("POST", None, b"Content-Length: 0\r\n"),
        ("PUT", b"", b"Content-Length: 0\r\n"),
        ("PATCH", None, b"Content-Length: 0\r\n"),
        ("PUT", b"abcde", b"Content-Length: 5\r\n"),
    ],
)
async def test_content_length_is_sent_for_a_body_or_a_body_method_only(
    pool: Pool, raw_server: StartRaw, method: str, body: bytes | None, framing: bytes
) -> None:
    server = await raw_server(answer(b"HTTP/1.1 204 No Content\r\n\r\n"))
    async with asyncio.timeout(LIMIT):
        assert await call(pool, method, server.url("/x"), body=body) == (204, b"")
    [request] = server.requests
    host = f"Host: 127.0.0.1:{server.port}\r\n".encode()
    assert request.head == method.encode() + b" /x HTTP/1.1\r\n" + host + framing + b"\r\n"
    assert request.body == (body or b"")


async def test_status_reason_and_repeated_headers_are_kept(
    pool: Pool, raw_server: StartRaw
) -> None:
    server = await raw_server(
        answer(
            b"HTTP/1.1 418 I'm a teapot\r\nContent-Length: 3\r\n"
            b"X-Multi: a\r\nx-multi: b\r\nContent-Type: text/plain\r\n\r\ntea"
        )
    )
    async with asyncio.timeout(LIMIT):
        response = await pool.request("GET", server.url(), [])
        try:
            body = await response.read()
        finally:
            response.release()
    assert (response.status, response.reason, body) == (418, "I'm a teapot", b"tea")
    assert response.headers.getall("X-MULTI") == ["a", "b"]
    assert response.headers["content-type"] == "text/plain"


@pytest.mark.parametrize(
    "first_answer",
    [
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
    ],
    ids=["connection-close", "http-1.0"],
)
async def test_answer_that_ends_keep_alive_is_not_reused(
    pool: Pool, raw_server: StartRaw, first_answer: bytes
) -> None:
    # The server keeps the socket open: only the client's reading of the answer can close it.
    async def reply(request: RawRequest, writer: asyncio.StreamWriter) -> bool:
        writer.write(first_answer if request.connection == 0 else OK)
        await writer.drain()
        return True

    server = await raw_server(reply)
    async with asyncio.timeout(LIMIT):
        assert await call(pool, "GET", server.url("/1")) == (200, b"ok")
        assert await call(pool, "GET", server.url("/2")) == (200, b"ok")
        await eventually(lambda: server.closed_by_client == [0])
    assert server.connections == 2
    assert [r.connection for r in server.requests] == [0, 1]


async def test_keep_alive_answer_after_http_1_0_with_keep_alive_header_is_reused(
    pool: Pool, raw_server: StartRaw
) -> None:
    server = await raw_server(
        answer(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok")
    )
    async with asyncio.timeout(LIMIT):
        assert await call(pool, "GET", server.url("/1")) == (200, b"ok")
        assert await call(pool, "GET", server.url("/2")) == (200, b"ok")
    assert server.connections == 1


# Response bodies


async def test_chunked_answer_is_decoded_and_the_connection_reused(
    pool: Pool, raw_server: StartRaw
) -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n7;ext=1\r\n, world\r\n10\r\n" + b"0123456789abcdef" + b"\r\n0\r\n\r\n"
    )
    server = await raw_server(answer(*split(chunked, 7), pause=0.001))
    async with asyncio.timeout(LIMIT):
        assert await call(pool, "GET", server.url("/1")) == (200, b"hello, world0123456789abcdef")
        assert await call(pool, "GET", server.url("/2")) == (200, b"hello, world0123456789abcdef")
    assert server.connections == 1


async def test_answer_without_length_ends_at_close_and_is_complete(
    pool: Pool, raw_server: StartRaw
) -> None:
    server = await raw_server(
        answer(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n",
            b"until ",
            b"the end",
            close=True,
            pause=0.01,
        )
    )
    async with asyncio.timeout(LIMIT):
        response = await pool.request("GET", server.url("/1"), [])
        try:
            assert await response.read() == b"until the end"
            assert response.complete
        finally:
            response.release()
        assert await call(pool, "GET", server.url("/2")) == (200, b"until the end")
    assert server.connections == 2


@pytest.mark.parametrize(
    ("head", "sent"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", b"0123456789"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"a\r\n0123456789\r\n"),
    ],
    ids=["content-length", "chunked"],
)
async def test_body_cut_short_raises_response_broken(
    pool: Pool, raw_server: StartRaw, head: bytes, sent: bytes
) -> None:
    server = await raw_server(answer(head, sent, close=True, pause=0.01))
    async with asyncio.timeout(LIMIT):
        response = await pool.request("GET", server.url("/1"), [])
        received: list[bytes] = []
        try:
            with pytest.raises(ResponseBroken):
                async for chunk in response.iter_chunks():
                    received.append(chunk)
            assert not response.complete
            assert response.body_if_complete() is None
        finally:
            response.release()
        assert b"".join(received) == b"0123456789"

        response = await pool.request("GET", server.url("/2"), [])
        try:
            with pytest.raises(ConnectionError):
                await response.read()
        finally:
            response.release()
    assert server.connections == 2


async def test_head_answer_is_complete_without_body_and_not_reused(
    pool: Pool, raw_server: StartRaw
) -> None:
    async def reply(request: RawRequest, writer: asyncio.StreamWriter) -> bool:
        if request.head.startswith(b"HEAD "):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
        else:
            writer.write(OK)
        await writer.drain()
        return True

    server = await raw_server(reply)
    async with asyncio.timeout(LIMIT):
        response = await pool.request("HEAD", server.url("/h"), [])
        try:
            assert response.complete
            assert response.headers["Content-Length"] == "5"
            assert response.body_if_complete() == b""
            assert await response.read() == b""
        finally:
            response.release()
        await eventually(lambda: server.closed_by_client == [0])
        assert await call(pool, "GET", server.url("/g")) == (200, b"ok")
    assert server.connections == 2
    assert server.requests[0].head.startswith(b"HEAD /h HTTP/1.1\r\n")
    assert server.requests[0].header_values("Content-Length") == []


async def test_no_content_answer_is_complete_and_the_connection_reused(
    pool: Pool, raw_server: StartRaw
) -> None:
    server = await raw_server(answer(b"HTTP/1.1 204 No Content\r\nX-Done: yes\r\n\r\n"))
    async with asyncio.timeout(LIMIT):
        response = await pool.request("DELETE", server.url("/item"), [])
        try:
            assert (response.status, response.reason) == (204, "No Content")
            assert response.complete
            assert response.body_if_complete() == b""
        finally:
            response.release()
        assert await call(pool, "DELETE", server.url("/item")) == (204, b"")
    assert server.connections == 1


async def test_interim_continue_is_skipped_for_the_real_answer(
    pool: Pool, raw_server: StartRaw
) -> None:
    server = await raw_server(
        answer(
            b"HTTP/1.1 100 Continue\r\nX-Interim: 1\r\n\r\n",
            b"HTTP/1.1 200 Fine\r\nContent-Length: 4\r\nX-Final: 1\r\n\r\ndone",
            pause=0.01,
        )
    )
    async with asyncio.timeout(LIMIT):
        response = await pool.request("POST", server.url("/up"), [], body=b"data")
        try:
            assert (response.status, response.reason) == (200, "Fine")
            assert await response.read() == b"done"
        finally:
            response.release()
        assert await call(pool, "POST", server.url("/up"), body=b"data") == (200, b"done")
    assert "X-Interim" not in response.headers
    assert response.headers["X-Final"] == "1"
    assert server.connections == 1


# Broken answers


@pytest.mark.parametrize(
    "garbage",
    [
        b"NOT HTTP AT ALL\r\n\r\n",
        b"HTTP/1.1 2x0 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n",
    ],
)
async def test_malformed_answer_is_response_broken(
    make_pool: MakePool, raw_server: StartRaw, garbage: bytes
) -> None:
    pool = make_pool(limit=1)
    server = await raw_server(answer(garbage))
    async with asyncio.timeout(LIMIT):
        with pytest.raises(ResponseBroken, match="Malformed"):
            await pool.request("GET", server.url(), [])
        await eventually(lambda: server.closed_by_client == [0])
        # The slot came back and the broken connection was not kept.
        with pytest.raises(ResponseBroken):
            await pool.request("GET", server.url(), [])
    assert server.connections == 2


async def test_server_closing_without_an_answer_is_response_broken(
    pool: Pool, raw_server: StartRaw
) -> None:
    server = await raw_server(answer(close=True))
    async with asyncio.timeout(LIMIT):
        with pytest.raises(ResponseBroken):
            await pool.request("POST", server.url("/x"), [], body=b"payload")
    assert [r.body for r in server.requests] == [b"payload"]


# Back-pressure


@pytest.mark.slow
async def test_large_answer_is_buffered_up_to_the_high_water_mark_only(
    pool: Pool, raw_server: StartRaw
) -> None:
    payload = random.Random(20240601).randbytes(8 * MIB)

    async def reply(request: RawRequest, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(payload))
        for piece in split(payload, 64 * 1024):
            writer.write(piece)
            await writer.drain()
        return True

    server = await raw_server(reply)
    digest = hashlib.sha256()
    size = peak = 0
    async with asyncio.timeout(LIMIT):
        response = await pool.request("GET", server.url("/big"), [])
        try:
            await asyncio.sleep(0.1)  # a stalled consumer: the buffer fills while nobody reads
            async for chunk in response.iter_chunks():
                # _buffered is private, read here because the bound it keeps is what is tested.
                # The buffer only grows between two chunks taken, so its peak is seen just
                # before one is taken: now, counting the one in hand.
                peak = max(peak, response._buffered + len(chunk))
                if (size + len(chunk)) // MIB != size // MIB:
                    await asyncio.sleep(0.02)  # stall again once per MiB
                else:
                    await asyncio.sleep(0)
                size += len(chunk)
                digest.update(chunk)
            assert response.complete
        finally:
            response.release()
        assert await call(pool, "POST", server.url("/after")) == (200, payload)
    assert size == len(payload)
    assert digest.hexdigest() == hashlib.sha256(payload).hexdigest()
    assert HIGH_WATER < peak <= HIGH_WATER + READ_MAX, peak
    assert server.connections == 1


# Streamed uploads


async def test_stream_without_length_is_sent_chunked_skipping_empty_chunks(
    pool: Pool, raw_server: StartRaw
) -> None:
    server = await raw_server(answer(OK))
    stream = chunks_of(b"abc", b"", b"defgh", b"x" * 300, b"")
    async with asyncio.timeout(LIMIT):
        response = await pool.request(
            "POST", server.url("/up"), [("Content-Type", "application/octet-stream")], stream=stream
        )
        try:
            assert await response.read() == b"ok"
        finally:
            response.release()
        assert await call(pool, "GET", server.url("/next")) == (200, b"ok")
    [upload, after] = server.requests
    assert upload.head == (
        b"POST /up HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
        b"Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        % server.port
    )
    assert upload.body == (
        b"3\r\nabc\r\n5\r\ndefgh\r\n12c\r\n" + b"x" * 300 + b"\r\n" + b"0\r\n\r\n"
    )
    assert after.connection == 0


async def test_stream_with_given_length_is_sent_raw_under_that_header_once(
    pool: Pool, raw_server: StartRaw
) -> None:
    server = await raw_server(answer(OK))
    stream = chunks_of(b"abc", b"", b"defgh")
    async with asyncio.timeout(LIMIT):
        response = await pool.request(
            "PUT", server.url("/up"), [("content-length", "8"), ("X-A", "1")], stream=stream
        )
        try:
            assert await response.read() == b"ok"
        finally:
            response.release()
    [upload] = server.requests
    assert upload.head == (
        b"PUT /up HTTP/1.1\r\nHost: 127.0.0.1:%d\r\ncontent-length: 8\r\nX-A: 1\r\n\r\n"
        % server.port
    )
    assert upload.header_values("Transfer-Encoding") == []
    assert upload.body == b"abcdefgh"


async def test_bytes_body_replaces_a_given_content_length_with_its_own(
    pool: Pool, raw_server: StartRaw
) -> None:
    server = await raw_server(answer(OK))
    async with asyncio.timeout(LIMIT):
        headers = [("Content-Length", "999"), ("X-A", "1"), ("CONTENT-LENGTH", "7")]
        assert await call(pool, "POST", server.url("/b"), headers, body=b"four") == (200, b"ok")
    [request] = server.requests
    assert request.header_values("Content-Length") == ["4"]
    assert request.head.endswith(b"\r\nX-A: 1\r\nContent-Length: 4\r\n\r\n")
    assert request.body == b"four"


class UploadFailed(Exception):
    """The caller's body source broke."""


async def test_upload_stream_failure_propagates_and_frees_the_slot(
    make_pool: MakePool, raw_server: StartRaw
) -> None:
    pool = make_pool(limit=1)
    server = await raw_server(answer(OK))
    failure = UploadFailed("source gone")
    sent_first = asyncio.Event()

    async def failing() -> AsyncIterator[bytes]:
        yield b"first part"
        sent_first.set()
        await asyncio.sleep(0.01)
        raise failure

    async with asyncio.timeout(LIMIT):
        with pytest.raises(UploadFailed) as caught:
            await pool.request("POST", server.url("/up"), [], stream=failing())
        assert sent_first.is_set()
        async with asyncio.timeout(1):
            assert await call(pool, "GET", server.url("/next")) == (200, b"ok")
        await eventually(lambda: server.closed_by_client == [0])
    assert caught.value is failure
    assert server.connections == 2
    assert [(r.connection, r.head[:10]) for r in server.requests] == [(1, b"GET /next ")]


@pytest.mark.parametrize(
    "headers",
    [
        [("X-Evil", "a\r\nX-Injected: 1")],
        [("X-Evil", "a\nb")],
        [("X-Evil", "a\rb")],
        [("X-Ok", "1"), ("X-Evil\r\nX-Injected", "1")],
    ],
    ids=["crlf", "lf", "cr", "in-name"],
)
async def test_line_break_in_a_header_is_refused_before_anything_is_sent(
    make_pool: MakePool, raw_server: StartRaw, headers: list[tuple[str, str]]
) -> None:
    pool = make_pool(limit=1)
    server = await raw_server(answer(OK))
    async with asyncio.timeout(LIMIT):
        with pytest.raises(ValueError, match="line break"):
            await pool.request("GET", server.url("/x"), headers)
        # Nothing went out, and the one slot is still free.
        assert await call(pool, "GET", server.url("/y")) == (200, b"ok")
    assert server.connections == 1
    assert [r.head.split(b"\r\n")[0] for r in server.requests] == [b"GET /y HTTP/1.1"]


# The pool


async def test_limit_makes_a_request_wait_for_the_release_of_the_previous(
    make_pool: MakePool, raw_server: StartRaw
) -> None:
    pool = make_pool(limit=1)
    server = await raw_server(answer(OK))
    order: list[str] = []
    released = asyncio.Event()

    async def second() -> tuple[int, bytes]:
        order.append("second asked")
        result = await call(pool, "GET", server.url("/2"))
        order.append("second answered")
        assert released.is_set()
        return result

    async with asyncio.timeout(LIMIT):
        first = await pool.request("GET", server.url("/1"), [])
        assert await first.read() == b"ok"
        waiting = asyncio.create_task(second())
        await asyncio.sleep(0.05)
        assert not waiting.done()
        assert len(server.requests) == 1
        order.append("first released")
        released.set()
        first.release()
        assert await waiting == (200, b"ok")
    assert order == ["second asked", "first released", "second answered"]
    assert server.connections == 1


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_idle_connections_are_closed_by_a_timer_without_another_request(
    make_pool: MakePool, raw_server: StartRaw
) -> None:
    pool = make_pool(keepalive=0.05)
    server = await raw_server(answer(OK))
    async with asyncio.timeout(LIMIT):
        assert await call(pool, "GET", server.url("/1")) == (200, b"ok")
        await eventually(lambda: server.closed_by_client == [0])


async def test_connections_are_kept_per_tenant_and_per_case_insensitive_host(
    pool: Pool, raw_server: StartRaw
) -> None:
    server = await raw_server(answer(OK))
    upper = URL(f"http://LOCALHOST:{server.port}/")
    lower = URL(f"http://localhost:{server.port}/")
    async with asyncio.timeout(LIMIT):
        for url, tenant in ((upper, "a"), (lower, "a"), (lower, "b"), (upper, "b")):
            response = await pool.request("GET", url, [], tenant=tenant)
            assert await response.read() == b"ok"
            response.release()
    assert [r.connection for r in server.requests] == [0, 0, 1, 1]


async def test_idle_connection_older_than_keepalive_is_not_reused(
    make_pool: MakePool, raw_server: StartRaw
) -> None:
    clock = FakeClock(1000.0)
    pool = make_pool(keepalive=10.0, clock=clock)
    server = await raw_server(answer(OK))
    async with asyncio.timeout(LIMIT):
        assert await call(pool, "GET", server.url("/1")) == (200, b"ok")
        clock.now += 10.0  # idle exactly keepalive: still usable
        assert await call(pool, "GET", server.url("/2")) == (200, b"ok")
        clock.now += 10.5  # past keepalive since the last release
        assert await call(pool, "GET", server.url("/3")) == (200, b"ok")
        await eventually(lambda: server.closed_by_client == [0])
    assert [r.connection for r in server.requests] == [0, 0, 1]
    assert server.connections == 2


async def test_release_before_the_body_was_read_closes_the_connection(
    pool: Pool, raw_server: StartRaw
) -> None:
    async def reply(request: RawRequest, writer: asyncio.StreamWriter) -> bool:
        if request.connection == 0:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
        else:
            writer.write(OK)
        await writer.drain()
        return True

    server = await raw_server(reply)
    async with asyncio.timeout(LIMIT):
        response = await pool.request("GET", server.url("/1"), [])
        assert not response.complete
        response.release()
        response.release()  # twice is harmless
        await eventually(lambda: server.closed_by_client == [0])
        assert await call(pool, "GET", server.url("/2")) == (200, b"ok")
        assert await call(pool, "GET", server.url("/3")) == (200, b"ok")
    assert [r.connection for r in server.requests] == [0, 1, 1]


async def test_close_ends_idle_connections(pool: Pool, raw_server: StartRaw) -> None:
    server = await raw_server(answer(OK))
    async with asyncio.timeout(LIMIT):
        assert await call(pool, "GET", server.url("/1")) == (200, b"ok")
        assert server.closed_by_client == []
        await pool.close()
        await eventually(lambda: server.closed_by_client == [0])


async def test_close_cuts_a_response_still_arriving(pool: Pool, raw_server: StartRaw) -> None:
    server = await raw_server(answer(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n0123456789"))
    async with asyncio.timeout(LIMIT):
        response = await pool.request("GET", server.url("/1"), [])
        try:
            await pool.close()
            with pytest.raises(ResponseBroken):
                await response.read()
        finally:
            response.release()
        await eventually(lambda: server.closed_by_client == [0])


# Connecting


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A bound loopback port nobody listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


async def test_refused_connection_is_connect_failed(pool: Pool, refused_port: int) -> None:
    async with asyncio.timeout(LIMIT):
        with pytest.raises(ConnectFailed) as caught:
            await pool.request("GET", URL(f"http://127.0.0.1:{refused_port}/"), [])
    assert isinstance(caught.value.__cause__, ConnectionRefusedError)
    assert "ConnectionRefusedError" in str(caught.value)


@pytest.fixture
def stalled_port() -> Iterator[int]:
    """A loopback port whose accept queue is full, so a new connect gets no answer."""
    listener = socket.socket()
    fillers: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        address = listener.getsockname()
        for _ in range(8):
            filler = socket.socket()
            fillers.append(filler)
            filler.setblocking(False)
            filler.connect_ex(address)
            _, writable, _ = select.select([], [filler], [], 0.1)
            if not writable:
                break  # this SYN was dropped: the queue is full, the next connect stalls too
        else:
            pytest.skip("the kernel answered every connect: cannot stall one")
        yield address[1]
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


async def test_connect_timeout_is_connect_failed(make_pool: MakePool, stalled_port: int) -> None:
    pool = make_pool(connect_timeout=0.2)
    started = time.monotonic()
    async with asyncio.timeout(LIMIT):
        with pytest.raises(ConnectFailed, match="timed out") as caught:
            await pool.request("GET", URL(f"http://127.0.0.1:{stalled_port}/"), [])
    assert 0.2 <= time.monotonic() - started < 1.0
    assert isinstance(caught.value.__cause__, TimeoutError)


async def test_tls_handshake_without_answer_is_connect_failed(
    make_pool: MakePool, raw_server: StartRaw
) -> None:
    server = await raw_server(answer(OK))  # reads the ClientHello as the start of a head
    pool = make_pool(connect_timeout=0.2)
    started = time.monotonic()
    async with asyncio.timeout(LIMIT):
        with pytest.raises(ConnectFailed, match="timed out"):
            await pool.request("GET", URL(f"https://127.0.0.1:{server.port}/"), [])
        await eventually(lambda: server.closed_by_client == [0])
    assert 0.2 <= time.monotonic() - started < 1.0
    assert (server.connections, server.requests) == (1, [])


# TLS


@dataclass(frozen=True, slots=True)
class Certificate:
    """A self-signed certificate for IP 127.0.0.1 and its key."""

    cert: Path
    key: Path


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    """Made once per module with the openssl CLI (the tests skip without it)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not on PATH")
    folder = tmp_path_factory.mktemp("tls")
    made = Certificate(folder / "cert.pem", folder / "key.pem")
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-days",
            "1",
            "-keyout",
            str(made.key),
            "-out",
            str(made.cert),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return made


@pytest.fixture
async def tls_server(
    certificate: Certificate, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> URL:
    """An aiohttp app served over https with the self-signed certificate."""

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=f"secure {request.host} {request.secure}")

    app = web.Application()
    app.router.add_get("/hello", hello)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificate.cert, certificate.key)
    server = await aiohttp_server(app, ssl=context)
    return URL(f"https://127.0.0.1:{server.port}/hello")


async def test_tls_answer_arrives_with_a_context_trusting_the_certificate(
    make_pool: MakePool, certificate: Certificate, tls_server: URL
) -> None:
    pool = make_pool(ssl_context=ssl.create_default_context(cafile=certificate.cert))
    async with asyncio.timeout(LIMIT):
        got = await call(pool, "GET", tls_server)
        assert got == (200, f"secure 127.0.0.1:{tls_server.port} True".encode())
        assert await call(pool, "GET", tls_server) == got


async def test_tls_with_the_default_context_rejects_the_self_signed_certificate(
    make_pool: MakePool, tls_server: URL
) -> None:
    pool = make_pool()
    async with asyncio.timeout(LIMIT):
        with pytest.raises(TLSFailed) as caught:  # not ConnectFailed: never retried
            await pool.request("GET", tls_server, [])
    assert isinstance(caught.value.__cause__, ssl.SSLCertVerificationError)


async def test_a_certificate_error_is_not_retried_as_a_connect_failure(
    make_pool: MakePool, tls_server: URL, caplog: pytest.LogCaptureFixture
) -> None:
    client = UpstreamClient(make_pool(), timeout=LIMIT)
    request = UpstreamRequest("GET", tls_server, [], "test.call", CREDS_A)
    async with asyncio.timeout(LIMIT):
        with pytest.raises(UpstreamUnavailable, match="TLSFailed"):
            await client.send(request)
    assert not [r for r in caplog.records if "retrying" in r.getMessage()]


# Regressions: three bugs the first version of the upstream client had.


async def test_header_value_mentioning_chunked_does_not_change_upload_framing(
    pool: Pool, raw_server: StartRaw
) -> None:
    server = await raw_server(answer(OK))
    headers = [("Content-Length", "8"), ("X-Note", "Transfer-Encoding: chunked")]
    async with asyncio.timeout(LIMIT):
        response = await pool.request(
            "POST", server.url("/up"), headers, stream=chunks_of(b"abc", b"defgh")
        )
        try:
            assert await response.read() == b"ok"
        finally:
            response.release()
        await asyncio.sleep(0.05)  # room for a second, smuggled request to show up
    # Framing taken from the head's text made the server read b"3\r\nabc\r\n" as the body
    # and the rest as a second, smuggled request.
    assert [(r.head.split(b"\r\n")[0], r.body) for r in server.requests] == [
        (b"POST /up HTTP/1.1", b"abcdefgh")
    ]


async def test_answer_with_a_non_chunked_transfer_coding_ends_at_close(
    pool: Pool, raw_server: StartRaw
) -> None:
    coded = gzip.compress(b"hello", mtime=0)
    server = await raw_server(
        answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", coded, close=True)
    )
    async with asyncio.timeout(LIMIT):
        response = await pool.request("GET", server.url(), [])
        try:
            assert await response.read() == coded
        finally:
            response.release()


async def test_unexpected_upgrade_answer_fails_without_an_asyncio_fatal_error(
    pool: Pool, raw_server: StartRaw, caplog: pytest.LogCaptureFixture
) -> None:
    server = await raw_server(
        answer(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\n")
    )
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        async with asyncio.timeout(LIMIT):
            with pytest.raises(ResponseBroken):
                await pool.request("GET", server.url(), [])
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []


# The deadline: waiting for a slot, connecting and the answer's head, all against one clock


def after(seconds: float) -> float:
    """A deadline ``seconds`` from now in loop time."""
    return asyncio.get_running_loop().time() + seconds


async def test_no_head_before_the_deadline_is_timeout_and_the_connection_dropped(
    make_pool: MakePool, raw_server: StartRaw
) -> None:
    pool = make_pool(limit=1)
    server = await raw_server(answer(OK))
    # Half a head at once, the rest a second later: the head is not complete by the deadline.
    slow = await raw_server(answer(b"HTTP/1.1 200 OK\r\n", b"Content-Length: 2\r\n\r\nok", pause=1))
    started = time.monotonic()
    async with asyncio.timeout(LIMIT):
        with pytest.raises(TimeoutError):
            await pool.request("GET", slow.url(), [], deadline=after(0.2))
        assert 0.2 <= time.monotonic() - started < 0.9
        await eventually(lambda: slow.closed_by_client == [0])  # a late head must not be read
        assert await call(pool, "GET", server.url()) == (200, b"ok")  # the slot came back


async def test_waiting_for_a_free_slot_counts_against_the_deadline(
    make_pool: MakePool, raw_server: StartRaw
) -> None:
    pool = make_pool(limit=1)
    server = await raw_server(answer(OK))
    async with asyncio.timeout(LIMIT):
        held = await pool.request("GET", server.url("/held"), [])
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await pool.request("GET", server.url("/late"), [], deadline=after(0.2))
        assert 0.2 <= time.monotonic() - started < 0.9
        held.release()
        assert await call(pool, "GET", server.url("/next")) == (200, b"ok")
    assert [r.head.split(b" ")[1] for r in server.requests] == [b"/held", b"/next"]


async def test_deadline_before_the_connect_timeout_is_timeout_not_connect_failed(
    make_pool: MakePool, stalled_port: int
) -> None:
    pool = make_pool(connect_timeout=5)
    started = time.monotonic()
    async with asyncio.timeout(LIMIT):
        with pytest.raises(TimeoutError) as caught:
            await pool.request(
                "GET", URL(f"http://127.0.0.1:{stalled_port}/"), [], deadline=after(0.2)
            )
    assert not isinstance(caught.value, ConnectFailed)
    assert 0.2 <= time.monotonic() - started < 0.9


# Regressions found by review: state that must not outlive an exchange, and limits


async def test_trailers_are_dropped_and_never_reach_the_next_answer(
    pool: Pool, raw_server: StartRaw
) -> None:
    with_trailer = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nok\r\n0\r\nX-Checksum: abc\r\n\r\n"
    )
    replies = iter([with_trailer, b"HTTP/1.1 200 OK\r\nX-Second: 1\r\nContent-Length: 2\r\n\r\nok"])

    async def reply(request: RawRequest, writer: asyncio.StreamWriter) -> bool:
        writer.write(next(replies))
        await writer.drain()
        return True

    server = await raw_server(reply)
    async with asyncio.timeout(LIMIT):
        first = await pool.request("GET", server.url("/1"), [])
        assert await first.read() == b"ok"
        assert first.raw_headers == [("Transfer-Encoding", "chunked")]
        first.release()
        second = await pool.request("GET", server.url("/2"), [])
        assert await second.read() == b"ok"
        assert second.raw_headers == [("X-Second", "1"), ("Content-Length", "2")]
        second.release()
    assert server.connections == 1


@pytest.mark.parametrize("pause", [0.0, 0.05], ids=["same-read", "once-idle"])
async def test_bytes_after_the_answer_close_the_connection(
    pool: Pool, raw_server: StartRaw, pause: float
) -> None:
    # The answer, then an unsolicited 408: at once, or once the connection sits idle.
    late = b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n"
    server = await raw_server(answer(OK, late, pause=pause))
    async with asyncio.timeout(LIMIT):
        assert await call(pool, "GET", server.url("/1")) == (200, b"ok")
        await eventually(lambda: server.closed_by_client == [0])
        assert await call(pool, "GET", server.url("/2")) == (200, b"ok")  # never the 408
    assert server.connections == 2


async def test_malformed_answer_during_an_upload_is_response_broken(
    pool: Pool, raw_server: StartRaw
) -> None:
    started = asyncio.Event()

    async def reply(request: RawRequest, writer: asyncio.StreamWriter) -> bool:
        return True  # never reached: the upload never ends

    async def endless() -> AsyncIterator[bytes]:
        while True:
            started.set()
            yield b"x" * 1024
            await asyncio.sleep(0.01)

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await writer.drain()
        with contextlib.suppress(ConnectionError):
            await reader.read()  # until the client gives up
        writer.close()

    server = await asyncio.start_server(garbage, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with asyncio.timeout(LIMIT):
            with pytest.raises(ResponseBroken, match="Malformed"):
                await pool.request("POST", URL(f"http://127.0.0.1:{port}/up"), [], stream=endless())
    finally:
        server.close()
        await server.wait_closed()
    assert started.is_set()


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: v\r\n" % n for n in range(200)) + b"\r\n",
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"v" * 20_000 + b"\r\n\r\n",
        b"HTTP/1.1 200 " + b"R" * 20_000 + b"\r\n\r\n",
    ],
    ids=["too-many-headers", "huge-header", "huge-reason"],
)
async def test_oversized_answer_heads_are_refused(
    pool: Pool, raw_server: StartRaw, head: bytes
) -> None:
    server = await raw_server(answer(head))
    async with asyncio.timeout(LIMIT):
        with pytest.raises(ResponseBroken, match="refused|over 8192 bytes"):
            await pool.request("GET", server.url(), [])


async def test_chunked_body_after_another_coding_cut_short_is_broken(
    pool: Pool, raw_server: StartRaw
) -> None:
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n"
    server = await raw_server(answer(head, b"5\r\nabc", close=True))
    async with asyncio.timeout(LIMIT):
        response = await pool.request("GET", server.url(), [])
        try:
            with pytest.raises(ResponseBroken):
                await response.read()
        finally:
            response.release()


async def test_server_that_hangs_up_at_once_gives_a_connection_error_only() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = Pool(limit=2, connect_timeout=2)
    try:
        async with asyncio.timeout(LIMIT):
            for _ in range(20):  # the close races the write: any outcome must be typed
                with pytest.raises(ConnectionError):
                    await pool.request("POST", URL(f"http://127.0.0.1:{port}/"), [], body=b"x")
    finally:
        await pool.close()
        server.close()
        await server.wait_closed()


async def test_a_host_name_connects_whichever_address_answers(
    pool: Pool, raw_server: StartRaw
) -> None:
    # "localhost" may resolve to ::1 first while the server listens on 127.0.0.1 only.
    server = await raw_server(answer(OK))
    async with asyncio.timeout(LIMIT):
        assert await call(pool, "GET", URL(f"http://localhost:{server.port}/")) == (200, b"ok")


async def test_closed_pool_refuses_new_connections(pool: Pool, raw_server: StartRaw) -> None:
    server = await raw_server(answer(OK))
    await pool.close()
    async with asyncio.timeout(LIMIT):
        with pytest.raises(ConnectFailed, match="closed"):
            await pool.request("GET", server.url(), [])
