"""The state backend as the gateway uses it: no call when nothing needs one, this process's
memory while the backend is down, and sharing again once it answers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from proxy.app import create_app
from proxy.state import StateUnavailable, open_state
from proxy.state.base import RateDecision, StateBackend
from proxy.state.fallback import LOG_EVERY, RETRY_EVERY, ResilientState
from proxy.tenants import Limits, Registry
from tests.conftest import CREDS_A, KEY_A, Client, Upstream, make_settings, make_tenant
from tests.hostile import Peer, raw_upstream
from tests.state_fakes import FakeClock, SwitchableState

TASK_LIST = "/openapi/aiagent/task/list"


AiohttpClient = Callable[[web.Application], Awaitable[Client]]


async def gateway_on(
    aiohttp_client: AiohttpClient, backend: SwitchableState, upstream: Upstream, limits: Limits
) -> Client:
    tenant = make_tenant("tenant-a", KEY_A, upstream.base_url, CREDS_A, limits=limits)
    app = create_app(make_settings(), Registry([tenant]), open_backend=lambda _url: backend)
    return await aiohttp_client(app)


async def post(client: Client, path: str = TASK_LIST) -> int:
    response = await client.post(path, data=b"{}", headers={"x-api-key": KEY_A})
    await response.read()
    return response.status


def state_errors(text: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "nxlink_proxy_state_errors_total":
                return sample.value
    raise AssertionError("no nxlink_proxy_state_errors_total")


async def test_a_tenant_without_limits_makes_no_state_call(
    aiohttp_client: AiohttpClient, upstream: Upstream
) -> None:
    backend = SwitchableState()
    client = await gateway_on(aiohttp_client, backend, upstream, Limits())
    assert [await post(client) for _ in range(5)] == [200] * 5
    status = await client.get("/api/openapi/status", headers={"x-api-key": KEY_A})
    assert status.status == 200
    assert backend.calls == []
    assert len(upstream.received) == 5


async def test_a_limited_tenant_goes_through_the_backend(
    aiohttp_client: AiohttpClient, upstream: Upstream
) -> None:
    backend = SwitchableState()
    client = await gateway_on(aiohttp_client, backend, upstream, Limits(100.0, 100, 4))
    assert await post(client) == 200
    assert backend.calls == ["acquire_slot", "take_token", "release_slot"]


async def test_backend_down_limits_go_on_in_memory_and_readyz_says_so(
    aiohttp_client: AiohttpClient, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    backend = SwitchableState()
    client = await gateway_on(aiohttp_client, backend, upstream, Limits(0.01, 2))
    backend.down = True
    with caplog.at_level(logging.WARNING, logger="proxy.state.fallback"):
        assert [await post(client) for _ in range(3)] == [200, 200, 429]
    warnings = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(warnings) == 1
    ready = await client.get("/readyz")
    assert ready.status == 200
    assert (await ready.json())["data"]["state"] == "unavailable"
    metrics = await (await client.get("/metrics")).text()
    assert state_errors(metrics) >= 1
    backend.down = False
    assert (await (await client.get("/readyz")).json())["data"]["state"] == "ok"


async def test_the_backend_is_tried_again_after_a_few_seconds_and_shared_again() -> None:
    backend, clock = SwitchableState(), FakeClock()
    errors: list[int] = []
    state = ResilientState(backend, on_error=lambda: errors.append(1), clock=clock)
    backend.down = True
    first = await state.shared_or_local(lambda s: s.take_token("k", 1.0, 1, 0.0))
    assert first.allowed and errors == [1] and not state.available
    backend.down = False
    calls = len(backend.calls)
    await state.shared_or_local(lambda s: s.take_token("k", 1.0, 1, 0.0))
    assert len(backend.calls) == calls  # still in memory until the retry time
    clock.now += RETRY_EVERY
    shared = await state.shared_or_local(lambda s: s.take_token("k", 1.0, 1, 0.0))
    assert shared.allowed and state.available  # the shared bucket had its token left
    assert backend.calls[-1] == "take_token"
    assert RETRY_EVERY <= 5


async def test_the_unavailable_warning_is_logged_at_most_once_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend, clock = SwitchableState(), FakeClock()
    state = ResilientState(backend, clock=clock)
    backend.down = True
    with caplog.at_level(logging.WARNING, logger="proxy.state.fallback"):
        for _ in range(10):
            clock.now += RETRY_EVERY
            await state.shared_or_local(lambda s: s.take_token("k", 1.0, 1, 0.0))
        clock.now += LOG_EVERY
        await state.shared_or_local(lambda s: s.take_token("k", 1.0, 1, 0.0))
    assert sum("unavailable" in r.getMessage() for r in caplog.records) == 2


async def take(backend: StateBackend) -> RateDecision:
    return await backend.take_token("k", 1.0, 100, 0.0)


async def test_after_the_retry_time_one_call_tries_the_backend_and_the_others_stay_local() -> None:
    async with raw_upstream(Peer.hold) as silent:  # a "Redis" that accepts and never answers
        backend, clock = open_state(f"redis://127.0.0.1:{silent.port}/0"), FakeClock()
        state = ResilientState(backend, clock=clock)
        with pytest.raises(StateUnavailable):
            await state.shared_only(lambda s: s.ping(), timeout=0.05)
        clock.now += RETRY_EVERY
        connections = len(silent.peers)
        calls = [asyncio.create_task(state.shared_or_local(take)) for _ in range(20)]
        done, pending = await asyncio.wait(calls, timeout=0.5)
        assert (len(done), len(pending)) == (19, 1)  # the one trying waits on the backend
        assert all(call.result().allowed for call in done)
        assert len(silent.peers) - connections <= 1
        for call in pending:
            call.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await backend.close()
