"""Shared state: the interface (``base``) and one module per backend, chosen by ``STATE_URL``."""

from __future__ import annotations

from typing import Final

from proxy.state.base import StateBackend, StateUnavailable
from proxy.state.memory import MemoryState

__all__ = [
    "REACHABLE",
    "MemoryState",
    "StateBackend",
    "StateUnavailable",
    "check_state",
    "describe_state",
    "open_state",
    "state_report",
]

REACHABLE: Final = "reachable"


def open_state(url: str) -> StateBackend:
    """The backend for ``url`` (already checked by the settings); ``memory://`` when empty.

    Nothing is connected yet: SQLite opens its file and Redis its connections on first use."""
    scheme = url.split(":", 1)[0] if url else "memory"
    if scheme == "memory":
        return MemoryState()
    if scheme == "sqlite":
        from proxy.state.sqlite import SqliteState

        return SqliteState(url)
    if scheme in ("redis", "rediss", "unix"):
        from proxy.state.redis import RedisState  # the client library only when it is used

        return RedisState(url)
    raise ValueError(f"no state backend for the scheme {scheme!r}")


def describe_state(backend: StateBackend) -> str:
    """One line for start-up and ``check``: the backend (password masked) and who keeps it."""
    kept = "kept across restarts" if backend.durable else "lost on restart"
    return f"state {backend.url}: shared by {backend.shared}, {kept}"


async def check_state(backend: StateBackend) -> str:
    """``reachable``, or ``unreachable`` with the reason (for ``check`` and start-up)."""
    try:
        await backend.ping()
    except StateUnavailable as exc:
        return f"unreachable ({exc})"
    return REACHABLE


async def state_report(url: str) -> tuple[str, str]:
    """``describe_state`` and ``check_state`` for ``url``'s backend, opened and closed here."""
    backend = open_state(url)
    try:
        return describe_state(backend), await check_state(backend)
    finally:
        await backend.close()
