"""Shared state: the interface (``base``) and one module per backend, chosen by ``STATE_URL``."""

from __future__ import annotations

from proxy.state.base import StateBackend, StateUnavailable
from proxy.state.memory import MemoryState

__all__ = ["MemoryState", "StateBackend", "StateUnavailable", "open_state"]


def open_state(url: str) -> StateBackend:
    """The backend for ``url`` (already checked by the settings); ``memory://`` when empty."""
    if not url or url.startswith("memory:"):
        return MemoryState()
    raise NotImplementedError(f"no backend for {url.split(':', 1)[0]} yet")
