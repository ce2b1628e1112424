"""Idempotency-Key runs over the state journal: takeover after an owner died, a lost claim,
the backend down, a client that leaves mid-run, and the wait for a run in progress."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy import errors
from proxy.app import create_app
from proxy.appkeys import STATE
from proxy.batches import Batch, Result
from proxy.config import Quotas
from proxy.idempotency import NOT_SENT, OUTCOME_UNKNOWN, JournalRun, journal_key
from proxy.nxlink import APPEND_PATH
from proxy.state import MemoryState, StateBackend, StateUnavailable
from proxy.state.base import ClaimStatus, QuotaCharge, QuotaResult
from proxy.state.fallback import ResilientState
from proxy.tenants import Registry, Tenant
from tests.conftest import CREDS_A, KEY_A, Client, Upstream, make_settings, make_tenant
from tests.holding_nxlink import HoldingNxlink
from tests.processes import eventually
from tests.state_fakes import SwitchableState

URL = "/api/openapi/append-numbers"
AiohttpClient = Callable[[web.Application], Awaitable[Client]]
AiohttpServer = Callable[..., Awaitable[TestServer]]
PHONES = [f"1390000{i:04d}" for i in range(6)]
BODY = json.dumps({"taskId": "t", "phoneNumbers": PHONES}).encode()


async def gateway_on(
    aiohttp_client: AiohttpClient, backend: StateBackend, tenant: Tenant, **env: str
) -> Client:
    settings = make_settings(APPEND_BATCH_SIZE="2", APPEND_CONCURRENCY="1", **env)
    app = create_app(settings, Registry([tenant]), open_backend=lambda _url: backend)
    return await aiohttp_client(app)


async def append(client: Client, key: str | None = "run-1", body: bytes = BODY) -> Any:
    headers = {"x-api-key": KEY_A, "Content-Type": "application/json"}
    if key is not None:
        headers["Idempotency-Key"] = key
    response = await client.post(URL, data=body, headers=headers)
    return response.status, dict(response.headers), await response.json()


def sent_numbers(upstream: Upstream) -> list[str]:
    bodies = [json.loads(r.body) for r in upstream.received if r.path == APPEND_PATH]
    return [item["phoneNumber"] for body in bodies for item in body["list"]]


async def dead_owners_journal(tenant: Tenant) -> MemoryState:
    """A backend where an owner claimed run-1, finished batch 0, sent batch 1, and died."""
    backend, key = MemoryState(), journal_key(tenant.id, "run-1")
    then = time.time() - 60
    await backend.claim(key, hashlib.sha256(BODY).hexdigest(), "dead", 1.0, 3600, then)
    intent0 = {"positions": [0, 1], "contactIds": ["c0", "c1"]}
    await backend.record_intent(key, "dead", 0, json.dumps(intent0).encode(), then)
    outcome = [
        {"phoneNumber": p, "success": True, "contactId": c}
        for p, c in [(PHONES[0], "c0"), (PHONES[1], "c1")]
    ]
    await backend.record_outcome(key, 0, json.dumps(outcome).encode())
    intent1 = {"positions": [2, 3], "contactIds": ["c2", "c3"]}
    await backend.record_intent(key, "dead", 1, json.dumps(intent1).encode(), then)
    return backend


async def test_a_takeover_reuses_outcomes_sends_the_rest_and_resends_no_unknown_batch(
    aiohttp_client: AiohttpClient, upstream: Upstream
) -> None:
    tenant = make_tenant("tenant-a", KEY_A, upstream.base_url, CREDS_A)
    client = await gateway_on(aiohttp_client, await dead_owners_journal(tenant), tenant)
    status, _headers, body = await append(client)
    assert status == 200
    assert sent_numbers(upstream) == PHONES[4:]
    results = body["data"]["results"]
    assert [r["success"] for r in results] == [True, True, False, False, True, True]
    assert [r["contactId"] for r in results[:4]] == ["c0", "c1", "c2", "c3"]
    assert {r["error"] for r in results[2:4]} == {OUTCOME_UNKNOWN}
    assert OUTCOME_UNKNOWN.startswith("OUTCOME_UNKNOWN: ") and "call/list" in OUTCOME_UNKNOWN
    assert body["data"]["unknownCount"] == 2
    again = await append(client)
    assert again[1]["Idempotent-Replayed"] == "true" and again[2] == body
    assert sent_numbers(upstream) == PHONES[4:]


class LosingState(MemoryState):
    """A backend on which every claim is lost as soon as a batch is about to be sent."""

    async def record_intent(
        self, key: str, owner: str, batch: int, intent: bytes, now: float
    ) -> bool:
        return False


async def test_no_batch_is_sent_once_record_intent_says_the_claim_is_lost(
    aiohttp_client: AiohttpClient, upstream: Upstream
) -> None:
    tenant = make_tenant("tenant-a", KEY_A, upstream.base_url, CREDS_A)
    client = await gateway_on(aiohttp_client, LosingState(), tenant)
    status, headers, body = await append(client)
    assert (status, body["error"]) == (409, "IDEMPOTENCY_IN_PROGRESS")
    assert "Retry-After" in headers
    assert sent_numbers(upstream) == []


class AnswerLost(MemoryState):
    """A backend that fails to store the first run's answer (its journal stays)."""

    failed = False

    async def complete(self, key: str, owner: str, answer: bytes, ttl: float, now: float) -> bool:
        if not self.failed:
            self.failed = True
            raise StateUnavailable("the answer's write was lost")
        return await super().complete(key, owner, answer, ttl, now)


