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
from dataclasses import dataclass
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
OUTCOME_UNKNOWN: Final = (
    "OUTCOME_UNKNOWN: this batch was sent to nxlink but the gateway sending it stopped before "
    "the answer was recorded; check call/list before sending these numbers again"
)
NOT_SENT: Final = "not sent: the Idempotency-Key run was taken over or the state backend failed"


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
    for entry in journal.values():
        intent = json.loads(entry.intent)
        positions = [int(p) for p in intent["positions"] if 0 <= int(p) < len(entries)]
        if entry.outcome is not None:
            outcome = cast(list[Result], json.loads(entry.outcome))
            known.update(zip(positions, outcome, strict=False))
            continue
        for position, contact_id in zip(positions, intent["contactIds"], strict=False):
            known[position] = unknown_result(entries[position], str(contact_id))
    return known


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
    lost: bool = False  # the claim is another owner's now: send nothing more
    state_failed: bool = False

    async def send(
        self, batch: Batch, send: Callable[[Batch], Awaitable[list[Result]]]
    ) -> list[Result]:
        """Record the intent, send, record the outcome; never send once the claim is lost."""
        if self.lost or not await self._intent(batch):
            self.lost = True
            return [not_sent(item["phoneNumber"], item["contactId"]) for item in batch.items]
        results = await send(batch)
        outcome = encode_outcome(results)
        try:
            await self.state.shared_only(lambda s: s.record_outcome(self.key, batch.index, outcome))
        except StateUnavailable:
            self.state_failed = True
            logger.warning("outcome of batch %d not recorded: state unavailable", batch.index)
        return results

    async def _intent(self, batch: Batch) -> bool:
        intent, now = encode_intent(batch), time.time()
        try:
            return await self.state.shared_only(
                lambda s: s.record_intent(self.key, self.owner, batch.index, intent, now)
            )
        except StateUnavailable:
            self.state_failed = True
            return False

    async def keep_lease(self) -> None:
        """Renew the claim every third of its lease until cancelled or lost."""
        while not self.lost:
            await asyncio.sleep(self.lease / 3)
            try:
                kept = await self.state.shared_only(
                    lambda s: s.renew(self.key, self.owner, self.lease, time.time())
                )
            except StateUnavailable:
                continue  # record_intent refuses once the lease lapsed: nothing is sent then
            self.lost = self.lost or not kept

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
