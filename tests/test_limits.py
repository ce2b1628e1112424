"""Per-tenant limits: the token bucket (429 RATE_LIMITED), the in-flight cap (429 TENANT_BUSY)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestServer

from proxy import cli
from proxy.app import create_app
from proxy.appkeys import APPEND_RUNS, LIMITER, METRICS
from proxy.config import Settings, parse_settings
from proxy.errors import TooManyRequests
from proxy.limits import SLOT_TTL, SPARE_TTL, Limiter, TenantPolicy, prefetch_count
from proxy.state import MemoryState
from proxy.state.fallback import ResilientState
from proxy.tenants import Limits, Tenant, load_registry
from tests.conftest import (
    CREDS_A,
    CREDS_B,
    KEY_A,
    KEY_B,
    Client,
    MakeGateway,
    MakeUpstream,
    Upstream,
    make_settings,
    make_tenant,
)
from tests.holding_nxlink import HoldingNxlink
from tests.processes import (
    HELD_ACTION,
    HELD_PATH,
    Gate,
    eventually,
    free_port,
    tenant_entry,
    write_tenants,
)
from tests.state_fakes import FakeClock, SwitchableState

TASK_LIST = "/openapi/aiagent/task/list"
APPEND = "/api/openapi/append-numbers"


async def task_list(client: Client, key: str) -> ClientResponse:
    """A signed-and-forwarded call, its body read."""
    response = await client.post(
        TASK_LIST, data=b"{}", headers={"x-api-key": key, "Content-Type": "application/json"}
    )
    await response.read()
    return response


def tenant_a(upstream: Upstream, limits: Limits | None = None) -> Tenant:
    return make_tenant("tenant-a", KEY_A, upstream.base_url, CREDS_A, limits=limits)


# --- the bucket and the policy ---------------------------------------------------------------


def limiter_of(settings: Settings, clock: FakeClock | None = None) -> Limiter:
    """A limiter on a fresh memory backend."""
    return Limiter(settings, ResilientState(MemoryState()), clock or FakeClock())


def test_tenant_override_beats_the_global_limit() -> None:
    settings = make_settings(
        RATE_LIMIT_RPS="10", RATE_LIMIT_BURST="20", MAX_INFLIGHT_PER_TENANT="5"
    )
    own = make_tenant("own", KEY_A, "http://x", CREDS_A, limits=Limits(2.0, 3, 1))
    default = make_tenant("default", KEY_B, "http://x", CREDS_B)
    assert TenantPolicy.of(own, settings) == TenantPolicy(2.0, 3, 1)
    assert TenantPolicy.of(default, settings) == TenantPolicy(10.0, 20, 5)


async def take(limiter: Limiter, tenant: Tenant) -> None:
    """One request's worth of the limiter: a token, and a slot given straight back."""
    async with limiter.admit(tenant):
        pass


@pytest.mark.parametrize(("rps", "burst"), [("0.5", 1), ("1", 1), ("2.5", 3), ("40", 40)])
def test_burst_defaults_to_the_rate_rounded_up_and_at_least_one(rps: str, burst: int) -> None:
    tenant = make_tenant("t", KEY_A, "http://x", CREDS_A)
    assert TenantPolicy.of(tenant, make_settings(RATE_LIMIT_RPS=rps)).burst == burst


async def test_limits_are_off_by_default() -> None:
    limiter = limiter_of(make_settings())
    tenant = make_tenant("t", KEY_A, "http://x", CREDS_A)
    for _ in range(1000):
        await take(limiter, tenant)
    async with limiter.admit(tenant), limiter.admit(tenant), limiter.admit(tenant):
        pass


