"""append-numbers' batches: the results a client sees, batching, bounded concurrent sending, and
one result per input entry in input order."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import NotRequired, TypedDict

from proxy.numbers import ContactItem, Entry


class Result(TypedDict):
    """One input entry's outcome, as the client sees it."""

    phoneNumber: object
    success: bool
    contactId: NotRequired[str]
    error: NotRequired[str]
    response: NotRequired[object]


@dataclass(frozen=True, slots=True)
class Batch:
    """Numbers sent in one call/append, with their positions in the input; ``index`` names the
    batch in the Idempotency-Key journal."""

    positions: tuple[int, ...]
    items: tuple[ContactItem, ...]
    index: int = 0


def make_batches(
    entries: Sequence[Entry], size: int, *, start: int = 0, skip: Collection[int] = ()
) -> list[Batch]:
    """The usable entries not in ``skip``, in input order, ``size`` to a batch, numbered from
    ``start``."""
    ready = [(n, e.item) for n, e in enumerate(entries) if e.item is not None and n not in skip]
    chunks = [ready[first : first + size] for first in range(0, len(ready), size)]
    return [
        Batch(tuple(n for n, _ in c), tuple(i for _, i in c), start + k)
        for k, c in enumerate(chunks)
    ]


async def run_batches(
    send: Callable[[Batch], Awaitable[list[Result]]], batches: Sequence[Batch], concurrency: int
) -> list[list[Result]]:
    """Each batch's results, in batch order, with at most ``concurrency`` in flight."""
    outcomes: list[list[Result]] = [[] for _ in batches]
    pending = iter(enumerate(batches))

    async def worker() -> None:
        for index, batch in pending:
            outcomes[index] = await send(batch)

    async with asyncio.TaskGroup() as group:
        for _ in range(min(concurrency, len(batches))):
            group.create_task(worker())
    return outcomes


def collect(
    entries: Sequence[Entry],
    batches: Sequence[Batch],
    outcomes: Sequence[list[Result]],
    known: Mapping[int, Result] | None = None,
) -> list[Result]:
    """One result per input entry, in input order; ``known`` holds results by position that
    were not sent now (a journal's)."""
    results: dict[int, Result] = {
        n: {"phoneNumber": e.shown, "success": False, "error": e.error}
        for n, e in enumerate(entries)
        if e.item is None
    }
    results.update(known or {})
    for batch, outcome in zip(batches, outcomes, strict=True):
        results.update(zip(batch.positions, outcome, strict=True))
    return [results[n] for n in range(len(entries))]
