"""The whole gateway (its real runner, as ``serve`` starts it) in front of a hostile upstream:
other tenants and the health check keep being served, broken streams reach the client as a
cut and one log line, and clients that leave free their upstream slots."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final

import aiohttp
import pytest

from proxy.app import create_app
from proxy.logs import RequestIdFilter
from proxy.serve import bound_port, start_site
from proxy.tenants import Registry
from tests.conftest import CREDS_A, CREDS_B, KEY_A, KEY_B, MakeUpstream, make_settings, make_tenant
from tests.hostile import Peer, RawUpstream, raw_upstream
from tests.test_hostile_upstream import A_KB, CHUNKED, answer_then_hold, endless_after

TASK_LIST: Final = "/openapi/aiagent/task/list"
STALLED: Final = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhel"


@asynccontextmanager
async def gateway(raw: RawUpstream, healthy: str, **env: str) -> AsyncIterator[str]:
    """The gateway serving tenant A on ``raw`` and tenant B on the ``healthy`` upstream;
    yields its base URL."""
    tenants = [
        make_tenant("tenant-a", KEY_A, raw.base_url, CREDS_A),
        make_tenant("tenant-b", KEY_B, healthy, CREDS_B),
    ]
    app = create_app(make_settings(**env), Registry(tenants))
    runner = await start_site(app, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{bound_port(runner)}"
    finally:
        await runner.cleanup()


async def forward(session: aiohttp.ClientSession, base: str, key: str) -> int:
    """One forwarded POST; its status once the answer's body was read."""
    async with session.post(base + TASK_LIST, headers={"x-api-key": key}, json={}) as answer:
        await answer.read()
        return answer.status


async def peers(raw: RawUpstream, count: int) -> list[Peer]:
    """The first ``count`` connections the upstream accepted, once it has (bounded wait)."""
    async with asyncio.timeout(5):
        while len(raw.peers) < count:
            await asyncio.sleep(0.01)
    return raw.peers[:count]


async def test_health_and_other_tenants_are_served_while_an_upstream_sends_an_endless_header(
    make_upstream: MakeUpstream,
) -> None:
    healthy = await make_upstream()
    script = endless_after(b"HTTP/1.1 200 OK\r\nX-Endless: ", A_KB * 64)
    async with raw_upstream(script) as raw, gateway(raw, healthy.base_url) as base:
        async with aiohttp.ClientSession() as session:
            hostile = [asyncio.create_task(forward(session, base, KEY_A)) for _ in range(3)]
            started = time.monotonic()
            async with session.get(base + "/healthz") as health:
                assert health.status == 200
            assert await forward(session, base, KEY_B) == 200
            assert time.monotonic() - started < 1.0
            assert await asyncio.gather(*hostile) == [502, 502, 502]


@pytest.mark.slow
async def test_stalled_bodies_do_not_starve_another_tenant_once_their_clients_leave(
    make_upstream: MakeUpstream,
) -> None:
    healthy = await make_upstream()
    env = {"UPSTREAM_MAX_CONNECTIONS": "4", "UPSTREAM_READ_TIMEOUT": "30"}
    async with raw_upstream(answer_then_hold(STALLED)) as raw:
        async with gateway(raw, healthy.base_url, **env) as base:
            clients = [aiohttp.ClientSession() for _ in range(4)]
            answers = [
                await client.post(base + TASK_LIST, headers={"x-api-key": KEY_A}, json={})
                for client in clients
            ]
            assert [answer.status for answer in answers] == [200] * 4  # heads, then nothing
            stalled = await peers(raw, 4)
            for answer, client in zip(answers, clients, strict=True):
                answer.close()  # the clients give up: their connections close
                await client.close()
            async with asyncio.timeout(1.0):
                for peer in stalled:
                    await peer.ended.wait()  # each upstream exchange was closed
            async with aiohttp.ClientSession() as session, asyncio.timeout(2.0):
                assert await forward(session, base, KEY_B) == 200


@pytest.mark.parametrize(
    "answer",
    [CHUNKED + b"5\r\nhello\r\nzz\r\n", STALLED],
    ids=["malformed-chunk-with-the-head", "stalled-past-the-read-timeout"],
)
async def test_a_broken_stream_is_a_cut_for_the_client_and_one_log_line(
    make_upstream: MakeUpstream, caplog: pytest.LogCaptureFixture, answer: bytes
) -> None:
    healthy = await make_upstream()
    env = {"UPSTREAM_READ_TIMEOUT": "0.5"}
    caplog.set_level(logging.INFO)
    caplog.handler.addFilter(RequestIdFilter())  # as the gateway's own log handler does
    async with raw_upstream(answer_then_hold(answer)) as raw:
        async with gateway(raw, healthy.base_url, **env) as base:
            async with aiohttp.ClientSession() as session, asyncio.timeout(3.0):
                post = session.post(base + TASK_LIST, headers={"x-api-key": KEY_A}, json={})
                async with post as got:
                    assert got.status == 200  # the head went out before the body broke
                    with pytest.raises(aiohttp.ClientPayloadError):
                        await got.read()
            await asyncio.wait_for(raw.peers[0].ended.wait(), 1.0)  # upstream side closed
    problems = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in problems if "stream cut" in r.getMessage()]
    assert len(problems) == 1, [r.getMessage() for r in problems]
    assert problems[0].exc_info is None
    assert getattr(problems[0], "request_id", "-") != "-"


APPEND: Final = "/api/openapi/append-numbers"
APPEND_CALL: Final = {
    "taskId": "task-leaving-client",
    "countryCode": "86",
    "phoneNumbers": [{"phoneNumber": "13900139001", "params": [{"name": "a", "value": "b"}]}],
}
APPENDED: Final = b'{"code":0,"message":"success"}'


async def test_a_client_leaving_does_not_cancel_append_batches_in_flight(
    make_upstream: MakeUpstream,
) -> None:
    healthy = await make_upstream()
    release = asyncio.Event()

    async def script(peer: Peer) -> None:
        while await peer.request():
            await release.wait()
            await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(APPENDED))
            await peer.send(APPENDED)

    headers = {"x-api-key": KEY_A, "Idempotency-Key": "leaving-1"}
    async with raw_upstream(script) as raw, gateway(raw, healthy.base_url) as base:
        async with aiohttp.ClientSession() as session:
            leaving = asyncio.create_task(
                session.post(base + APPEND, json=APPEND_CALL, headers=headers)
            )
            [peer] = await peers(raw, 1)
            async with asyncio.timeout(5):
                while not peer.heads:
                    await asyncio.sleep(0.01)
            leaving.cancel()  # the client goes away while its batch is at nxlink
        release.set()
        async with aiohttp.ClientSession() as session, asyncio.timeout(5):
            while True:
                async with session.post(base + APPEND, json=APPEND_CALL, headers=headers) as again:
                    if again.status != 409:  # 409: the first run is still finishing
                        break
                await asyncio.sleep(0.02)
            assert again.status == 200
            assert again.headers.get("Idempotent-Replayed") == "true"
    assert sum(len(p.heads) for p in raw.peers) == 1  # the batch went to nxlink once
