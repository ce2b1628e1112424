"""The state interface: what limits, append-numbers, quotas, usage and the audit log need from a
backend that several processes may share.

Every operation is one atomic decision in the backend (no read-modify-write from the caller), and
takes ``now`` (Unix seconds) from the caller, so that every backend, Redis included, is tested
with the same clock. Values the features keep (answers, journal records, audit entries) are
opaque bytes here: the backends store them, they never look inside.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol


class StateUnavailable(Exception):
    """The backend could not be reached or failed; the caller decides how to go on."""


@dataclass(frozen=True, slots=True)
class RateDecision:
    """One token-bucket decision."""

    granted: int  # whole tokens taken by this decision (0 when refused)
    remaining: int  # whole tokens left after this decision
    retry_after: float  # seconds until a token is back (0.0 when allowed)
    reset: float  # seconds until the bucket is full again

    @property
    def allowed(self) -> bool:
        return self.granted >= 1


class RateLimits(Protocol):
    """Token buckets, one per key: ``rate`` tokens a second, at most ``burst`` saved up."""

    async def take_token(
        self, key: str, rate: float, burst: int, now: float, count: int = 1
    ) -> RateDecision:
        """Take as many whole tokens as ``key``'s bucket holds, at most ``count``, in one atomic
        step (a new bucket starts full)."""
        ...


class Leases(Protocol):
    """In-flight slots held as leases: a slot whose holder stops renewing it lapses."""

    async def acquire_slot(self, key: str, holder: str, cap: int, ttl: float, now: float) -> bool:
        """Hold one of ``key``'s ``cap`` slots for ``ttl`` seconds; False when all are held."""
        ...

    async def release_slot(self, key: str, holder: str) -> None:
        """Give ``holder``'s slot back (nothing happens if it already lapsed)."""
        ...

    async def renew_slots(self, key: str, holders: Sequence[str], ttl: float, now: float) -> None:
        """Extend the leases of ``holders`` (the ones still held) to ``now + ttl``."""
        ...


class ClaimStatus(enum.Enum):
    """What ``claim`` found."""

    NEW = "new"  # nobody had the key: the caller owns it now, with an empty journal
    TAKEN_OVER = "taken_over"  # the previous owner's lease lapsed: the caller owns it now
    RUNNING = "running"  # another owner holds a live lease: wait and ask again
    DONE = "done"  # the run finished: ``answer`` holds its answer
    MISMATCH = "mismatch"  # the key was claimed with another fingerprint (another body)


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """One batch of a run: recorded before it was sent, and its outcome once nxlink answered."""

    intent: bytes
    outcome: bytes | None = None  # None: sent (or about to be) with no answer recorded


@dataclass(frozen=True, slots=True)
class Claim:
    """The answer to ``claim``."""

    status: ClaimStatus
    answer: bytes | None = None  # DONE
    journal: Mapping[int, JournalEntry] = field(default_factory=dict)  # TAKEN_OVER


class Journal(Protocol):
    """Idempotency-Key runs: a claim held as a lease, each batch's intent and outcome, the answer.

    A record lives ``ttl`` seconds from its claim, and ``ttl`` again from its completion."""

    async def claim(
        self, key: str, fingerprint: str, owner: str, lease: float, ttl: float, now: float
    ) -> Claim:
        """Own ``key`` for ``lease`` seconds, or say who has it. The fingerprint is compared
        before anything else: another body under the same key is MISMATCH whatever the state."""
        ...

    async def renew(self, key: str, owner: str, lease: float, now: float) -> bool:
        """Extend ``owner``'s lease; False when the claim is no longer ``owner``'s."""
        ...

    async def record_intent(
        self, key: str, owner: str, batch: int, intent: bytes, now: float
    ) -> bool:
        """Record that ``batch`` (any integer, negative ones too) is about to be sent, only
        while ``owner`` holds a live lease; False means the claim was lost and the batch must NOT
        be sent. A second record at the same index replaces the first."""
        ...

    async def record_outcome(self, key: str, batch: int, outcome: bytes) -> None:
        """Record the answer to a batch whose intent was recorded (even by an owner that lost
        the claim since: what nxlink did is worth keeping)."""
        ...

    async def complete(self, key: str, owner: str, answer: bytes, ttl: float, now: float) -> bool:
        """Store the run's answer (kept ``ttl`` seconds) and end the lease; False when the claim
        was no longer ``owner``'s (the answer is then not stored)."""
        ...

    async def abandon(self, key: str, owner: str) -> None:
        """End ``owner``'s lease now, journal kept, so that a repeat takes over at once."""
        ...


@dataclass(frozen=True, slots=True)
class QuotaCharge:
    """An amount to reserve against one budget window, e.g. ``t-1:numbersPerDay:2026-12-01``."""

    key: str
    limit: int
    amount: int
    expires_at: float  # Unix seconds after which the window's counter may be dropped


@dataclass(frozen=True, slots=True)
class QuotaResult:
    """The answer to ``reserve``."""

    granted: bool
    used: tuple[int, ...]  # each charge's counter: after the reservation when granted, else now
    refused: int | None = None  # index of the first charge that did not fit


class QuotaCounters(Protocol):
    """Budget counters per window, reserved all together or not at all."""

    async def reserve(self, charges: Sequence[QuotaCharge]) -> QuotaResult:
        """Add every amount if each counter stays within its limit; else add nothing."""
        ...

    async def give_back(self, charges: Sequence[QuotaCharge]) -> None:
        """Subtract the amounts (a counter never goes below zero)."""
        ...

    async def quota_used(self, keys: Sequence[str]) -> list[int]:
        """The counters of ``keys`` (0 for an unknown one)."""
        ...


UsageCounts = Mapping[tuple[str, str], Mapping[str, int]]  # (tenant id, YYYY-MM-DD) → field → n


class UsageLedger(Protocol):
    """Per tenant and day: named counters (``requests``, ``action:callAppend``, ...)."""

    async def add_usage(self, counts: UsageCounts, ttl: float, *, source: str, seq: int) -> None:
        """Add the increments of batch ``seq`` from ``source`` (one process's ledger, which
        numbers its batches 1, 2, ... and sends them in order), unless a batch of that source
        numbered ``seq`` or more was added already: a flush sent again because its answer was
        late or lost adds nothing the second time. A day's counters, and a source's last
        number, are kept ``ttl`` seconds after their last change."""
        ...

    async def read_usage(self, tenant: str, days: Sequence[str]) -> dict[str, dict[str, int]]:
        """Each day's counters (an empty dict for a day without traffic)."""
        ...


class AuditLog(Protocol):
    """The admin API's audit entries, newest first, at most ``keep`` of them."""

    async def append_audit(self, entry: bytes, keep: int) -> None:
        """Add one entry, dropping the oldest past ``keep``."""
        ...

    async def read_audit(self, limit: int) -> list[bytes]:
        """The newest ``limit`` entries, newest first."""
        ...


class StateBackend(RateLimits, Leases, Journal, QuotaCounters, UsageLedger, AuditLog, Protocol):
    """One backend: all of the above, plus what start-up and ``check`` say about it."""

    url: str  # as configured, password masked
    shared: str  # who shares it, e.g. "this process", "processes on this host", "replicas"
    durable: bool  # kept across a restart

    async def ping(self) -> None:
        """Raise ``StateUnavailable`` unless the backend answers."""
        ...

    async def close(self) -> None:
        """Release connections and files."""
        ...
