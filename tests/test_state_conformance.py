"""One conformance suite for every state backend: the same tests run on memory, SQLite and a
real redis-server. ``memory://`` is the reference; the others must answer exactly as it does,
and stay exact when several instances (connections, processes) share one store."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Final, TypeVar

import pytest

from proxy.state import open_state
from proxy.state.base import ClaimStatus, JournalEntry, QuotaCharge, StateBackend
from tests.redis_server import RedisServer

BACKENDS: Final = ("memory", "sqlite", "redis")
# The caller's clock: real time (Redis expires keys on its own clock too), moved by the tests.
NOW: Final = float(int(time.time()))
LATER: Final = NOW + 86_400.0  # a quota window's end
LEASE: Final = 15.0
TTL: Final = 3600.0

OpenBackend = Callable[[], StateBackend]
T = TypeVar("T")


def store_url(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of a fresh, empty store of ``kind``."""
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    if kind == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        server.flush()
        return server.url
    return "memory://"


@pytest.fixture(params=BACKENDS)
async def open_backend(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[OpenBackend]:
    """Opens instances of one store: for SQLite and Redis each call is a new connection to the
    same file or server; memory has one instance per process, so it hands out that one."""
    url = store_url(request.param, request, tmp_path)
    opened: list[StateBackend] = []

    def open_one() -> StateBackend:
        if url == "memory://" and opened:
            return opened[0]
        opened.append(open_state(url))
        return opened[-1]

    yield open_one
    for backend in opened:
        await backend.close()


@pytest.fixture
def backend(open_backend: OpenBackend) -> StateBackend:
    """One instance of each backend, on an empty store."""
    return open_backend()


# token buckets


async def test_a_new_bucket_admits_its_burst_then_refuses(backend: StateBackend) -> None:
    decisions = [await backend.take_token("t", 1.0, 3, NOW) for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert [d.remaining for d in decisions] == [2, 1, 0, 0]
    assert decisions[0].retry_after == 0.0
    assert decisions[3].retry_after == pytest.approx(1.0)
    assert decisions[3].reset == pytest.approx(3.0)


async def test_a_bucket_refills_at_its_rate_on_the_callers_clock(backend: StateBackend) -> None:
    for _ in range(2):
        await backend.take_token("t", 2.0, 2, NOW)
    early = await backend.take_token("t", 2.0, 2, NOW + 0.25)
    assert not early.allowed and early.retry_after == pytest.approx(0.25)
    again = await backend.take_token("t", 2.0, 2, NOW + 0.5)
    assert again.allowed and again.remaining == 0
    assert again.reset == pytest.approx(1.0)


async def test_a_bucket_saves_up_no_more_than_its_burst(backend: StateBackend) -> None:
    await backend.take_token("t", 1.0, 5, NOW)
    rested = await backend.take_token("t", 1.0, 5, NOW + 1000)
    assert rested.allowed and rested.remaining == 4
    assert rested.reset == pytest.approx(1.0)


async def test_a_caller_whose_clock_lags_refills_nothing_twice(backend: StateBackend) -> None:
    await backend.take_token("t", 1.0, 1, NOW)
    assert (await backend.take_token("t", 1.0, 1, NOW + 10)).allowed
    assert not (await backend.take_token("t", 1.0, 1, NOW + 5)).allowed  # a clock 5 s behind
    assert not (await backend.take_token("t", 1.0, 1, NOW + 10)).allowed
    assert (await backend.take_token("t", 1.0, 1, NOW + 11)).allowed


async def test_buckets_are_kept_per_key(backend: StateBackend) -> None:
    assert (await backend.take_token("a", 0.1, 1, NOW)).allowed
    assert not (await backend.take_token("a", 0.1, 1, NOW)).allowed
    assert (await backend.take_token("b", 0.1, 1, NOW)).allowed


async def test_a_take_of_several_grants_what_is_there_up_to_the_count(
    backend: StateBackend,
) -> None:
    first = await backend.take_token("t", 2.0, 5, NOW, count=3)
    assert (first.granted, first.remaining, first.allowed) == (3, 2, True)
    partial = await backend.take_token("t", 2.0, 5, NOW, count=3)
    assert (partial.granted, partial.remaining) == (2, 0)
    refused = await backend.take_token("t", 2.0, 5, NOW, count=3)
    assert (refused.granted, refused.allowed) == (0, False)
    assert refused.retry_after == pytest.approx(0.5)


async def test_a_take_of_several_never_exceeds_the_burst_and_refills(
    backend: StateBackend,
) -> None:
    assert (await backend.take_token("t", 4.0, 5, NOW, count=100)).granted == 5
    assert (await backend.take_token("t", 4.0, 5, NOW + 0.5, count=100)).granted == 2
    rested = await backend.take_token("t", 4.0, 5, NOW + 1000, count=100)
    assert (rested.granted, rested.remaining) == (5, 0)
    assert rested.reset == pytest.approx(1.25)


# in-flight leases


async def test_slots_are_capped_per_key(backend: StateBackend) -> None:
    assert await backend.acquire_slot("k", "a", 2, 30, NOW)
    assert await backend.acquire_slot("k", "b", 2, 30, NOW)
    assert not await backend.acquire_slot("k", "c", 2, 30, NOW)
    assert await backend.acquire_slot("other", "c", 2, 30, NOW)


async def test_a_released_slot_is_free_again(backend: StateBackend) -> None:
    await backend.acquire_slot("k", "a", 1, 30, NOW)
    await backend.release_slot("k", "a")
    await backend.release_slot("k", "never-held")
    assert await backend.acquire_slot("k", "b", 1, 30, NOW)
    assert not await backend.acquire_slot("k", "c", 1, 30, NOW)


async def test_a_slot_lapses_once_its_ttl_has_passed(backend: StateBackend) -> None:
    await backend.acquire_slot("k", "dead", 1, 10, NOW)
    assert not await backend.acquire_slot("k", "b", 1, 10, NOW + 9.9)
    assert await backend.acquire_slot("k", "b", 1, 10, NOW + 10)


async def test_renewed_slots_outlive_their_first_ttl(backend: StateBackend) -> None:
    await backend.acquire_slot("k", "a", 2, 10, NOW)
    await backend.acquire_slot("k", "b", 2, 10, NOW)
    await backend.renew_slots("k", ["a"], 10, NOW + 5)
    await backend.renew_slots("k", ["b"], 10, NOW + 12)  # lapsed already: not revived
    assert await backend.acquire_slot("k", "c", 2, 10, NOW + 12)
    assert not await backend.acquire_slot("k", "d", 2, 10, NOW + 12)
    assert await backend.acquire_slot("k", "d", 2, 10, NOW + 15)


# idempotency journal


async def test_the_first_claim_is_new_and_a_repeat_waits(backend: StateBackend) -> None:
    first = await backend.claim("idem", "fp", "A", LEASE, TTL, NOW)
    assert first.status is ClaimStatus.NEW and first.journal == {} and first.answer is None
    repeat = await backend.claim("idem", "fp", "B", LEASE, TTL, NOW + LEASE - 0.1)
    assert repeat.status is ClaimStatus.RUNNING
    assert (await backend.claim("other", "fp", "B", LEASE, TTL, NOW)).status is ClaimStatus.NEW


async def test_another_fingerprint_is_a_mismatch_whatever_the_state(
    backend: StateBackend,
) -> None:
    await backend.claim("idem", "fp", "A", LEASE, TTL, NOW)
    running = await backend.claim("idem", "other", "B", LEASE, TTL, NOW)
    lapsed = await backend.claim("idem", "other", "B", LEASE, TTL, NOW + LEASE)
    assert running.status is lapsed.status is ClaimStatus.MISMATCH
    assert await backend.complete("idem", "A", b"answer", TTL, NOW + 1)
    done = await backend.claim("idem", "other", "B", LEASE, TTL, NOW + 2)
    assert done.status is ClaimStatus.MISMATCH and done.answer is None


async def test_a_lapsed_lease_is_taken_over_with_its_journal(backend: StateBackend) -> None:
    await backend.claim("idem", "fp", "A", LEASE, TTL, NOW)
    assert await backend.record_intent("idem", "A", 0, b"intent-0", NOW + 1)
    assert await backend.record_intent("idem", "A", 1, b"intent-1", NOW + 2)
    await backend.record_outcome("idem", 0, b"outcome-0")
    await backend.record_outcome("idem", 7, b"never-intended")
    taken = await backend.claim("idem", "fp", "B", LEASE, TTL, NOW + LEASE)
    assert taken.status is ClaimStatus.TAKEN_OVER
    assert dict(taken.journal) == {
        0: JournalEntry(b"intent-0", b"outcome-0"),
        1: JournalEntry(b"intent-1", None),
    }


async def test_a_negative_index_is_journaled_and_replaced_as_a_batch_is(
    backend: StateBackend,
) -> None:
    await backend.claim("idem", "fp", "A", LEASE, TTL, NOW)
    assert await backend.record_intent("idem", "A", -1, b"reserved-8", NOW)
    assert await backend.record_intent("idem", "A", 0, b"intent-0", NOW)
    taken = await backend.claim("idem", "fp", "B", LEASE, TTL, NOW + LEASE)
    assert dict(taken.journal) == {-1: JournalEntry(b"reserved-8"), 0: JournalEntry(b"intent-0")}
    assert await backend.record_intent("idem", "B", -1, b"reserved-6", NOW + LEASE)
    third = await backend.claim("idem", "fp", "C", LEASE, TTL, NOW + 2 * LEASE)
    assert dict(third.journal) == {-1: JournalEntry(b"reserved-6"), 0: JournalEntry(b"intent-0")}


async def test_a_lost_claim_refuses_intents_and_renewals(backend: StateBackend) -> None:
    await backend.claim("idem", "fp", "A", LEASE, TTL, NOW)
    assert not await backend.record_intent("idem", "A", 0, b"late", NOW + LEASE)  # lapsed
    await backend.claim("idem", "fp", "B", LEASE, TTL, NOW + LEASE)
    assert not await backend.renew("idem", "A", LEASE, NOW + LEASE + 1)
    assert not await backend.record_intent("idem", "A", 0, b"stolen", NOW + LEASE + 1)
    assert not await backend.record_intent("idem", "nobody", 0, b"x", NOW + LEASE + 1)
    assert await backend.record_intent("idem", "B", 0, b"mine", NOW + LEASE + 1)
    assert not await backend.complete("idem", "A", b"answer-a", TTL, NOW + LEASE + 2)


async def test_an_outcome_from_a_lost_owner_is_still_kept(backend: StateBackend) -> None:
    await backend.claim("idem", "fp", "A", LEASE, TTL, NOW)
    await backend.record_intent("idem", "A", 3, b"intent-3", NOW)
    await backend.claim("idem", "fp", "B", LEASE, TTL, NOW + LEASE)
    await backend.record_outcome("idem", 3, b"late-outcome")
    third = await backend.claim("idem", "fp", "C", LEASE, TTL, NOW + 2 * LEASE)
    assert third.status is ClaimStatus.TAKEN_OVER
    assert dict(third.journal) == {3: JournalEntry(b"intent-3", b"late-outcome")}


async def test_a_renewed_lease_keeps_the_run_its_owners(backend: StateBackend) -> None:
    await backend.claim("idem", "fp", "A", LEASE, TTL, NOW)
    assert await backend.renew("idem", "A", LEASE, NOW + 10)
    later = NOW + 10 + LEASE - 0.1
    assert (await backend.claim("idem", "fp", "B", LEASE, TTL, later)).status is ClaimStatus.RUNNING
    assert await backend.record_intent("idem", "A", 0, b"intent", later)


async def test_a_completed_run_answers_done_with_its_answer(backend: StateBackend) -> None:
    await backend.claim("idem", "fp", "A", LEASE, TTL, NOW)
    await backend.record_intent("idem", "A", 0, b"intent", NOW)
    assert not await backend.complete("idem", "B", b"not-mine", TTL, NOW + 1)
    assert await backend.complete("idem", "A", b"the answer", TTL, NOW + 1)
    assert not await backend.complete("idem", "A", b"twice", TTL, NOW + 2)
    assert not await backend.renew("idem", "A", LEASE, NOW + 2)
    assert not await backend.record_intent("idem", "A", 1, b"after", NOW + 2)
    done = await backend.claim("idem", "fp", "B", LEASE, TTL, NOW + 3)
    assert done.status is ClaimStatus.DONE and done.answer == b"the answer"


async def test_an_abandoned_run_is_taken_over_at_once(backend: StateBackend) -> None:
    await backend.claim("idem", "fp", "A", LEASE, TTL, NOW)
    await backend.record_intent("idem", "A", 0, b"intent", NOW)
    await backend.abandon("idem", "B")  # not B's: nothing happens
    assert (await backend.claim("idem", "fp", "B", LEASE, TTL, NOW + 1)).status is (
        ClaimStatus.RUNNING
    )
    await backend.abandon("idem", "A")
    taken = await backend.claim("idem", "fp", "B", LEASE, TTL, NOW + 1)
    assert taken.status is ClaimStatus.TAKEN_OVER
    assert dict(taken.journal) == {0: JournalEntry(b"intent", None)}


async def test_a_record_expires_after_its_ttl(backend: StateBackend) -> None:
    await backend.claim("idem", "fp", "A", LEASE, 60, NOW)
    await backend.record_intent("idem", "A", 0, b"intent", NOW)
    fresh = await backend.claim("idem", "other", "B", LEASE, 60, NOW + 60)
    assert fresh.status is ClaimStatus.NEW and fresh.journal == {}
    await backend.complete("idem", "B", b"answer", 30, NOW + 61)
    kept = await backend.claim("idem", "other", "C", LEASE, 60, NOW + 90.9)
    assert kept.status is ClaimStatus.DONE
    gone = await backend.claim("idem", "other", "C", LEASE, 60, NOW + 91)
    assert gone.status is ClaimStatus.NEW


# quotas


def charge(key: str, limit: int, amount: int) -> QuotaCharge:
    return QuotaCharge(key, limit, amount, LATER)


async def test_a_reservation_is_granted_whole_or_not_at_all(backend: StateBackend) -> None:
    day, month = charge("t:day", 10, 4), charge("t:month", 5, 4)
    granted = await backend.reserve([day, month])
    assert granted.granted and granted.used == (4, 4) and granted.refused is None
    refused = await backend.reserve([day, month])
    assert not refused.granted and refused.used == (4, 4) and refused.refused == 1
    assert await backend.quota_used(["t:day", "t:month", "unknown"]) == [4, 4, 0]


async def test_a_refusal_names_the_first_charge_that_did_not_fit(backend: StateBackend) -> None:
    refused = await backend.reserve([charge("a", 3, 5), charge("b", 3, 5)])
    assert refused.refused == 0 and refused.used == (0, 0)
    exact = await backend.reserve([charge("a", 3, 3)])
    assert exact.granted and exact.used == (3,)
    assert not (await backend.reserve([charge("a", 3, 1)])).granted


async def test_given_back_amounts_never_go_below_zero(backend: StateBackend) -> None:
    await backend.reserve([charge("a", 100, 10), charge("b", 100, 2)])
    await backend.give_back([charge("a", 100, 3), charge("b", 100, 5), charge("c", 100, 1)])
    assert await backend.quota_used(["a", "b", "c"]) == [7, 0, 0]
    assert (await backend.reserve([charge("a", 10, 3)])).used == (10,)


# usage and audit


async def test_usage_increments_add_up_per_tenant_and_day(backend: StateBackend) -> None:
    first = {("t1", "2026-12-01"): {"requests": 2, "status:2xx": 2}}
    await backend.add_usage(first, TTL, source="p1", seq=1)
    await backend.add_usage(first, TTL, source="p1", seq=1)  # sent again after a late answer
    await backend.add_usage(
        {("t1", "2026-12-01"): {"requests": 3}, ("t2", "2026-12-01"): {"requests": 1}},
        TTL,
        source="p2",  # another process numbers its own batches
        seq=1,
    )
    await backend.add_usage({("t1", "2026-12-02"): {"numbers": 500}}, TTL, source="p1", seq=2)
    await backend.add_usage({("t1", "2026-12-02"): {"numbers": 9}}, TTL, source="p1", seq=1)
    days = ["2026-11-30", "2026-12-01", "2026-12-02"]
    assert await backend.read_usage("t1", days) == {
        "2026-11-30": {},
        "2026-12-01": {"requests": 5, "status:2xx": 2},
        "2026-12-02": {"numbers": 500},
    }
    assert await backend.read_usage("t3", ["2026-12-01"]) == {"2026-12-01": {}}


async def test_audit_entries_come_newest_first_and_are_bounded(backend: StateBackend) -> None:
    for n in range(5):
        await backend.append_audit(f"entry-{n}".encode(), keep=3)
    assert await backend.read_audit(10) == [b"entry-4", b"entry-3", b"entry-2"]
    assert await backend.read_audit(2) == [b"entry-4", b"entry-3"]


# several instances at once: exact, never over-admitting

INSTANCES: Final = 4
CALLS: Final = 100  # concurrent calls per instance


async def from_every_instance(
    open_backend: OpenBackend, call: Callable[[StateBackend, int], Awaitable[T]]
) -> list[T]:
    """``call(backend, n)`` ``CALLS`` times concurrently on each of ``INSTANCES`` instances."""
    instances = [open_backend() for _ in range(INSTANCES)]
    pending = [call(b, i * CALLS + n) for i, b in enumerate(instances) for n in range(CALLS)]
    return list(await asyncio.gather(*pending))


async def test_concurrent_tokens_never_exceed_the_burst(open_backend: OpenBackend) -> None:
    async def take(backend: StateBackend, _n: int) -> bool:
        return (await backend.take_token("t", 0.001, 37, NOW)).allowed

    assert sum(await from_every_instance(open_backend, take)) == 37


async def test_concurrent_takes_of_several_never_exceed_the_burst(
    open_backend: OpenBackend,
) -> None:
    async def take(backend: StateBackend, n: int) -> int:
        return (await backend.take_token("t", 0.001, 37, NOW, count=1 + n % 3)).granted

    assert sum(await from_every_instance(open_backend, take)) == 37


async def test_concurrent_reservations_fill_the_quota_exactly(open_backend: OpenBackend) -> None:
    async def reserve(backend: StateBackend, _n: int) -> bool:
        return (await backend.reserve([charge("q", 41, 1), charge("q2", 1000, 2)])).granted

    assert sum(await from_every_instance(open_backend, reserve)) == 41
    assert await open_backend().quota_used(["q", "q2"]) == [41, 82]


async def test_concurrent_slots_never_exceed_the_cap(open_backend: OpenBackend) -> None:
    async def acquire(backend: StateBackend, n: int) -> bool:
        return await backend.acquire_slot("k", f"holder-{n}", 7, 30, NOW)

    assert sum(await from_every_instance(open_backend, acquire)) == 7


async def test_concurrent_claims_have_one_owner(open_backend: OpenBackend) -> None:
    async def claim_it(backend: StateBackend, n: int) -> ClaimStatus:
        return (await backend.claim("idem", "fp", f"owner-{n}", LEASE, TTL, NOW)).status

    statuses = await from_every_instance(open_backend, claim_it)
    assert statuses.count(ClaimStatus.NEW) == 1
    assert statuses.count(ClaimStatus.RUNNING) == INSTANCES * CALLS - 1