async def test_burst_is_granted_then_the_bucket_refills_at_its_rate() -> None:
    clock = FakeClock()
    limiter = limiter_of(make_settings(RATE_LIMIT_RPS="2", RATE_LIMIT_BURST="3"), clock)
    tenant = make_tenant("t", KEY_A, "http://x", CREDS_A)
    for _ in range(3):
        await take(limiter, tenant)
    with pytest.raises(TooManyRequests):
        await take(limiter, tenant)
    clock.now += 0.5
    await take(limiter, tenant)
    clock.now += 100.0
    for _ in range(3):
        await take(limiter, tenant)
    with pytest.raises(TooManyRequests):
        await take(limiter, tenant)


@pytest.mark.parametrize(("rps", "retry_after"), [(0.4, 3), (1.0, 1), (0.3, 4), (5.0, 1)])
async def test_retry_after_is_the_wait_in_seconds_rounded_up(rps: float, retry_after: int) -> None:
    limiter = limiter_of(make_settings())
    tenant = make_tenant("t", KEY_A, "http://x", CREDS_A, limits=Limits(rps, 1))
    await take(limiter, tenant)
    with pytest.raises(TooManyRequests) as refused:
        await take(limiter, tenant)
    assert refused.value.code == "RATE_LIMITED"
    assert refused.value.headers() == {"Retry-After": str(retry_after)}


async def test_limiter_grants_again_once_the_wait_has_passed() -> None:
    clock = FakeClock()
    limiter = limiter_of(make_settings(RATE_LIMIT_RPS="0.5"), clock)
    tenant = make_tenant("t", KEY_A, "http://x", CREDS_A)
    await take(limiter, tenant)
    with pytest.raises(TooManyRequests):
        await take(limiter, tenant)
    clock.now += 1.5  # binary fractions: the sums below are exact
    with pytest.raises(TooManyRequests):
        await take(limiter, tenant)
    clock.now += 0.5
    await take(limiter, tenant)


async def test_slot_is_given_back_when_the_request_fails() -> None:
    limiter = limiter_of(make_settings(MAX_INFLIGHT_PER_TENANT="1"))
    tenant = make_tenant("t", KEY_A, "http://x", CREDS_A)
    with pytest.raises(RuntimeError):
        async with limiter.admit(tenant):
            raise RuntimeError("handler failed")
    async with limiter.admit(tenant):
        with pytest.raises(TooManyRequests) as refused:
            await take(limiter, tenant)
    assert refused.value.code == "TENANT_BUSY"


async def test_a_busy_tenant_spends_no_token() -> None:
    limiter = limiter_of(make_settings(RATE_LIMIT_RPS="1", MAX_INFLIGHT_PER_TENANT="1"))
    tenant = make_tenant("t", KEY_A, "http://x", CREDS_A)
    async with limiter.admit(tenant):
        with pytest.raises(TooManyRequests) as refused:
            await take(limiter, tenant)
    assert refused.value.code == "TENANT_BUSY"


async def test_a_fast_tenant_prefetches_tokens_and_makes_few_backend_calls() -> None:
    backend, clock = SwitchableState(), FakeClock()
    settings = make_settings(RATE_LIMIT_RPS="100000", RATE_LIMIT_BURST="1000")
    limiter = Limiter(settings, ResilientState(backend), clock)
    tenant = make_tenant("t", KEY_A, "http://x", CREDS_A)
    assert prefetch_count(100_000.0, 1000) == 500
    for _ in range(1000):
        await take(limiter, tenant)
    assert backend.calls.count("take_token") == 2  # 1000 requests, 500 tokens a call
    with pytest.raises(TooManyRequests):
        await take(limiter, tenant)


async def test_a_slow_tenant_asks_for_one_token_at_a_time() -> None:
    assert prefetch_count(50.0, 50) == 1
    assert prefetch_count(1e6, 7) == 7  # never more than the burst


