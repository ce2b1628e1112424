"""Test doubles for state: a hand-moved clock, and a backend that counts calls, can stop, and can
leave calls unanswered."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, Final

from proxy.state import MemoryState, StateUnavailable

OPERATIONS: Final = frozenset(
    {
        "ping",
        "take_token",
        "acquire_slot",
        "release_slot",
        "renew_slots",
        "claim",
        "renew",
        "record_intent",
        "record_outcome",
        "complete",
        "abandon",
        "reserve",
        "give_back",
        "quota_used",
        "add_usage",
        "read_usage",
        "append_audit",
        "read_audit",
    }
)


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class SwitchableState(MemoryState):
    """``MemoryState`` whose every operation is counted and fails while ``down`` is set; the
    next ``stalls[name]`` calls of an operation never answer (until the caller gives up)."""

    url = "switchable://"

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.down = False
        self.stalls: Counter[str] = Counter()

    def __getattribute__(self, name: str) -> Any:
        attr = super().__getattribute__(name)
        if name not in OPERATIONS:
            return attr
        return _watched(self, name, attr)


def _watched(
    state: SwitchableState, name: str, operation: Callable[..., Awaitable[Any]]
) -> Callable[..., Awaitable[Any]]:
    async def call(*args: Any, **kwargs: Any) -> Any:
        state.calls.append(name)
        if state.down:
            raise StateUnavailable("switched off by the test")
        if state.stalls[name] > 0:
            state.stalls[name] -= 1
            await asyncio.Event().wait()  # cancelled by the caller's deadline
        return await operation(*args, **kwargs)

    return call
