"""Idempotency-Key answers: the store interface and this process's in-memory store."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Protocol

from proxy import errors

HASH_INLINE_BYTES: Final = 1024 * 1024
STORE_MAX_ENTRIES: Final = 10_000
STORE_MAX_BYTES: Final = 256 * 1024 * 1024


async def body_digest(raw: bytes) -> str:
    """SHA-256 of the raw body; large bodies are hashed off the event loop."""
    if len(raw) > HASH_INLINE_BYTES:
        return (await asyncio.to_thread(hashlib.sha256, raw)).hexdigest()
    return hashlib.sha256(raw).hexdigest()


class IdempotencyStore(Protocol):
    """Answers kept per Idempotency-Key; a shared store can replace the in-memory one."""

    async def claim(self, key: str, fingerprint: str) -> bytes | None:
        """The stored answer (waiting out a run in progress), or None: the caller runs it."""

    async def complete(self, key: str, answer: bytes) -> None:
        """Keep the answer of a claimed run for the store's TTL."""

    async def release(self, key: str) -> None:
        """Give up a claim without an answer, so a repeat runs instead."""


@dataclass(slots=True)
class _Running:
    fingerprint: str
    done: asyncio.Event = field(default_factory=asyncio.Event)
    answer: bytes | None = None


@dataclass(frozen=True, slots=True)
class _Stored:
    fingerprint: str
    answer: bytes
    expires: float


class MemoryIdempotencyStore:
    """This process's idempotency store: TTL, oldest evicted past its bounds, injectable clock."""

    def __init__(
        self,
        *,
        ttl: float,
        max_entries: int = STORE_MAX_ENTRIES,
        max_bytes: int = STORE_MAX_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.ttl, self.max_entries, self.max_bytes, self.clock = ttl, max_entries, max_bytes, clock
        self._running: dict[str, _Running] = {}
        self._stored: OrderedDict[str, _Stored] = OrderedDict()
        self._bytes = 0

    async def claim(self, key: str, fingerprint: str) -> bytes | None:
        """The stored answer (waiting out a run in progress), or None: the caller runs it."""
        while (running := self._running.get(key)) is not None:
            _same_body(running.fingerprint, fingerprint)
            await running.done.wait()
            if running.answer is not None:
                return running.answer
        self._evict()
        stored = self._stored.get(key)
        if stored is not None:
            _same_body(stored.fingerprint, fingerprint)
            return stored.answer
        self._running[key] = _Running(fingerprint)
        return None

    async def complete(self, key: str, answer: bytes) -> None:
        """Keep the answer of a claimed run for the store's TTL."""
        running = self._running.pop(key)
        running.answer = answer
        self._stored[key] = _Stored(running.fingerprint, answer, self.clock() + self.ttl)
        self._bytes += len(answer)
        self._evict()
        running.done.set()

    async def release(self, key: str) -> None:
        """Give up a claim without an answer, so a repeat runs instead."""
        self._running.pop(key).done.set()

    def _evict(self) -> None:
        """Drop expired answers (oldest first, one TTL for all) and, past the bounds, the oldest."""
        now = self.clock()
        while self._stored:
            oldest = next(iter(self._stored.values()))
            over = len(self._stored) > self.max_entries or self._bytes > self.max_bytes
            if not over and oldest.expires > now:
                return
            self._stored.popitem(last=False)
            self._bytes -= len(oldest.answer)


def _same_body(stored: str, given: str) -> None:
    if stored != given:
        raise errors.IdempotencyKeyReused()