async def test_spare_tokens_lapse_and_a_policy_change_drops_them() -> None:
    backend, clock = SwitchableState(), FakeClock()
    limiter = Limiter(make_settings(), ResilientState(backend), clock)
    fast = make_tenant("t", KEY_A, "http://x", CREDS_A, limits=Limits(100_000.0, 1000))
    await take(limiter, fast)
    clock.now += SPARE_TTL
    await take(limiter, fast)
    assert backend.calls.count("take_token") == 2  # the spare had lapsed
    other = make_tenant("t", KEY_A, "http://x", CREDS_A, limits=Limits(100_000.0, 999))
    await take(limiter, other)
    assert backend.calls.count("take_token") == 3  # a new policy: a new bucket, no old spare


async def test_two_prefetching_limiters_admit_no_more_than_burst_plus_rate_times_t() -> None:
    shared, clock = MemoryState(), FakeClock()
    settings = make_settings(RATE_LIMIT_RPS="20000", RATE_LIMIT_BURST="300")
    limiters = [Limiter(settings, ResilientState(shared), clock) for _ in range(2)]
    tenant = make_tenant("t", KEY_A, "http://x", CREDS_A)
    admitted, ticks = 0, 2000  # 2 s of excess demand, a tick a millisecond

    async def attempt(limiter: Limiter) -> int:
        try:
            await take(limiter, tenant)
        except TooManyRequests:
            return 0
        return 1

    for _ in range(ticks):
        for _ in range(40):  # 40 a tick each: four times the rate in all
            admitted += sum([await attempt(limiter) for limiter in limiters])
        clock.now += 0.001
    allowed = 300 + 20_000 * ticks / 1000
    assert 0.9 * allowed <= admitted <= allowed


async def test_limits_of_two_processes_on_one_backend_are_one_limit() -> None:
    shared, clock = MemoryState(), FakeClock()
    settings = make_settings(RATE_LIMIT_RPS="1", RATE_LIMIT_BURST="2", MAX_INFLIGHT_PER_TENANT="1")
    one, two = (Limiter(settings, ResilientState(shared), clock) for _ in range(2))
    tenant = make_tenant("t", KEY_A, "http://x", CREDS_A)
    async with one.admit(tenant):
        with pytest.raises(TooManyRequests) as busy:
            await take(two, tenant)
    assert busy.value.code == "TENANT_BUSY"
    await take(two, tenant)
    with pytest.raises(TooManyRequests) as limited:
        await take(one, tenant)
    assert limited.value.code == "RATE_LIMITED"


async def test_a_held_slot_is_renewed_and_a_dead_holders_slot_lapses() -> None:
    shared, clock = MemoryState(), FakeClock()
    settings = make_settings(MAX_INFLIGHT_PER_TENANT="1")
    alive, other = (Limiter(settings, ResilientState(shared), clock) for _ in range(2))
    tenant = make_tenant("t", KEY_A, "http://x", CREDS_A)
    async with alive.admit(tenant):
        for _ in range(4):  # 40 s in all, renewed every 10 s: still held
            clock.now += SLOT_TTL / 2
            await alive.renew_slots()
        with pytest.raises(TooManyRequests):
            await take(other, tenant)
        clock.now += SLOT_TTL  # no renewal, as if the holder had died: the slot lapses
        await take(other, tenant)


# --- through the gateway ---------------------------------------------------------------------


async def test_request_over_the_rate_gets_429_with_retry_after_and_never_reaches_nxlink(
    upstream: Upstream, make_gateway: MakeGateway
) -> None:
    client = await make_gateway([tenant_a(upstream)], RATE_LIMIT_RPS="0.4", RATE_LIMIT_BURST="2")
    client.app[LIMITER].clock = FakeClock()  # no refill while the requests run, however slow
    assert [(await task_list(client, KEY_A)).status for _ in range(2)] == [200, 200]
    response = await client.post(TASK_LIST, data=b"{}", headers={"x-api-key": KEY_A})
    body = await response.json()
    assert response.status == 429
    assert body["code"] == 429
    assert body["error"] == "RATE_LIMITED"
    assert response.headers["Retry-After"] == "3"
    assert len(upstream.received) == 2


