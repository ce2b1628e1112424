"""The shared backend as the features use it: this process's memory stands in for limits and
quotas while the backend is unreachable, and the backend is tried again every few seconds."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Final, Literal, TypeVar

from proxy.state.base import StateBackend, StateUnavailable
from proxy.state.memory import MemoryState

logger = logging.getLogger(__name__)

T = TypeVar("T")
Operation = Callable[[StateBackend], Awaitable[T]]
Where = Literal["shared", "local"]

RETRY_EVERY: Final = 2.0  # seconds between tries of a backend that failed
CALL_TIMEOUT: Final = 5.0  # one state call's deadline
PING_TIMEOUT: Final = 1.0  # /readyz must answer quickly whatever the backend does
LOG_EVERY: Final = 60.0  # at most one "unavailable" warning a minute


def _nothing() -> None:
    return None


class ResilientState:
    """``shared`` for every operation; ``local`` (memory) for limits and quotas while it is down."""

    def __init__(
        self,
        shared: StateBackend,
        *,
        on_error: Callable[[], None] = _nothing,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.shared = shared
        self.local = MemoryState()
        self.on_error, self.clock = on_error, clock
        self.available = True
        self._retry_at = 0.0
        self._probing = False  # a call is trying the backend that failed
        self._logged_at = -LOG_EVERY

    async def shared_or_local(self, operation: Operation[T]) -> T:
        """``operation`` on the shared backend, or on this process's memory while it is down."""
        result, _where = await self.located(operation)
        return result

    async def located(self, operation: Operation[T]) -> tuple[T, Where]:
        """``operation`` as ``shared_or_local`` runs it, and which backend ran it (one call at a
        time tries a down backend again; the others meanwhile stay in memory)."""
        probe = not self.available
        if probe and (self._probing or self.clock() < self._retry_at):
            return await operation(self.local), "local"
        self._probing = self._probing or probe  # this call is the one that tries
        try:
            return await self.shared_only(operation), "shared"
        except StateUnavailable:
            return await operation(self.local), "local"
        finally:
            if probe:
                self._probing = False

    async def on(self, where: Where, operation: Operation[T]) -> T:
        """``operation`` on the backend that ``located`` named (``shared`` may raise
        ``StateUnavailable``: what the shared backend holds never goes to memory)."""
        if where == "local":
            return await operation(self.local)
        return await self.shared_only(operation)

    async def shared_only(self, operation: Operation[T], timeout: float = CALL_TIMEOUT) -> T:
        """``operation`` on the shared backend; raises ``StateUnavailable`` when it fails."""
        try:
            async with asyncio.timeout(timeout):
                result = await operation(self.shared)
        except (StateUnavailable, TimeoutError) as exc:
            self._failed(exc)
            raise StateUnavailable(str(exc) or exc.__class__.__name__) from exc
        if not self.available:
            self.available = True
            logger.warning("shared state is back: %s answers again", self.shared.url)
        return result

    async def ping(self) -> bool:
        """True when the shared backend answers now."""
        try:
            await self.shared_only(lambda backend: backend.ping(), PING_TIMEOUT)
        except StateUnavailable:
            return False
        return True

    async def close(self) -> None:
        """Close the shared backend."""
        await self.shared.close()

    def _failed(self, exc: BaseException) -> None:
        now = self.clock()
        self.available, self._retry_at = False, now + RETRY_EVERY
        self.on_error()
        if now - self._logged_at >= LOG_EVERY:
            self._logged_at = now
            logger.warning(
                "shared state unavailable: %s failed (%s); limits and quotas use this process's "
                "memory, Idempotency-Key requests get 503 until it answers",
                self.shared.url,
                str(exc) or exc.__class__.__name__,
            )
