"""``memory://``: the state of this process only, in dictionaries (the reference backend).

Every operation runs to its end without awaiting, so each one is atomic on the event loop."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from proxy.state.base import (
    Claim,
    ClaimStatus,
    JournalEntry,
    QuotaCharge,
    QuotaResult,
    RateDecision,
    UsageCounts,
)


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


@dataclass(slots=True)
class _Run:
    fingerprint: str
    owner: str
    lease_until: float
    expires: float
    answer: bytes | None = None
    journal: dict[int, JournalEntry] = field(default_factory=dict)


@dataclass(slots=True)
class _Counter:
    value: int
    expires: float


class MemoryState:
    """The state of one process; nothing survives it."""

    url = "memory://"
    shared = "this process only"
    durable = False

    def __init__(self) -> None:
        self._buckets: dict[str, _Bucket] = {}
        self._slots: dict[str, dict[str, float]] = {}
        self._runs: dict[str, _Run] = {}
        self._quotas: dict[str, _Counter] = {}
        self._usage: dict[tuple[str, str], dict[str, int]] = {}
        self._usage_seqs: dict[str, int] = {}  # source → the last batch it added
        self._audit: deque[bytes] = deque()

    async def ping(self) -> None:
        """Always answers."""

    async def close(self) -> None:
        """Nothing to release."""

    # rate limits

    async def take_token(
        self, key: str, rate: float, burst: int, now: float, count: int = 1
    ) -> RateDecision:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(float(burst), now)
        bucket.tokens = min(burst, bucket.tokens + max(0.0, now - bucket.updated) * rate)
        # Never back in time: a caller whose clock lags (another process) must not make the
        # next caller refill the same seconds again.
        bucket.updated = max(bucket.updated, now)
        granted = tokens_granted(bucket.tokens, count)
        bucket.tokens -= granted
        return token_decision(granted, bucket.tokens, rate, burst)

    # in-flight leases

    async def acquire_slot(self, key: str, holder: str, cap: int, ttl: float, now: float) -> bool:
        slots = self._slots.setdefault(key, {})
        for lapsed in [h for h, until in slots.items() if until <= now]:
            del slots[lapsed]
        if len(slots) >= cap:
            return False
        slots[holder] = now + ttl
        return True

    async def release_slot(self, key: str, holder: str) -> None:
        self._slots.get(key, {}).pop(holder, None)

    async def renew_slots(self, key: str, holders: Sequence[str], ttl: float, now: float) -> None:
        slots = self._slots.get(key, {})
        for holder in holders:
            if slots.get(holder, 0.0) > now:
                slots[holder] = now + ttl

    # idempotency journal

    async def claim(
        self, key: str, fingerprint: str, owner: str, lease: float, ttl: float, now: float
    ) -> Claim:
        run = self._runs.get(key)
        if run is not None and run.expires <= now:
            del self._runs[key]
            run = None
        if run is None:
            self._runs[key] = _Run(fingerprint, owner, now + lease, now + ttl)
            return Claim(ClaimStatus.NEW)
        if run.fingerprint != fingerprint:
            return Claim(ClaimStatus.MISMATCH)
        if run.answer is not None:
            return Claim(ClaimStatus.DONE, answer=run.answer)
        if run.lease_until > now:
            return Claim(ClaimStatus.RUNNING)
        run.owner, run.lease_until = owner, now + lease
        return Claim(ClaimStatus.TAKEN_OVER, journal=dict(run.journal))

    async def renew(self, key: str, owner: str, lease: float, now: float) -> bool:
        run = self._live(key, owner, now)
        if run is not None:
            run.lease_until = now + lease
        return run is not None

    async def record_intent(
        self, key: str, owner: str, batch: int, intent: bytes, now: float
    ) -> bool:
        run = self._live(key, owner, now)
        if run is not None:
            run.journal[batch] = JournalEntry(intent)
        return run is not None

    async def record_outcome(self, key: str, batch: int, outcome: bytes) -> None:
        run = self._runs.get(key)
        if run is not None and batch in run.journal:
            run.journal[batch] = JournalEntry(run.journal[batch].intent, outcome)

    async def complete(self, key: str, owner: str, answer: bytes, ttl: float, now: float) -> bool:
        run = self._runs.get(key)
        if run is None or run.owner != owner or run.answer is not None:
            return False
        run.answer, run.lease_until, run.expires = answer, now, now + ttl
        run.journal.clear()
        return True

    async def abandon(self, key: str, owner: str) -> None:
        run = self._runs.get(key)
        if run is not None and run.owner == owner and run.answer is None:
            run.lease_until = 0.0

    def _live(self, key: str, owner: str, now: float) -> _Run | None:
        """``key``'s run if ``owner`` holds its lease now."""
        run = self._runs.get(key)
        if run is None or run.owner != owner or run.answer is not None or run.lease_until <= now:
            return None
        return run

    # quotas

    async def reserve(self, charges: Sequence[QuotaCharge]) -> QuotaResult:
        used = [self._counter(c.key) for c in charges]
        for index, (charge, value) in enumerate(zip(charges, used, strict=True)):
            if value + charge.amount > charge.limit:
                return QuotaResult(False, tuple(used), index)
        for charge in charges:
            counter = self._quotas.setdefault(charge.key, _Counter(0, charge.expires_at))
            counter.value += charge.amount
            counter.expires = max(counter.expires, charge.expires_at)
        return QuotaResult(True, tuple(self._quotas[c.key].value for c in charges))

    async def give_back(self, charges: Sequence[QuotaCharge]) -> None:
        for charge in charges:
            counter = self._quotas.get(charge.key)
            if counter is not None:
                counter.value = max(0, counter.value - charge.amount)

    async def quota_used(self, keys: Sequence[str]) -> list[int]:
        return [self._counter(key) for key in keys]

    def _counter(self, key: str) -> int:
        counter = self._quotas.get(key)
        return 0 if counter is None else counter.value

    # usage and audit

    async def add_usage(self, counts: UsageCounts, ttl: float, *, source: str, seq: int) -> None:
        if self._usage_seqs.get(source, 0) >= seq:
            return
        self._usage_seqs[source] = seq
        for day_key, increments in counts.items():
            day = self._usage.setdefault(day_key, {})
            for name, amount in increments.items():
                day[name] = day.get(name, 0) + amount

    async def read_usage(self, tenant: str, days: Sequence[str]) -> dict[str, dict[str, int]]:
        return {day: dict(self._usage.get((tenant, day), {})) for day in days}

    async def append_audit(self, entry: bytes, keep: int) -> None:
        self._audit.appendleft(entry)
        while len(self._audit) > keep:
            self._audit.pop()

    async def read_audit(self, limit: int) -> list[bytes]:
        return list(self._audit)[:limit]


def tokens_granted(tokens: float, count: int) -> int:
    """The whole tokens a bucket holding ``tokens`` gives to a request for ``count``."""
    return max(0, min(count, math.floor(tokens)))


def token_decision(granted: int, tokens: float, rate: float, burst: int) -> RateDecision:
    """The decision for a bucket left with ``tokens`` (shared by the backends)."""
    retry_after = 0.0 if granted else (1 - tokens) / rate
    reset = (burst - tokens) / rate
    return RateDecision(granted, math.floor(tokens), retry_after, reset)