async def test_tenant_at_its_rate_limit_never_slows_another(
    upstream: Upstream, make_gateway: MakeGateway
) -> None:
    tenants = [tenant_a(upstream), make_tenant("tenant-b", KEY_B, upstream.base_url, CREDS_B)]
    client = await make_gateway(tenants, RATE_LIMIT_RPS="0.1", RATE_LIMIT_BURST="1")
    assert (await task_list(client, KEY_A)).status == 200
    assert (await task_list(client, KEY_A)).status == 429
    assert (await task_list(client, KEY_B)).status == 200
    assert (await task_list(client, KEY_A)).status == 429
    assert [r.headers["accessKey"] for r in upstream.received] == ["ak-tenant-a", "ak-tenant-b"]


async def test_tenant_own_rate_limit_applies_with_the_global_one_off(
    upstream: Upstream, make_gateway: MakeGateway
) -> None:
    tenants = [
        tenant_a(upstream, Limits(rate_limit_rps=0.1, rate_limit_burst=2)),
        make_tenant("tenant-b", KEY_B, upstream.base_url, CREDS_B),
    ]
    client = await make_gateway(tenants)
    statuses = [(await task_list(client, KEY_A)).status for _ in range(3)]
    assert statuses == [200, 200, 429]
    assert {(await task_list(client, KEY_B)).status for _ in range(10)} == {200}


async def test_rate_limit_counts_requests_the_gateway_answers_itself(
    upstream: Upstream, make_gateway: MakeGateway
) -> None:
    client = await make_gateway([tenant_a(upstream)], RATE_LIMIT_RPS="0.1", RATE_LIMIT_BURST="1")
    assert (await client.get("/api/openapi/status", headers={"x-api-key": KEY_A})).status == 200
    assert (await task_list(client, KEY_A)).status == 429
    assert upstream.received == []


async def test_public_routes_are_never_rate_limited(
    upstream: Upstream, make_gateway: MakeGateway
) -> None:
    client = await make_gateway([tenant_a(upstream)], RATE_LIMIT_RPS="0.1", RATE_LIMIT_BURST="1")
    for path in ("/healthz", "/readyz", "/metrics", "/api/openapi/keys") * 3:
        assert (await client.get(path)).status == 200


async def test_request_over_the_in_flight_cap_gets_429_tenant_busy(
    make_upstream: MakeUpstream, make_gateway: MakeGateway
) -> None:
    gate = Gate()
    upstream = await make_upstream(extra={HELD_PATH: gate.handler})
    tenants = [tenant_a(upstream), make_tenant("tenant-b", KEY_B, upstream.base_url, CREDS_B)]
    client = await make_gateway(tenants, MAX_INFLIGHT_PER_TENANT="1")
    held = asyncio.create_task(client.get(HELD_PATH, headers={"x-api-key": KEY_A, **HELD_ACTION}))
    await gate.wait_arrived()

    busy = await client.post(TASK_LIST, data=b"{}", headers={"x-api-key": KEY_A})
    assert busy.status == 429
    assert (await busy.json())["error"] == "TENANT_BUSY"
    assert "Retry-After" in busy.headers
    assert (await task_list(client, KEY_B)).status == 200
    assert gate.calls == 1
    assert [r.path for r in upstream.received] == [HELD_PATH, TASK_LIST]

    gate.release.set()
    response = await held
    assert response.status == 200
    assert await response.read() == b"first-second"
    assert (await task_list(client, KEY_A)).status == 200


async def test_in_flight_slot_is_freed_after_an_upstream_failure(make_gateway: MakeGateway) -> None:
    down = make_tenant("tenant-a", KEY_A, f"http://127.0.0.1:{free_port()}", CREDS_A)
    client = await make_gateway([down], MAX_INFLIGHT_PER_TENANT="1")
    for _ in range(3):
        response = await task_list(client, KEY_A)
        assert response.status == 502


