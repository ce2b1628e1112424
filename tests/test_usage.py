"""The usage ledger: counted in memory, flushed to the backend, read by the tenant at
/api/openapi/usage and by the operator with ``nxlink-proxy usage``."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from aiohttp import web

from proxy import cli
from proxy.app import create_app
from proxy.appkeys import USAGE as USAGE_LEDGER
from proxy.config import Quotas
from proxy.state import MemoryState, StateUnavailable
from proxy.state.base import UsageCounts
from proxy.state.fallback import ResilientState
from proxy.tenants import Registry, Tenant, load_registry
from proxy.usage import FLUSH_EVERY, MAX_ACTIONS, OTHER_ACTION, UsageLedger, day_entry
from tests.conftest import (
    CREDS_A,
    CREDS_B,
    KEY_A,
    KEY_B,
    Client,
    Upstream,
    make_settings,
    make_tenant,
)
from tests.processes import eventually, tenant_entry, write_tenants

AiohttpClient = Callable[[web.Application], Awaitable[Client]]
TASK_LIST = "/openapi/aiagent/task/list"
APPEND = "/api/openapi/append-numbers"
USAGE = "/api/openapi/usage"


def tenants_of(upstream: Upstream) -> list[Tenant]:
    a = make_tenant("tenant-a", KEY_A, upstream.base_url, CREDS_A)
    return [
        dataclasses.replace(a, quotas=Quotas(numbers_per_day=100)),
        make_tenant("tenant-b", KEY_B, upstream.base_url, CREDS_B),
    ]


async def gateway_on(
    aiohttp_client: AiohttpClient, backend: MemoryState, upstream: Upstream, **env: str
) -> Client:
    app = create_app(
        make_settings(**env), Registry(tenants_of(upstream)), open_backend=lambda _url: backend
    )
    return await aiohttp_client(app)


async def traffic(client: Client) -> None:
    """Two forwards, one append of three numbers (one unusable), one 400."""
    a = {"x-api-key": KEY_A}
    for _ in range(2):
        assert (await client.post(TASK_LIST, data=b"{}", headers=a)).status == 200
    body = {"taskId": "t", "phoneNumbers": ["13800000001", "13800000002", ""]}
    assert (await client.post(APPEND, json=body, headers=a)).status == 200
    assert (await client.post(APPEND, data=b"{", headers=a)).status == 400


def test_a_ledger_turns_its_counts_into_backend_counters() -> None:
    ledger = UsageLedger(ResilientState(MemoryState()), ZoneInfo("UTC"))
    tenant = make_tenant("t", KEY_A, "http://x", CREDS_A)
    ledger.count_request(tenant, "callAppend", 200)
    ledger.count_request(tenant, "callAppend", 200)
    ledger.count_request(tenant, "taskList", 502)
    ledger.count_numbers(tenant, 5, 1)
    day = ledger.today()
    assert ledger.take() == {
        (tenant.id, day): {
            "numbersAppended": 5,
            "numbersFailed": 1,
            "requests": 3,
            "action:callAppend": 2,
            "status:2xx": 2,
            "action:taskList": 1,
            "status:5xx": 1,
            "upstreamErrors": 1,
        }
    }
    assert ledger.take() == {}


async def test_a_tenant_reads_its_own_usage_newest_day_first(
    aiohttp_client: AiohttpClient, upstream: Upstream
) -> None:
    client = await gateway_on(aiohttp_client, MemoryState(), upstream)
    await traffic(client)
    answer = await client.get(USAGE, headers={"x-api-key": KEY_A})
    assert answer.status == 200
    body = await answer.json()
    assert (body["code"], body["message"]) == (200, "Usage")
    data = body["data"]
    assert (data["apiKeyAlias"], data["timezone"]) == ("tenant-a", "UTC")
    assert [q["name"] for q in data["quotas"]] == ["numbersPerDay"]
    assert (data["quotas"][0]["used"], data["quotas"][0]["remaining"]) == (2, 98)
    days = data["days"]
    assert len(days) == 7
    assert days[0]["date"] == datetime.now(ZoneInfo("UTC")).date().isoformat()
    assert [d["date"] for d in days] == sorted((d["date"] for d in days), reverse=True)
    assert days[0] == {
        "date": days[0]["date"],
        "requests": 4,
        "byAction": {"pageCallTaskInfo": 2, "callAppend": 2},
        "byStatus": {"2xx": 3, "4xx": 1, "5xx": 0},
        "numbersAppended": 2,
        "numbersFailed": 1,
        "upstreamErrors": 0,
    }
    assert days[1:] == [day_entry(d["date"], {}) for d in days[1:]]
    other = await (await client.get(USAGE, headers={"x-api-key": KEY_B})).json()
    assert other["data"]["apiKeyAlias"] == "tenant-b" and other["data"]["quotas"] == []
    assert other["data"]["days"][0]["requests"] == 0


@pytest.mark.parametrize(
    ("days", "status"), [("1", 200), ("90", 200), ("0", 400), ("91", 400), ("x", 400), ("-1", 400)]
)
async def test_days_is_one_to_ninety(
    aiohttp_client: AiohttpClient, upstream: Upstream, days: str, status: int
) -> None:
    client = await gateway_on(aiohttp_client, MemoryState(), upstream)
    answer = await client.get(USAGE, params={"days": days}, headers={"x-api-key": KEY_A})
    body = await answer.json()
    assert answer.status == status
    if status == 200:
        assert len(body["data"]["days"]) == int(days)
    else:
        assert body["error"] == "INVALID_DAYS"


async def test_usage_needs_the_tenants_key(
    aiohttp_client: AiohttpClient, upstream: Upstream
) -> None:
    client = await gateway_on(aiohttp_client, MemoryState(), upstream)
    assert (await client.get(USAGE)).status == 401


async def test_counts_reach_the_backend_within_two_seconds_and_on_shutdown(
    aiohttp_client: AiohttpClient, upstream: Upstream
) -> None:
    backend = MemoryState()
    client = await gateway_on(aiohttp_client, backend, upstream)
    tenant = tenants_of(upstream)[0]
    today = datetime.now(ZoneInfo("UTC")).date().isoformat()
    await traffic(client)

    async def flushed() -> bool:
        return (await backend.read_usage(tenant.id, [today]))[today].get("requests") == 4

    assert FLUSH_EVERY <= 2
    await eventually(flushed, what="the periodic flush", timeout=3)
    await client.post(TASK_LIST, data=b"{}", headers={"x-api-key": KEY_A})
    await client.close()
    assert (await backend.read_usage(tenant.id, [today]))[today]["requests"] == 5


async def test_metrics_show_what_tenants_used_of_their_quotas(
    aiohttp_client: AiohttpClient, upstream: Upstream
) -> None:
    client = await gateway_on(aiohttp_client, MemoryState(), upstream)
    await traffic(client)
    text = await (await client.get("/metrics")).text()
    assert 'nxlink_proxy_quota_used{quota="numbersPerDay",tenant="tenant-a"} 2.0' in text
    assert 'nxlink_proxy_quota_limit{quota="numbersPerDay",tenant="tenant-a"} 100.0' in text


async def test_the_usage_command_reads_every_tenant_from_state_url(
    tmp_path: Path,
    upstream: Upstream,
    aiohttp_client: AiohttpClient,
    capsys: pytest.CaptureFixture[str],
) -> None:
    entries = [
        tenant_entry("tenant-a", KEY_A, upstream.base_url, CREDS_A, quotas={"numbersPerDay": 100}),
        tenant_entry("tenant-b", KEY_B, upstream.base_url, CREDS_B),
    ]
    env = {
        "TENANTS_FILE": str(write_tenants(tmp_path / "tenants.json", entries)),
        "STATE_URL": f"sqlite:///{tmp_path / 'state.db'}",
        "QUOTA_TIMEZONE": "Asia/Shanghai",
    }
    settings = make_settings(**env)
    client = await aiohttp_client(create_app(settings, load_registry(env, settings)))
    await traffic(client)
    await client.close()
    capsys.readouterr()

    def usage(*argv: str) -> int:  # in a thread: the command runs its own event loop
        return cli.main(["usage", *argv], environ=env)

    assert await asyncio.to_thread(usage, "--json", "--days", "2") == 0
    reports = json.loads(capsys.readouterr().out)
    assert [r["apiKeyAlias"] for r in reports] == ["tenant-a", "tenant-b"]
    assert reports[0]["timezone"] == "Asia/Shanghai"
    assert reports[0]["days"][0]["requests"] == 4 and len(reports[0]["days"]) == 2
    assert reports[0]["quotas"][0]["used"] == 2
    assert await asyncio.to_thread(usage, "--tenant", "tenant-a") == 0
    table = capsys.readouterr().out
    assert table.startswith("tenant-a (days in Asia/Shanghai)")
    assert "quota numbersPerDay: 2 of 100 used" in table
    assert await asyncio.to_thread(usage, "--tenant", "nobody") == 1
    assert "no tenant with alias 'nobody'" in capsys.readouterr().err


@pytest.mark.parametrize("state_url", [None, "memory://"])
def test_the_usage_command_refuses_memory_state_it_cannot_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], state_url: str | None
) -> None:
    entries = [tenant_entry("tenant-a", KEY_A, "http://127.0.0.1:9", CREDS_A)]
    env = {"TENANTS_FILE": str(write_tenants(tmp_path / "tenants.json", entries))}
    if state_url is not None:
        env["STATE_URL"] = state_url
    assert cli.main(["usage"], environ=env) == 1
    captured = capsys.readouterr()
    assert captured.out == ""  # no table of zeros
    assert "STATE_URL" in captured.err and "memory://" in captured.err
    assert "sqlite:///" in captured.err and "redis://" in captured.err


class LateAnswer(MemoryState):
    """Adds the first flush's counts, then answers too late: the caller cannot tell it was
    applied (as a Redis reply lost after EXEC, or a SQLite commit past the call's deadline)."""

    def __init__(self) -> None:
        super().__init__()
        self.late = True

    async def add_usage(self, counts: UsageCounts, ttl: float, *, source: str, seq: int) -> None:
        await super().add_usage(counts, ttl, source=source, seq=seq)
        if self.late:
            self.late = False
            raise StateUnavailable("the answer came too late")


async def test_a_flush_whose_answer_was_late_is_not_counted_twice() -> None:
    backend = LateAnswer()
    ledger = UsageLedger(ResilientState(backend), ZoneInfo("UTC"))
    tenant = make_tenant("t", KEY_A, "http://x", CREDS_A)
    ledger.count_request(tenant, "callAppend", 200)
    await ledger.flush()  # applied, but it looks failed: sent again by the next flush
    ledger.count_request(tenant, "callAppend", 200)
    await ledger.flush()
    await ledger.flush()
    day = ledger.today()
    assert (await backend.read_usage(tenant.id, [day]))[day]["requests"] == 2


class FailsOnce(MemoryState):
    """A backend whose first usage write fails (a blip)."""

    failed = False

    async def add_usage(self, counts: UsageCounts, ttl: float, *, source: str, seq: int) -> None:
        if not self.failed:
            self.failed = True
            raise StateUnavailable("a blip")
        await super().add_usage(counts, ttl, source=source, seq=seq)


async def test_one_flush_after_a_failed_one_sends_the_old_batch_and_the_new_counts() -> None:
    """What the last flush at shutdown must do: nothing counted after a blip stays behind."""
    backend = FailsOnce()
    ledger = UsageLedger(ResilientState(backend), ZoneInfo("UTC"))
    tenant = make_tenant("t", KEY_A, "http://x", CREDS_A)
    ledger.count_request(tenant, "callAppend", 200)
    await ledger.flush()  # fails: the batch waits
    ledger.count_request(tenant, "taskList", 200)
    await ledger.flush()
    day = ledger.today()
    stored = (await backend.read_usage(tenant.id, [day]))[day]
    assert (stored["requests"], stored["action:taskList"]) == (2, 1)
    assert ledger.take() == {}


def test_a_tenant_naming_ever_new_actions_has_them_bounded_and_only_its_own() -> None:
    """The action is the client's header: past MAX_ACTIONS names a day, a tenant's new ones
    count as OTHER_ACTION (every request still counted); another tenant's are untouched."""
    ledger = UsageLedger(ResilientState(MemoryState()), ZoneInfo("UTC"))
    noisy = make_tenant("noisy", KEY_A, "http://x", CREDS_A)
    other = make_tenant("other", KEY_B, "http://x", CREDS_A)
    for n in range(MAX_ACTIONS + 50):
        ledger.count_request(noisy, f"made{n}", 200)
    ledger.count_request(noisy, "made0", 200)  # one already named still counts as itself
    ledger.count_request(other, "callAppend", 200)
    counts = ledger.take()
    fields = counts[noisy.id, ledger.today()]
    assert fields["requests"] == MAX_ACTIONS + 51
    assert fields[f"action:{OTHER_ACTION}"] == 50 and fields["action:made0"] == 2
    assert sum(1 for name in fields if name.startswith("action:")) == MAX_ACTIONS + 1
    assert counts[other.id, ledger.today()]["action:callAppend"] == 1


# --- each number counted once: retried Idempotency-Key runs, upstream failures --------------

RUN_PHONES = [f"1390000{i:04d}" for i in range(6)]
RUN_BODY = {"taskId": "t", "phoneNumbers": [*RUN_PHONES, ""]}  # six usable, one unusable


class LoseAfterFirstBatch(MemoryState):
    """The first owner loses its claim after its first batch (its lease lapsed), so the
    repeat takes the run over: the second owner sends what the first could not."""

    def __init__(self) -> None:
        super().__init__()
        self.first_owner = ""

    async def record_intent(
        self, key: str, owner: str, batch: int, intent: bytes, now: float
    ) -> bool:
        self.first_owner = self.first_owner or owner
        if owner == self.first_owner and batch > 0:
            await self.abandon(key, owner)
            return False
        return await super().record_intent(key, owner, batch, intent, now)


class AnswerNotStored(MemoryState):
    """Storing the run's answer fails once and its lease lapses: the repeat takes the finished
    run over and answers from its journal, sending nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.failed = False

    async def complete(self, key: str, owner: str, answer: bytes, ttl: float, now: float) -> bool:
        if self.failed:
            return await super().complete(key, owner, answer, ttl, now)
        self.failed = True
        await self.abandon(key, owner)
        raise StateUnavailable("the answer could not be stored")


async def today_usage(client: Client, backend: MemoryState, tenant: Tenant) -> dict[str, int]:
    await client.app[USAGE_LEDGER].flush()
    today = datetime.now(ZoneInfo("UTC")).date().isoformat()
    return (await backend.read_usage(tenant.id, [today]))[today]


@pytest.mark.parametrize("backend", [LoseAfterFirstBatch, AnswerNotStored])
async def test_a_run_taken_over_counts_each_number_once(
    aiohttp_client: AiohttpClient, upstream: Upstream, backend: type[MemoryState]
) -> None:
    state = backend()
    client = await gateway_on(
        aiohttp_client, state, upstream, APPEND_BATCH_SIZE="2", APPEND_CONCURRENCY="1"
    )
    headers = {"x-api-key": KEY_A, "Idempotency-Key": "run-1"}
    first = await client.post(APPEND, json=RUN_BODY, headers=headers)
    repeat = await client.post(APPEND, json=RUN_BODY, headers=headers)
    assert repeat.status == 200, await repeat.text()
    assert (await repeat.json())["data"]["successCount"] == 6
    assert first.status in (200, 409)
    sent = [r for r in upstream.received if r.path.endswith("/call/append")]
    assert sum(len(json.loads(r.body)["list"]) for r in sent) == 6  # nobody called twice
    counts = await today_usage(client, state, tenants_of(upstream)[0])
    assert (counts["numbersAppended"], counts["numbersFailed"]) == (6, 1)


async def test_a_batch_nxlink_never_answered_is_a_failed_number_and_an_upstream_error(
    aiohttp_client: AiohttpClient,
) -> None:
    backend = MemoryState()
    dead = "http://127.0.0.1:9"  # nothing listens on the discard port
    tenant = make_tenant("tenant-a", KEY_A, dead, CREDS_A)
    app = create_app(
        make_settings(APPEND_BATCH_SIZE="2"), Registry([tenant]), open_backend=lambda _url: backend
    )
    client = await aiohttp_client(app)
    body = {"taskId": "t", "phoneNumbers": RUN_PHONES[:3]}
    answer = await client.post(APPEND, json=body, headers={"x-api-key": KEY_A})
    assert answer.status == 200 and (await answer.json())["data"]["failCount"] == 3
    counts = await today_usage(client, backend, tenant)
    assert (counts.get("numbersAppended", 0), counts["numbersFailed"]) == (0, 3)
    assert counts["upstreamErrors"] == 2  # two batches, each an exchange that failed
