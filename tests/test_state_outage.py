"""A real redis-server stopped under two gateways and started again: limits go on per process,
Idempotency-Key requests get 503, /readyz says so, and within 5 s of Redis answering the
gateways share their limits again."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web

from proxy.app import create_app
from proxy.tenants import Limits, Registry
from tests.conftest import CREDS_A, KEY_A, Client, Upstream, make_settings, make_tenant
from tests.processes import eventually
from tests.redis_server import RedisServer

AiohttpClient = Callable[[web.Application], Awaitable[Client]]
TASK_LIST = "/openapi/aiagent/task/list"
APPEND = "/api/openapi/append-numbers"


async def status_of(client: Client) -> int:
    response = await client.post(TASK_LIST, data=b"{}", headers={"x-api-key": KEY_A})
    await response.read()
    return response.status


async def state_of(client: Client) -> str:
    answer = await client.get("/readyz")
    assert answer.status == 200
    state: str = (await answer.json())["data"]["state"]
    return state


@pytest.mark.slow
async def test_redis_stopped_and_started_again_under_two_gateways(
    own_redis: RedisServer, upstream: Upstream, aiohttp_client: AiohttpClient
) -> None:
    tenant = make_tenant("tenant-a", KEY_A, upstream.base_url, CREDS_A, limits=Limits(0.01, 3))
    settings = make_settings(STATE_URL=own_redis.url)
    one, two = [await aiohttp_client(create_app(settings, Registry([tenant]))) for _ in range(2)]
    shared = [await status_of(client) for client in (one, two, one, two)]
    assert shared == [200, 200, 200, 429]

    own_redis.stop()
    keyed = await one.post(
        APPEND,
        json={"taskId": "t", "phoneNumbers": ["13800000001"]},
        headers={"x-api-key": KEY_A, "Idempotency-Key": "outage-1"},
    )
    assert keyed.status == 503 and (await keyed.json())["error"] == "STATE_UNAVAILABLE"
    assert [await status_of(one) for _ in range(3)] == [200, 200, 429]  # this process's bucket
    assert await state_of(one) == "unavailable"
    metrics = await (await one.get("/metrics")).text()
    assert "nxlink_proxy_state_errors_total 0.0" not in metrics

    own_redis.start()  # the same port, an empty database
    back = time.monotonic()

    async def shared_again() -> bool:
        return await state_of(one) == "ok" and await state_of(two) == "ok"

    await eventually(shared_again, what="both gateways to see Redis again", timeout=5)
    assert time.monotonic() - back <= 5
    again = [await status_of(client) for client in (one, two, one, two)]
    assert again == [200, 200, 200, 429]  # one bucket again, new in the empty database
