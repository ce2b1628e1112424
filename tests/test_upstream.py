"""UpstreamClient on its own: per-attempt signing, connect-only retries, error mapping."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Final

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

from proxy.errors import UpstreamTimeout, UpstreamUnavailable
from proxy.sandbox import create_sandbox_app
from proxy.signing import compute_sign
from proxy.upstream import (
    ConnectFailed,
    Pool,
    ResponseBroken,
    StreamFactory,
    UpstreamClient,
    UpstreamRequest,
    create_pool,
)
from proxy.upstream.client import MAX_ATTEMPTS
from tests.conftest import CREDS_A, ReceivedRequest, make_settings, recorder

NOW: Final = 1_700_000_000_000
TASK_LIST: Final = "/openapi/aiagent/task/list"
SINK: Final = "/openapi/test/sink"
BODY: Final = b'{"pageNumber": 1}'


class ScriptedClock:
    """Hands out ``values`` in order (the last repeats); runs ``hooks[n]`` on the n-th call."""

    def __init__(self, values: list[int], hooks: Mapping[int, Callable[[], None]] | None = None):
        self.values = values
        self.hooks = hooks or {}
        self.calls = 0

    def __call__(self) -> int:
        self.calls += 1
        hook = self.hooks.get(self.calls)
        if hook is not None:
            hook()
        return self.values[min(self.calls, len(self.values)) - 1]


@dataclass(slots=True)
class LateServer:
    """A sandbox on a bound loopback port that refuses connections until ``open()``."""

    sock: socket.socket
    server: asyncio.Server
    received: list[ReceivedRequest]
    starting: list[asyncio.Future[None]] = field(default_factory=list)

    @property
    def port(self) -> int:
        port: int = self.sock.getsockname()[1]
        return port

    def open(self) -> None:
        """Start accepting; synchronous so a clock hook can call it between two attempts."""
        self.sock.listen(16)
        self.starting.append(asyncio.ensure_future(self.server.start_serving()))


async def sink(request: web.Request) -> web.Response:
    """Counts the body bytes it got (streamed bodies are not recorded)."""
    return web.json_response({"code": 0, "size": len(await request.read())})


@pytest.fixture
async def late_sandbox() -> AsyncIterator[LateServer]:
    received: list[ReceivedRequest] = []
    app = create_sandbox_app([CREDS_A], clock=lambda: NOW)
    app.middlewares.append(recorder(received))
    app.router.add_route("*", SINK, sink)
    runner = web.AppRunner(app)
    await runner.setup()
    assert runner.server is not None
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    loop = asyncio.get_running_loop()
    server = await loop.create_server(runner.server, sock=sock, start_serving=False)
    try:
        yield LateServer(sock, server, received)
    finally:
        server.close()
        await server.wait_closed()
        await runner.cleanup()
        sock.close()


@pytest.fixture
async def pool() -> AsyncIterator[Pool]:
    pool = create_pool(make_settings(UPSTREAM_CONNECT_TIMEOUT="2"))
    yield pool
    await pool.close()


@pytest.fixture
def refused_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def task_list_request(
    port: int,
    path: str = TASK_LIST,
    *,
    stream: StreamFactory | None = None,
    headers: Mapping[str, str] | None = None,
) -> UpstreamRequest:
    given = {"Content-Type": "application/json"} if headers is None else headers
    return UpstreamRequest(
        "POST",
        URL(f"http://127.0.0.1:{port}{path}"),
        list(given.items()),
        "pageCallTaskInfo",
        CREDS_A,
        body=None if stream else BODY,
        stream=stream,
    )


async def test_connect_failure_is_retried_with_a_fresh_ts_and_sign(
    pool: Pool, late_sandbox: LateServer
) -> None:
    # The first ts is two minutes stale: reusing it on the retry would earn a 1004.
    clock = ScriptedClock([NOW - 120_000, NOW], hooks={2: late_sandbox.open})
    client = UpstreamClient(pool, timeout=5, clock=clock)
    async with client.open(task_list_request(late_sandbox.port)) as response:
        answer = json.loads(await response.read())
    assert answer["code"] == 0, answer
    assert clock.calls == 2
    [got] = late_sandbox.received
    assert got.headers["ts"] == str(NOW)
    assert got.headers["sign"] == compute_sign(CREDS_A, "pageCallTaskInfo", NOW, BODY)


async def test_streamed_body_is_sent_whole_after_a_connect_retry(
    pool: Pool, late_sandbox: LateServer
) -> None:
    pieces = [b"a" * 1000, b"b" * 2000, b"c" * 3]

    async def body() -> AsyncIterator[bytes]:
        for piece in pieces:
            yield piece

    clock = ScriptedClock([NOW - 1, NOW], hooks={2: late_sandbox.open})
    client = UpstreamClient(pool, timeout=5, clock=clock)
    request = task_list_request(
        late_sandbox.port,
        SINK,
        stream=body,
        headers={"Content-Type": "multipart/form-data; boundary=x"},
    )
    async with client.open(request) as response:
        answer = json.loads(await response.read())
    assert answer["size"] == sum(map(len, pieces))
    [got] = late_sandbox.received
    assert got.headers["sign"] == compute_sign(
        CREDS_A, "pageCallTaskInfo", NOW, None, multipart=True
    )


async def test_connect_failures_give_up_after_max_attempts_as_unavailable(
    pool: Pool, refused_port: int
) -> None:
    clock = ScriptedClock([NOW, NOW + 1, NOW + 2, NOW + 3])
    client = UpstreamClient(pool, timeout=5, clock=clock)
    with pytest.raises(UpstreamUnavailable) as caught:
        async with client.open(task_list_request(refused_port)):
            pytest.fail("no response was expected")
    assert clock.calls == MAX_ATTEMPTS == 3
    assert caught.value.status == 502
    assert isinstance(caught.value.__cause__, ConnectFailed)
    assert not caught.value.sent  # nothing reached nxlink: safe to send again


@pytest.fixture
async def hang_up_server() -> AsyncIterator[tuple[int, list[int]]]:
    """A server that reads the request head, then closes without answering; counts connections."""
    connections: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await reader.readuntil(b"\r\n\r\n")
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port: int = server.sockets[0].getsockname()[1]
    try:
        yield port, connections
    finally:
        server.close()
        await server.wait_closed()


async def test_failure_after_the_request_was_sent_is_not_retried(
    pool: Pool, hang_up_server: tuple[int, list[int]]
) -> None:
    port, connections = hang_up_server
    clock = ScriptedClock([NOW])
    client = UpstreamClient(pool, timeout=5, clock=clock)
    with pytest.raises(UpstreamUnavailable) as caught:
        async with client.open(task_list_request(port)):
            pytest.fail("no response was expected")
    assert (clock.calls, len(connections)) == (1, 1)
    assert isinstance(caught.value.__cause__, ResponseBroken)
    assert (caught.value.status, caught.value.code) == (502, "UPSTREAM_UNAVAILABLE")
    assert caught.value.sent  # nxlink may have acted on it


async def test_upstream_error_status_is_returned_not_retried(
    pool: Pool, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> None:
    calls: list[int] = []

    async def failing(request: web.Request) -> web.Response:
        calls.append(1)
        return web.Response(status=503, text="down for maintenance")

    app = web.Application()
    app.router.add_post(TASK_LIST, failing)
    server = await aiohttp_server(app)
    assert server.port is not None
    client = UpstreamClient(pool, timeout=5, clock=ScriptedClock([NOW]))
    async with client.open(task_list_request(server.port)) as response:
        assert response.status == 503
        assert (await response.read()).decode() == "down for maintenance"
    assert calls == [1]


@pytest.fixture
async def stalled_server() -> AsyncIterator[int]:
    """A server that reads the request and never answers (until the test ends)."""
    done = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await done.wait()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        done.set()
        server.close()
        await server.wait_closed()


async def test_no_response_headers_within_the_timeout_is_upstream_timeout(
    pool: Pool, stalled_server: int
) -> None:
    clock = ScriptedClock([NOW])
    client = UpstreamClient(pool, timeout=0.2, clock=clock)
    with pytest.raises(UpstreamTimeout) as caught:
        async with client.open(task_list_request(stalled_server)):
            pytest.fail("no response was expected")
    assert (caught.value.status, caught.value.code) == (504, "UPSTREAM_TIMEOUT")
    assert clock.calls == 1
    assert caught.value.sent  # written, then no answer: nxlink may have acted on it


async def test_a_timeout_waiting_for_a_pool_slot_sent_nothing(late_sandbox: LateServer) -> None:
    late_sandbox.open()
    pool = create_pool(make_settings(UPSTREAM_MAX_CONNECTIONS="1"))
    client = UpstreamClient(pool, timeout=0.2, clock=ScriptedClock([NOW]))
    try:
        async with client.open(task_list_request(late_sandbox.port)):  # holds the one slot
            with pytest.raises(UpstreamTimeout) as caught:
                async with client.open(task_list_request(late_sandbox.port)):
                    pytest.fail("no response was expected")
    finally:
        await pool.close()
    assert (caught.value.status, caught.value.code) == (504, "UPSTREAM_TIMEOUT")
    assert not caught.value.sent
    assert len(late_sandbox.received) == 1


async def test_a_timeout_in_the_tls_handshake_sent_nothing(pool: Pool, stalled_server: int) -> None:
    client = UpstreamClient(pool, timeout=0.2, clock=ScriptedClock([NOW]))
    request = dataclasses.replace(
        task_list_request(stalled_server), url=URL(f"https://127.0.0.1:{stalled_server}/x")
    )
    with pytest.raises(UpstreamTimeout) as caught:
        async with client.open(request):
            pytest.fail("no response was expected")
    assert (caught.value.status, caught.value.code) == (504, "UPSTREAM_TIMEOUT")
    assert not caught.value.sent


@pytest.mark.parametrize(
    ("given", "absent"),
    [
        ({}, {"Accept-Encoding", "User-Agent", "Content-Type", "Accept"}),
        ({"Accept-Encoding": "br", "Accept": "*/*"}, {"User-Agent", "Content-Type"}),
    ],
)
async def test_client_adds_no_header_the_caller_did_not_give(
    pool: Pool,
    late_sandbox: LateServer,
    given: dict[str, str],
    absent: set[str],
) -> None:
    late_sandbox.open()
    client = UpstreamClient(pool, timeout=5, clock=ScriptedClock([NOW]))
    async with client.open(task_list_request(late_sandbox.port, headers=given)) as response:
        assert (json.loads(await response.read()))["code"] == 0
    got = late_sandbox.received[0].headers
    for name in absent:
        assert name not in got, name
    for name, value in given.items():
        assert got.getall(name) == [value]
    assert got["Host"] == f"127.0.0.1:{late_sandbox.port}"