async def test_a_taker_gives_back_nothing_that_the_finished_owner_gave_back(
    aiohttp_client: AiohttpClient, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> None:
    nxlink = HoldingNxlink(CREDS_A, refuse={PHONES[2]})
    server = await aiohttp_server(nxlink.app())
    tenant = make_tenant("tenant-a", KEY_A, str(server.make_url("")).rstrip("/"), CREDS_A)
    tenant = dataclasses.replace(tenant, quotas=Quotas(numbers_per_day=100))
    backend = AnswerLost()
    client = await gateway_on(aiohttp_client, backend, tenant, IDEMPOTENCY_LEASE="1")
    first = await append(client)
    assert first[0] == 200 and first[2]["data"]["successCount"] == 4 and backend.failed
    again = await append(client)  # takes the run over once the first lease lapsed
    assert again[0] == 200 and "Idempotent-Replayed" not in again[1]
    assert again[2]["data"]["results"] == first[2]["data"]["results"]
    assert nxlink.received == PHONES
    day = datetime.now(UTC).date().isoformat()
    assert await backend.quota_used([f"q:{tenant.id}:numbersPerDay:{day}"]) == [4]


async def test_with_the_backend_down_a_keyed_request_is_503_and_a_plain_one_goes_on(
    aiohttp_client: AiohttpClient, upstream: Upstream
) -> None:
    backend = SwitchableState()
    tenant = make_tenant("tenant-a", KEY_A, upstream.base_url, CREDS_A)
    client = await gateway_on(aiohttp_client, backend, tenant)
    backend.down = True
    status, headers, body = await append(client)
    assert (status, body["error"]) == (503, "STATE_UNAVAILABLE")
    assert "Retry-After" in headers
    assert sent_numbers(upstream) == []
    status, _headers, body = await append(client, key=None)
    assert status == 200 and body["data"]["successCount"] == 6


async def test_a_repeat_waits_up_to_idempotency_wait_then_409_in_progress(
    aiohttp_client: AiohttpClient, upstream: Upstream
) -> None:
    tenant = make_tenant("tenant-a", KEY_A, upstream.base_url, CREDS_A)
    backend = MemoryState()
    key = journal_key(tenant.id, "run-1")
    await backend.claim(key, hashlib.sha256(BODY).hexdigest(), "alive", 60, 3600, time.time())
    client = await gateway_on(aiohttp_client, backend, tenant, IDEMPOTENCY_WAIT="0.3")
    status, headers, body = await append(client)
    assert (status, body["error"]) == (409, "IDEMPOTENCY_IN_PROGRESS")
    assert headers["Retry-After"] == "15"
    assert sent_numbers(upstream) == []
    other = await append(client, body=BODY.replace(b'"t"', b'"u"'))
    assert (other[0], other[2]["error"]) == (422, "IDEMPOTENCY_KEY_REUSED")


async def left_mid_run(
    aiohttp_client: AiohttpClient, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> tuple[Client, HoldingNxlink, SwitchableState]:
    """A keyed append whose client went away while nxlink holds its third batch."""
    nxlink = HoldingNxlink(CREDS_A, hold={PHONES[2]})
    server = await aiohttp_server(nxlink.app())
    tenant = make_tenant("tenant-a", KEY_A, str(server.make_url("")).rstrip("/"), CREDS_A)
    backend = SwitchableState()
    client = await gateway_on(aiohttp_client, backend, tenant)
    request = asyncio.create_task(append(client))
    async with asyncio.timeout(10):
        await nxlink.holding.wait()
    request.cancel()
    await asyncio.gather(request, return_exceptions=True)
    return client, nxlink, backend


async def test_a_client_that_leaves_does_not_cut_the_run(
    aiohttp_client: AiohttpClient, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> None:
    client, nxlink, backend = await left_mid_run(aiohttp_client, aiohttp_server)
    nxlink.release.set()
    await eventually(lambda: _has(backend, "complete"), what="the run to finish on its own")
    status, headers, body = await append(client)
    assert status == 200 and headers["Idempotent-Replayed"] == "true"
    assert nxlink.received == PHONES
    assert body["data"]["successCount"] == 6


async def _has(backend: SwitchableState, call: str) -> bool:
    return call in backend.calls


async def test_shutdown_waits_for_a_run_whose_client_left(
    aiohttp_client: AiohttpClient, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> None:
    client, nxlink, backend = await left_mid_run(aiohttp_client, aiohttp_server)
    closing = asyncio.create_task(client.close())  # the gateway shuts down mid-run
    state = client.app[STATE]

    async def shutting_down() -> bool:
        return not state.ready

    await eventually(shutting_down, what="the shutdown to begin")
    nxlink.release.set()
    async with asyncio.timeout(10):
        await closing
    assert nxlink.received == PHONES
    assert "complete" in backend.calls


async def owned_run(backend: SwitchableState, lease: float) -> JournalRun:
    """A run that owner-1 has just claimed, as append-numbers starts one."""
    claim = await backend.claim("lease-key", "fp", "owner-1", lease, 600, time.time())
    assert claim.status is ClaimStatus.NEW
    return JournalRun(ResilientState(backend), "lease-key", "owner-1", lease)


async def stop(keeper: asyncio.Task[None]) -> None:
    keeper.cancel()
    await asyncio.gather(keeper, return_exceptions=True)


async def test_a_renewal_that_never_answers_does_not_let_a_live_run_be_taken_over() -> None:
    """Renewals keep their schedule, each given a third of the lease: one that hangs is given
    up in time for the next to keep the lease (it used to wait CALL_TIMEOUT, past the lease)."""
    backend, lease = SwitchableState(), 0.9
    run = await owned_run(backend, lease)
    backend.stalls["renew"] = 1
    keeper = asyncio.create_task(run.keep_lease())
    try:
        await asyncio.sleep(lease * 1.5)  # the lease's own time passing is what is tested
        repeat = await backend.claim("lease-key", "fp", "owner-2", lease, 600, time.time())
    finally:
        await stop(keeper)
    assert repeat.status is ClaimStatus.RUNNING
    assert not run.lost and backend.calls.count("renew") >= 3


async def test_a_run_whose_lease_lapsed_unrenewed_sends_nothing_more_and_answers_503() -> None:
    backend, lease = SwitchableState(), 0.3
    run = await owned_run(backend, lease)
    backend.stalls["renew"] = 100  # no renewal ever answers
    keeper = asyncio.create_task(run.keep_lease())
    sent: list[Batch] = []

    async def send(batch: Batch) -> list[Result]:
        sent.append(batch)
        return [{"phoneNumber": "13900000000", "success": True, "contactId": "c0"}]

    batch = Batch((0,), ({"phoneNumber": "13900000000", "contactId": "c0"},))
    try:
        await asyncio.sleep(lease * 1.5)
        results = await run.send(batch, send)
    finally:
        await stop(keeper)
    assert sent == [] and "record_intent" not in backend.calls
    assert [r.get("error") for r in results] == [NOT_SENT]
    with pytest.raises(errors.StateUnreachable):
        run.check()


class LateReservationRecord(MemoryState):
    """The run's quota reservation reaches the journal, but the answer saying so is lost once
    (a Redis reply after its socket timeout, a SQLite write that commits past the call's
    deadline)."""

    late = True

    async def record_intent(
        self, key: str, owner: str, batch: int, intent: bytes, now: float
    ) -> bool:
        recorded = await super().record_intent(key, owner, batch, intent, now)
        if batch < 0 and self.late:
            self.late = False
            raise StateUnavailable("the answer came too late")
        return recorded


async def test_a_reservation_recorded_without_an_answer_is_not_given_back_twice(
    aiohttp_client: AiohttpClient, aiohttp_server: AiohttpServer
) -> None:
    """The first run cannot tell whether its reservation is in the journal: it sends nothing
    (503) and must not give it back, or the repeat that takes the recorded reservation over
    would send every number with nothing charged."""
    nxlink = HoldingNxlink(CREDS_A)
    server = await aiohttp_server(nxlink.app())
    tenant = make_tenant("tenant-a", KEY_A, str(server.make_url("")).rstrip("/"), CREDS_A)
    tenant = dataclasses.replace(tenant, quotas=Quotas(numbers_per_day=100))
    backend = LateReservationRecord()
    client = await gateway_on(aiohttp_client, backend, tenant)
    first = await append(client)
    assert first[0] == 503 and nxlink.received == []
    status, _headers, again = await append(client)
    assert status == 200 and again["data"]["successCount"] == len(PHONES)
    day = datetime.now(UTC).date().isoformat()
    used = await backend.quota_used([f"q:{tenant.id}:numbersPerDay:{day}"])
    assert sorted(nxlink.received) == sorted(PHONES) and used == [len(PHONES)]


class SlowToReserve(MemoryState):
    """Reserving takes longer than the lease and no renewal answers meanwhile (a backend that
    stalls): the run's lease lapses before it could record its reservation."""

    slow = True

    async def reserve(self, charges: Sequence[QuotaCharge]) -> QuotaResult:
        if self.slow:
            await asyncio.sleep(1.3)
        return await super().reserve(charges)

    async def renew(self, key: str, owner: str, lease: float, now: float) -> bool:
        if self.slow:
            await asyncio.sleep(1.3)  # past the renewal's bound: it never answers in time
        return await super().renew(key, owner, lease, now)


async def test_a_reservation_never_recorded_because_the_lease_lapsed_is_given_back(
    aiohttp_client: AiohttpClient, aiohttp_server: AiohttpServer
) -> None:
    """Nothing was written to the journal and nothing sent: the run gives its numbers back,
    and the repeat (which reserves again) is charged once."""
    nxlink = HoldingNxlink(CREDS_A)
    server = await aiohttp_server(nxlink.app())
    tenant = make_tenant("tenant-a", KEY_A, str(server.make_url("")).rstrip("/"), CREDS_A)
    tenant = dataclasses.replace(tenant, quotas=Quotas(numbers_per_day=100))
    backend = SlowToReserve()
    client = await gateway_on(aiohttp_client, backend, tenant, IDEMPOTENCY_LEASE="1")
    day = datetime.now(UTC).date().isoformat()
    quota = [f"q:{tenant.id}:numbersPerDay:{day}"]
    assert (await append(client))[0] == 503 and nxlink.received == []
    assert await backend.quota_used(quota) == [0]
    backend.slow = False
    await asyncio.sleep(1.1)  # the first claim's lease is over
    status, _headers, again = await append(client)
    assert status == 200 and again["data"]["successCount"] == len(PHONES)
    assert await backend.quota_used(quota) == [len(PHONES)]