async def test_tenant_override_raises_the_in_flight_cap(
    make_upstream: MakeUpstream, make_gateway: MakeGateway
) -> None:
    gate = Gate()
    upstream = await make_upstream(extra={HELD_PATH: gate.handler})
    client = await make_gateway(
        [tenant_a(upstream, Limits(max_inflight=2))], MAX_INFLIGHT_PER_TENANT="1"
    )
    headers = {"x-api-key": KEY_A, **HELD_ACTION}
    first = asyncio.create_task(client.get(HELD_PATH, headers=headers))
    await gate.wait_arrived()
    gate.arrived.clear()
    second = asyncio.create_task(client.get(HELD_PATH, headers=headers))
    await gate.wait_arrived()
    assert (await task_list(client, KEY_A)).status == 429
    gate.release.set()
    assert [(await t).status for t in (first, second)] == [200, 200]


async def test_an_append_run_whose_client_left_keeps_the_in_flight_slot_until_it_ends(
    aiohttp_server: Callable[..., Awaitable[TestServer]], make_gateway: MakeGateway
) -> None:
    phones = ["13700000001", "13700000002"]
    nxlink = HoldingNxlink(CREDS_A, hold={phones[0]})
    server = await aiohttp_server(nxlink.app())
    base = str(server.make_url("")).rstrip("/")
    tenant = make_tenant("tenant-a", KEY_A, base, CREDS_A, limits=Limits(max_inflight=1))
    client = await make_gateway([tenant])
    headers = {"x-api-key": KEY_A}

    async def append(phone: str) -> ClientResponse:
        body = {"taskId": "t", "phoneNumbers": [phone]}
        response = await client.post(APPEND, json=body, headers=headers)
        await response.read()
        return response

    async def handler_ended() -> bool:
        return client.app[METRICS].in_flight == 0

    async def run_ended() -> bool:
        return not client.app[APPEND_RUNS]

    leaving = asyncio.create_task(append(phones[0]))
    try:
        async with asyncio.timeout(10):
            await nxlink.holding.wait()
        leaving.cancel()  # the client goes away; its run goes on at nxlink
        await asyncio.gather(leaving, return_exceptions=True)
        await eventually(handler_ended, what="the gateway to end the left request's handler")
        busy = await append(phones[1])
        assert (busy.status, (await busy.json())["error"]) == (429, "TENANT_BUSY")
    finally:
        nxlink.release.set()
    await eventually(run_ended, what="the left run to finish")
    assert (await append(phones[1])).status == 200
    assert nxlink.received == phones


# --- key rotation: one tenant, several keys, one bucket --------------------------------------


def rotation_app(tmp_path: Path, upstream: Upstream, **settings: str) -> web.Application:
    future = (datetime.now(UTC) + timedelta(days=30)).isoformat()
    past = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
    entry = tenant_entry(
        "tenant-a",
        "old-key-for-tenant-a-000",
        upstream.base_url,
        CREDS_A,
        apiKeys=[
            {"apiKey": "new-key-for-tenant-a-111", "notAfter": future},
            {"apiKey": "gone-key-for-tenant-a-222", "notAfter": past},
        ],
        rateLimitRps=0.1,
        rateLimitBurst=2,
    )
    tenants_file = write_tenants(tmp_path / "tenants.json", [entry])
    env = {"TENANTS_FILE": str(tenants_file), **settings}
    parsed = parse_settings(env)
    return create_app(parsed, load_registry(env, parsed))


async def test_old_and_new_key_of_one_tenant_share_one_rate_bucket(
    tmp_path: Path,
    upstream: Upstream,
    aiohttp_client: Callable[[web.Application], Awaitable[Client]],
) -> None:
    client = await aiohttp_client(rotation_app(tmp_path, upstream))
    assert (await task_list(client, "old-key-for-tenant-a-000")).status == 200
    assert (await task_list(client, "new-key-for-tenant-a-111")).status == 200
    assert (await task_list(client, "old-key-for-tenant-a-000")).status == 429
    assert (await task_list(client, "new-key-for-tenant-a-111")).status == 429
    assert len(upstream.received) == 2


