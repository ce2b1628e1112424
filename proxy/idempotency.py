"""Idempotency-Key runs of append-numbers over the state backend's journal.

A run is claimed as a lease that its owner renews while it goes on. Each batch's intent (its
positions and contactIds) is recorded before the batch is sent and its outcome once nxlink
answered, so that a repeat taking over from an owner that died reuses the recorded outcomes,
sends the batches never sent, and sends no batch whose outcome is unknown."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, cast

from proxy import errors
from proxy.batches import Batch, Result
from proxy.config import Settings
from proxy.numbers import Entry
from proxy.state.base import Claim, ClaimStatus, JournalEntry, StateUnavailable
from proxy.state.fallback import ResilientState

logger = logging.getLogger(__name__)

HASH_INLINE_BYTES: Final = 1024 * 1024
POLL_EVERY: Final = 0.15  # seconds between claims while another process runs the key
UNKNOWN_PREFIX: Final = "OUTCOME_UNKNOWN:"  # every error saying nxlink may have the batch
OUTCOME_UNKNOWN: Final = (
    f"{UNKNOWN_PREFIX} this batch was sent to nxlink but the gateway sending it stopped before "
    "the answer was recorded; check call/list before sending these numbers again"
)
NOT_SENT: Final = "not sent: the Idempotency-Key run was taken over or the state backend failed"
RESERVATION_INDEX: Final = -1  # the journal entry holding the run's quota reservation, no batch's


async def body_digest(raw: bytes) -> str:
    """SHA-256 of the raw body; large bodies are hashed off the event loop."""
    if len(raw) > HASH_INLINE_BYTES:
        return (await asyncio.to_thread(hashlib.sha256, raw)).hexdigest()
    return hashlib.sha256(raw).hexdigest()


def journal_key(tenant_id: str, given: str) -> str:
    """The backend key of a tenant's Idempotency-Key (hashed: any header text, bounded size)."""
    digest = hashlib.sha256(given.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return f"idem:{tenant_id}:{digest}"


def new_owner() -> str:
    """An owner id unique to one request."""
    return f"{os.getpid()}-{secrets.token_hex(8)}"


async def claim_run(
    state: ResilientState, key: str, fingerprint: str, owner: str, settings: Settings
) -> Claim:
    """NEW, TAKEN_OVER or DONE; waits out another owner's run up to ``IDEMPOTENCY_WAIT``, then
    409; another body is 422; a backend that does not answer is 503."""
    deadline = time.monotonic() + settings.idempotency_wait
    lease, ttl = settings.idempotency_lease, settings.idempotency_ttl
    while True:
        try:
            claim = await state.shared_only(
                lambda s: s.claim(key, fingerprint, owner, lease, ttl, time.time())
            )
        except StateUnavailable as exc:
            raise errors.StateUnreachable(retry_after=5) from exc
        if claim.status is ClaimStatus.MISMATCH:
            raise errors.IdempotencyKeyReused()
        if claim.status is not ClaimStatus.RUNNING:
            return claim
        if time.monotonic() >= deadline:
            raise errors.IdempotencyInProgress(retry_after=math.ceil(lease))
        await asyncio.sleep(POLL_EVERY)


def encode_intent(batch: Batch) -> bytes:
    contact_ids = [item["contactId"] for item in batch.items]
    return json.dumps({"positions": batch.positions, "contactIds": contact_ids}).encode()


def encode_outcome(results: Sequence[Result]) -> bytes:
    return json.dumps(results, ensure_ascii=False).encode("utf-8", "backslashreplace")


def recovered(entries: Sequence[Entry], journal: Mapping[int, JournalEntry]) -> dict[int, Result]:
    """Results by input position from a previous owner's journal: its recorded outcomes, and
    OUTCOME_UNKNOWN for the batches it sent with no outcome recorded."""
    known: dict[int, Result] = {}
    batches = (entry for index, entry in journal.items() if index != RESERVATION_INDEX)
    for entry in batches:
        intent = json.loads(entry.intent)
        positions = [int(p) for p in intent["positions"] if 0 <= int(p) < len(entries)]
        if entry.outcome is not None:
            outcome = cast(list[Result], json.loads(entry.outcome))
            known.update(zip(positions, outcome, strict=False))
            continue
        for position, contact_id in zip(positions, intent["contactIds"], strict=False):
            known[position] = unknown_result(entries[position], str(contact_id))
    return known


def recorded_reservation(journal: Mapping[int, JournalEntry]) -> bytes | None:
    """The quota reservation a previous owner recorded before sending, if it did."""
    entry = journal.get(RESERVATION_INDEX)
    return None if entry is None else entry.intent


def no_answer(reason: str) -> str:
    """The error of a batch written to nxlink whose answer never came (``reason``)."""
    return (
        f"{UNKNOWN_PREFIX} this batch was sent to nxlink but no answer came ({reason}); "
        "check call/list before sending these numbers again"
    )


def is_unknown(result: Result) -> bool:
    """True when nxlink may have taken the result's number: it must not be sent again."""
    return result.get("error", "").startswith(UNKNOWN_PREFIX)


def unknown_result(entry: Entry, contact_id: str) -> Result:
    number = entry.item["phoneNumber"] if entry.item is not None else entry.shown
    return {
        "phoneNumber": number,
        "success": False,
        "contactId": contact_id,
        "error": OUTCOME_UNKNOWN,
    }


@dataclass(slots=True)
class JournalRun:
    """One owner's run of an Idempotency-Key: every batch journaled around its sending."""

    state: ResilientState
    key: str
    owner: str
    lease: float
    lost: bool = False  # the claim is another owner's now, or its lease lapsed: send nothing more
    state_failed: bool = False
    held_until: float = field(init=False, default=0.0)  # monotonic: how long the lease lasts

    def __post_init__(self) -> None:
        self.held_until = time.monotonic() + self.lease

    async def send(
        self, batch: Batch, send: Callable[[Batch], Awaitable[list[Result]]]
    ) -> list[Result]:
        """Record the intent, send, record the outcome; never send once the claim is lost."""
        if not self.held() or not await self._record(batch.index, encode_intent(batch)):
            return [not_sent(item["phoneNumber"], item["contactId"]) for item in batch.items]
        results = await send(batch)
        outcome = encode_outcome(results)
        try:
            await self.state.shared_only(lambda s: s.record_outcome(self.key, batch.index, outcome))
        except StateUnavailable:
            self.state_failed = True
            logger.warning("outcome of batch %d not recorded: state unavailable", batch.index)
        return results

    async def record_reservation(self, reservation: bytes) -> bool:
        """Record the run's quota reservation (before any batch is sent, and again as settled
        before giving back); False, and nothing more is sent, once the claim is lost."""
        return self.held() and await self._record(RESERVATION_INDEX, reservation)

    async def _record(self, index: int, intent: bytes) -> bool:
        now = time.time()
        try:
            recorded = await self.state.shared_only(
                lambda s: s.record_intent(self.key, self.owner, index, intent, now)
            )
        except StateUnavailable:
            self.state_failed, recorded = True, False
        self.lost = self.lost or not recorded
        return recorded

    async def keep_lease(self) -> None:
        """Renew the claim every third of its lease until cancelled or lost, on a schedule kept
        from the start: a renewal gets at most that third, so a slow one never delays the next."""
        every = self.lease / 3
        due = time.monotonic()
        while not self.lost:
            due += every
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            asked = time.monotonic()
            try:
                kept = await self.state.shared_only(
                    lambda s: s.renew(self.key, self.owner, self.lease, time.time()), every
                )
            except StateUnavailable:
                continue  # the lease lapses at held_until unless a later renewal answers
            self.lost = self.lost or not kept
            self.held_until = asked + self.lease

    def held(self) -> bool:
        """False once the claim is lost or its lease lapsed with no renewal known to answer."""
        if not self.lost and time.monotonic() >= self.held_until:
            self.lost = self.state_failed = True
            logger.warning("Idempotency-Key lease lapsed: state too slow or unavailable")
        return not self.lost

    async def finish(self, answer: bytes, ttl: float) -> bool:
        """Store the answer for repeats (a run that lost its claim or the backend answers its
        own caller all the same); False when it was not stored (the backend failed, or the claim
        lapsed: a repeat then answers in its stead)."""
        self.check()
        try:
            return await self.state.shared_only(
                lambda s: s.complete(self.key, self.owner, answer, ttl, time.time())
            )
        except StateUnavailable:
            logger.warning("Idempotency-Key answer not stored: state unavailable")
            return False

    def check(self) -> None:
        """Raise when a batch was left unsent: 503 if the backend failed, else 409."""
        if self.state_failed and self.lost:
            raise errors.StateUnreachable(retry_after=5)
        if self.lost:
            raise errors.IdempotencyInProgress(
                "This Idempotency-Key run was taken over by another request",
                retry_after=math.ceil(self.lease),
            )

    async def abandon(self) -> None:
        """End the lease now (journal kept) so that a repeat takes over at once."""
        try:
            await self.state.shared_only(lambda s: s.abandon(self.key, self.owner))
        except StateUnavailable:
            logger.warning("Idempotency-Key claim not given up: state unavailable")


def not_sent(number: object, contact_id: str) -> Result:
    return {"phoneNumber": number, "success": False, "contactId": contact_id, "error": NOT_SENT}
