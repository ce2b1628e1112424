"""Quotas: calendar windows in QUOTA_TIMEZONE, numbers reserved whole before sending and given
back when nxlink refuses them, requests counted per forwarded or append call."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, Final
from zoneinfo import ZoneInfo

import pytest
from aiohttp import web

from proxy.app import create_app
from proxy.config import Quotas
from proxy.nxlink import APPEND_PATH
from proxy.quotas import QuotaBook, window_of
from proxy.state import MemoryState
from proxy.state.fallback import RETRY_EVERY, ResilientState
from proxy.tenants import Registry, Tenant
from tests.conftest import CREDS_A, KEY_A, Client, Upstream, make_settings, make_tenant
from tests.processes import free_port
from tests.state_fakes import FakeClock, SwitchableState

AiohttpClient = Callable[[web.Application], Awaitable[Client]]
URL = "/api/openapi/append-numbers"
TASK_LIST = "/openapi/aiagent/task/list"


@pytest.mark.parametrize(
    ("zone", "local", "name", "label", "seconds", "resets"),
    [
        (
            "UTC",
            "2026-12-01T10:00",
            "numbersPerDay",
            "2026-12-01",
            86400,
            "2026-12-02T00:00:00+00:00",
        ),
        (
            "Asia/Shanghai",
            "2026-12-31T23:30",
            "requestsPerDay",
            "2026-12-31",
            86400,
            "2027-01-01T00:00:00+08:00",
        ),
        (
            "Asia/Shanghai",
            "2026-12-31T23:30",
            "numbersPerMonth",
            "2026-12",
            31 * 86400,
            "2027-01-01T00:00:00+08:00",
        ),
        (
            "UTC",
            "2027-02-10T00:00",
            "requestsPerMonth",
            "2027-02",
            28 * 86400,
            "2027-03-01T00:00:00+00:00",
        ),
        (
            "Europe/Berlin",
            "2026-03-29T12:00",
            "numbersPerDay",
            "2026-03-29",
            23 * 3600,
            "2026-03-30T00:00:00+02:00",
        ),
    ],
)
def test_windows_are_calendar_days_and_months_in_the_quota_time_zone(
    zone: str, local: str, name: str, label: str, seconds: int, resets: str
) -> None:
    now = datetime.fromisoformat(local).replace(tzinfo=ZoneInfo(zone))
    window = window_of(name, now)
    assert (window.label, window.seconds) == (label, seconds)
    assert window.resets_at.isoformat() == resets


def with_quotas(tenant: Tenant, **quotas: int) -> Tenant:
    return dataclasses.replace(tenant, quotas=Quotas(**quotas))


async def gateway_on(
    aiohttp_client: AiohttpClient, backend: MemoryState, tenant: Tenant, **env: str
) -> Client:
    app = create_app(make_settings(**env), Registry([tenant]), open_backend=lambda _url: backend)
    return await aiohttp_client(app)


async def append(client: Client, phones: list[str]) -> tuple[int, Any, Any]:
    body = {"taskId": "t", "phoneNumbers": phones}
    response = await client.post(URL, json=body, headers={"x-api-key": KEY_A})
    return response.status, response.headers, await response.json()


def phones(start: int, count: int) -> list[str]:
    return [f"1380000{i:04d}" for i in range(start, start + count)]


def today_key(tenant: Tenant, name: str) -> str:
    return f"q:{tenant.id}:{name}:{datetime.now(ZoneInfo('UTC')).date().isoformat()}"


def sent(upstream: Upstream) -> int:
    bodies = [json.loads(r.body) for r in upstream.received if r.path == APPEND_PATH]
    return sum(len(b["list"]) for b in bodies)


async def test_an_append_that_does_not_fit_is_refused_whole_with_the_quota(
    aiohttp_client: AiohttpClient, upstream: Upstream
) -> None:
    tenant = with_quotas(make_tenant("a", KEY_A, upstream.base_url, CREDS_A), numbers_per_day=5)
    backend = MemoryState()
    client = await gateway_on(aiohttp_client, backend, tenant)
    assert (await append(client, phones(0, 3)))[0] == 200
    status, headers, body = await append(client, phones(3, 3))
    assert (status, body["error"]) == (429, "QUOTA_EXCEEDED")
    quota = body["quota"]
    assert {k: quota[k] for k in ("name", "limit", "used", "remaining")} == {
        "name": "numbersPerDay",
        "limit": 5,
        "used": 3,
        "remaining": 2,
    }
    resets = datetime.fromisoformat(quota["resetsAt"])
    wait = (resets - datetime.now(resets.tzinfo)).total_seconds()
    assert 0 < int(headers["Retry-After"]) <= 86400 and abs(int(headers["Retry-After"]) - wait) < 5
    assert sent(upstream) == 3
    assert (await append(client, phones(3, 2)))[0] == 200
    assert await backend.quota_used([today_key(tenant, "numbersPerDay")]) == [5]


async def test_numbers_nxlink_did_not_accept_are_given_back(
    aiohttp_client: AiohttpClient,
) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    tenant = with_quotas(make_tenant("a", KEY_A, down, CREDS_A), numbers_per_month=4)
    backend = MemoryState()
    client = await gateway_on(aiohttp_client, backend, tenant)
    status, _headers, body = await append(client, phones(0, 4))
    assert status == 200 and body["data"]["failCount"] == 4
    month = datetime.now(ZoneInfo("UTC")).strftime("%Y-%m")
    assert await backend.quota_used([f"q:{tenant.id}:numbersPerMonth:{month}"]) == [0]
    assert (await append(client, phones(0, 4)))[0] == 200


async def test_requests_quota_counts_forwarded_and_append_calls_only(
    aiohttp_client: AiohttpClient, upstream: Upstream
) -> None:
    tenant = make_tenant("a", KEY_A, upstream.base_url, CREDS_A)
    client = await gateway_on(aiohttp_client, MemoryState(), tenant, QUOTA_REQUESTS_PER_DAY="2")
    headers = {"x-api-key": KEY_A}
    for _ in range(3):
        assert (await client.get("/api/openapi/status", headers=headers)).status == 200
    assert (await client.post(TASK_LIST, data=b"{}", headers=headers)).status == 200
    assert (await append(client, phones(0, 1)))[0] == 200
    refused = await client.post(TASK_LIST, data=b"{}", headers=headers)
    body = await refused.json()
    assert (refused.status, body["error"], body["quota"]["name"]) == (
        429,
        "QUOTA_EXCEEDED",
        "requestsPerDay",
    )
    assert len(upstream.received) == 2


async def test_a_tenants_own_quota_beats_the_default(
    aiohttp_client: AiohttpClient, upstream: Upstream
) -> None:
    tenant = with_quotas(make_tenant("a", KEY_A, upstream.base_url, CREDS_A), numbers_per_day=10)
    client = await gateway_on(aiohttp_client, MemoryState(), tenant, QUOTA_NUMBERS_PER_DAY="1")
    assert (await append(client, phones(0, 8)))[0] == 200


def book_on(state: ResilientState, clock: FakeClock, **env: str) -> QuotaBook:
    return QuotaBook(make_settings(**env), state, clock=clock)


def window_keys(tenant: Tenant, name: str, *labels: str) -> list[str]:
    return [f"q:{tenant.id}:{name}:{label}" for label in labels]


async def test_numbers_given_back_after_midnight_go_to_the_windows_they_were_reserved_in() -> None:
    zone = ZoneInfo("Asia/Shanghai")
    new_year = datetime(2027, 1, 1, tzinfo=zone).timestamp()
    backend, clock = MemoryState(), FakeClock(new_year - 1)
    book = book_on(ResilientState(backend), clock, QUOTA_TIMEZONE="Asia/Shanghai")
    tenant = with_quotas(
        make_tenant("a", KEY_A, "http://127.0.0.1:1", CREDS_A),
        numbers_per_day=10,
        numbers_per_month=100,
    )
    before_midnight = await book.reserve(tenant, "numbers", 4)
    clock.now = new_year + 1
    first, second = [await book.reserve(tenant, "numbers", n) for n in (2, 3)]
    await book.give_back(before_midnight, 3)
    await book.give_back(first, 50)  # never more than it reserved
    days = window_keys(tenant, "numbersPerDay", "2026-12-31", "2027-01-01")
    months = window_keys(tenant, "numbersPerMonth", "2026-12", "2027-01")
    assert await backend.quota_used(days + months) == [1, 3, 1, 3]
    assert second.amount == 3


NOON: Final = datetime(2026, 12, 2, 12, tzinfo=ZoneInfo("UTC")).timestamp()


async def test_a_reservation_taken_in_memory_is_given_back_there_once_shared_again() -> None:
    shared, state_clock = SwitchableState(), FakeClock()
    state = ResilientState(shared, clock=state_clock)
    book = book_on(state, FakeClock(NOON))
    tenant = with_quotas(make_tenant("a", KEY_A, "http://127.0.0.1:1", CREDS_A), numbers_per_day=9)
    key = window_keys(tenant, "numbersPerDay", "2026-12-02")
    shared.down = True
    in_memory = await book.reserve(tenant, "numbers", 4)
    shared.down = False
    state_clock.now += RETRY_EVERY
    await book.reserve(tenant, "numbers", 1)
    assert state.available
    await book.give_back(in_memory, 3)
    assert await state.local.quota_used(key) == [1]
    assert await shared.quota_used(key) == [1]


async def test_a_shared_reservation_is_never_given_back_to_memory() -> None:
    shared = SwitchableState()
    state = ResilientState(shared, clock=FakeClock())
    book = book_on(state, FakeClock(NOON))
    tenant = with_quotas(make_tenant("a", KEY_A, "http://127.0.0.1:1", CREDS_A), numbers_per_day=9)
    key = window_keys(tenant, "numbersPerDay", "2026-12-02")
    on_shared = await book.reserve(tenant, "numbers", 4)
    shared.down = True
    await book.reserve(tenant, "numbers", 2)  # in memory now
    await book.give_back(on_shared, 3)
    shared.down = False
    assert await state.local.quota_used(key) == [2]
    assert await shared.quota_used(key) == [4]  # kept charged: never budget it did not have