async def test_key_past_its_not_after_gets_403_api_key_expired(
    tmp_path: Path,
    upstream: Upstream,
    aiohttp_client: Callable[[web.Application], Awaitable[Client]],
) -> None:
    client = await aiohttp_client(rotation_app(tmp_path, upstream))
    response = await client.post(
        TASK_LIST, data=b"{}", headers={"x-api-key": "gone-key-for-tenant-a-222"}
    )
    body = await response.json()
    assert response.status == 403
    assert body["error"] == "API_KEY_EXPIRED"
    assert body["apiKey"] == "gone-key***"
    assert "gone-key-for-tenant-a-222" not in json.dumps(body)
    assert upstream.received == []


# --- python -m proxy check -------------------------------------------------------------------


def run_check(
    tmp_path: Path, entries: list[dict[str, object]], capsys: pytest.CaptureFixture[str], **env: str
) -> tuple[int, str]:
    tenants_file = write_tenants(tmp_path / "tenants.json", entries)
    environ = {"ENV_FILE": str(_empty(tmp_path / ".env")), **env}
    code = cli.main(["check", "--tenants", str(tenants_file)], environ=environ)
    return code, capsys.readouterr().out


def _empty(path: Path) -> Path:
    path.write_text("", encoding="utf-8")
    return path


def limits_line(out: str, alias: str) -> str:
    block = out.split(f"- {alias} [", 1)[1]
    return next(line for line in block.splitlines() if "limits:" in line)


def test_check_reports_each_tenants_effective_limits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    entries: list[dict[str, object]] = [
        tenant_entry("own", KEY_A, "http://127.0.0.1:1", CREDS_A, rateLimitRps=2, maxInflight=3),
        tenant_entry("global", KEY_B, "http://127.0.0.1:1", CREDS_B),
    ]
    code, out = run_check(
        tmp_path,
        entries,
        capsys,
        RATE_LIMIT_RPS="5",
        RATE_LIMIT_BURST="8",
        MAX_INFLIGHT_PER_TENANT="4",
    )
    assert code == 0
    own, default = limits_line(out, "own"), limits_line(out, "global")
    assert "rate 2" in own and "burst 8" in own and "in-flight 3" in own
    assert "rate 5" in default and "burst 8" in default and "in-flight 4" in default


def test_check_says_when_limits_are_off(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run_check(
        tmp_path, [tenant_entry("t", KEY_A, "http://127.0.0.1:1", CREDS_A)], capsys
    )
    assert code == 0
    line = limits_line(out, "t")
    assert "rate off" in line and "in-flight off" in line


def test_check_warns_about_a_key_expiring_within_seven_days(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    soon = (datetime.now(UTC) + timedelta(days=3)).isoformat()
    later = (datetime.now(UTC) + timedelta(days=30)).isoformat()
    entry = tenant_entry(
        "t",
        KEY_A,
        "http://127.0.0.1:1",
        CREDS_A,
        apiKeys=[
            {"apiKey": "soonsoon-key-000", "notAfter": soon},
            {"apiKey": "latelate-key-111", "notAfter": later},
        ],
    )
    code, out = run_check(tmp_path, [entry], capsys)
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert code == 0
    assert len(warnings) == 1
    assert "soonsoon***" in warnings[0] and "expires" in warnings[0]
    assert "soonsoon-key-000" not in out and "latelate-key-111" not in out


def test_check_reports_the_burst_the_bucket_uses_when_none_is_set(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    entries: list[dict[str, object]] = [
        tenant_entry("t", KEY_A, "http://127.0.0.1:1", CREDS_A, rateLimitRps=2.5)
    ]
    code, out = run_check(tmp_path, entries, capsys)
    assert code == 0
    assert "burst 3" in limits_line(out, "t")
