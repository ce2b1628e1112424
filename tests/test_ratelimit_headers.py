"""RateLimit-Policy / RateLimit on the answers to a tenant with a rate limit or a quota."""

from __future__ import annotations

import asyncio
import dataclasses

from proxy.config import Quotas
from proxy.ratelimit_headers import LimitState, bucket_window
from proxy.tenants import Limits
from tests.conftest import (
    CREDS_A,
    CREDS_B,
    KEY_A,
    KEY_B,
    MakeGateway,
    MakeUpstream,
    Upstream,
    make_tenant,
)
from tests.processes import HELD_ACTION, HELD_PATH, Gate

TASK_LIST = "/openapi/aiagent/task/list"
APPEND = "/api/openapi/append-numbers"


def test_headers_are_structured_field_lists_one_item_per_limit() -> None:
    state = LimitState()
    state.policy("rate", 50, 1)
    state.policy("numbersPerDay", 5000, 86400)
    state.learn("rate", 49, 0.02)
    assert state.headers() == [
        ("RateLimit-Policy", '"rate";q=50;w=1, "numbersPerDay";q=5000;w=86400'),
        ("RateLimit", '"rate";r=49;t=1'),
    ]


def test_a_bucket_is_its_burst_per_refill_time() -> None:
    assert bucket_window(50.0, 50) == 1
    assert bucket_window(0.4, 2) == 5


async def test_a_rate_limited_tenant_gets_the_headers_and_its_429_too(
    upstream: Upstream, make_gateway: MakeGateway
) -> None:
    limited = make_tenant("a", KEY_A, upstream.base_url, CREDS_A, limits=Limits(0.4, 2))
    free = make_tenant("b", KEY_B, upstream.base_url, CREDS_B)
    client = await make_gateway([limited, free])
    answers = [
        await client.post(TASK_LIST, data=b"{}", headers={"x-api-key": KEY_A}) for _ in range(3)
    ]
    assert [a.status for a in answers] == [200, 200, 429]
    assert {a.headers["RateLimit-Policy"] for a in answers} == {'"rate";q=2;w=5'}
    assert answers[0].headers["RateLimit"] == '"rate";r=1;t=3'
    assert answers[2].headers["RateLimit"] == f'"rate";r=0;t={answers[2].headers["Retry-After"]}'
    other = await client.post(TASK_LIST, data=b"{}", headers={"x-api-key": KEY_B})
    assert "RateLimit-Policy" not in other.headers and "RateLimit" not in other.headers


async def test_a_streamed_answer_carries_the_headers(
    make_upstream: MakeUpstream, make_gateway: MakeGateway
) -> None:
    gate = Gate()
    upstream = await make_upstream(extra={HELD_PATH: gate.handler})
    tenant = make_tenant("a", KEY_A, upstream.base_url, CREDS_A, limits=Limits(10.0, 10))
    client = await make_gateway([tenant])
    pending = asyncio.create_task(
        client.get(HELD_PATH, headers={"x-api-key": KEY_A, **HELD_ACTION})
    )
    await gate.wait_arrived()
    gate.release.set()
    streamed = await pending
    assert await streamed.read() == b"first-second"
    assert streamed.headers["RateLimit-Policy"] == '"rate";q=10;w=1'
    assert streamed.headers["RateLimit"] == '"rate";r=9;t=1'


async def test_quotas_are_items_too_with_what_is_left(
    upstream: Upstream, make_gateway: MakeGateway
) -> None:
    tenant = dataclasses.replace(
        make_tenant("a", KEY_A, upstream.base_url, CREDS_A), quotas=Quotas(numbers_per_day=5)
    )
    client = await make_gateway([tenant], QUOTA_REQUESTS_PER_MONTH="100")
    body = {"taskId": "t", "phoneNumbers": ["13800000001", "13800000002"]}
    answer = await client.post(APPEND, json=body, headers={"x-api-key": KEY_A})
    assert answer.status == 200
    policy = answer.headers["RateLimit-Policy"]
    assert policy.startswith('"numbersPerDay";q=5;w=86400, "requestsPerMonth";q=100;w=')
    numbers, requests = answer.headers["RateLimit"].split(", ")
    assert numbers.startswith('"numbersPerDay";r=3;t=')
    assert requests.startswith('"requestsPerMonth";r=99;t=')
    assert 0 < int(numbers.rpartition("=")[2]) <= 86400
