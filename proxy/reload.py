"""Hot reload of tenants: on SIGHUP and when a watched file changes, swapped in whole."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final

from proxy.config import ConfigError
from proxy.metrics import Metrics
from proxy.tenants import Registry

if TYPE_CHECKING:
    from proxy.appkeys import GatewayState

logger = logging.getLogger(__name__)

POLL_SECONDS: Final = 2.0
Loader = Callable[[], Registry]
Stamp = tuple[int, int, int] | None


def file_stamp(path: Path) -> Stamp:
    """What changes when a file is rewritten or replaced: mtime, size, inode."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_mtime_ns, info.st_size, info.st_ino)


class Reloader:
    """Re-reads the configuration off the event loop and swaps the registry if it is valid."""

    def __init__(
        self,
        state: GatewayState,
        load: Loader,
        watched: Sequence[Path],
        metrics: Metrics,
        *,
        interval: float = POLL_SECONDS,
    ):
        self.state = state
        self.load = load
        self.watched = tuple(watched)
        self.metrics = metrics
        self.interval = interval
        self._wanted = asyncio.Event()
        # Taken now, next to the initial load: a change before watch() starts is not missed.
        self._stamps = [file_stamp(p) for p in self.watched]

    def request(self) -> None:
        """Ask for a reload now (the SIGHUP handler calls this)."""
        self._wanted.set()

    async def reload(self, reason: str) -> bool:
        """Load, validate and swap; a bad configuration is refused and the running one stays.

        The load and the swap hold the lock the admin's writes hold too: a load that read the
        tenants file before a write cannot swap its registry in after that write's."""
        async with self.state.swap_lock:
            try:
                registry = await asyncio.to_thread(self.load)
            except Exception as exc:  # whatever went wrong, the watcher and the gateway go on
                problems = exc.problems if isinstance(exc, ConfigError) else [repr(exc)]
                self.metrics.reloads.labels("failure").inc()
                logger.error(
                    "configuration reload refused (%s); keeping the running one",
                    reason,
                    extra={"problems": problems},
                    exc_info=not isinstance(exc, ConfigError),  # a surprise gets its traceback
                )
                return False
            self.state.registry = registry
            self.metrics.reloads.labels("success").inc()
            logger.info("configuration reloaded (%s)", reason, extra={"tenants": len(registry)})
            for warning in registry.warnings:
                logger.warning("configuration: %s", warning)
            return True

    async def watch(self) -> None:
        """Poll the watched files' stamps; reload on a change or on request."""
        while True:
            try:
                await asyncio.wait_for(self._wanted.wait(), self.interval)
                reason = "signal"
            except TimeoutError:
                reason = "file change"
            self._wanted.clear()
            current = [file_stamp(p) for p in self.watched]
            if reason == "signal" or current != self._stamps:
                self._stamps = current
                await self.reload(reason)
