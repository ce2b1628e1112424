"""Shared state: the interface (``base``) and one module per backend, chosen by ``STATE_URL``."""

from __future__ import annotations

from proxy.state.base import StateBackend, StateUnavailable
from proxy.state.memory import MemoryState

__all__ = [
    "MemoryState",
    "StateBackend",
    "StateUnavailable",
    "check_state",
    "describe_state",
    "open_state",
]


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
    return "reachable"
