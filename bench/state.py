"""``python -m bench.state``: the time one ``take_token`` and one ``reserve`` take on each state
backend (memory, a SQLite file, a redis-server on 127.0.0.1 started for the run), one call at a
time (the added latency of a request) and 32 at once (what one process gets through)."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

from proxy.state import open_state
from proxy.state.base import QuotaCharge, StateBackend
from tests.redis_server import RedisServer

CONCURRENT: Final = 32
Operation = Callable[[StateBackend, int], Awaitable[object]]


async def take_token(backend: StateBackend, n: int) -> object:
    return await backend.take_token(f"bench:{n % 8}", 1e9, 10**9, time.time())


async def reserve(backend: StateBackend, n: int) -> object:
    day = QuotaCharge(f"bench:day:{n % 8}", 10**12, 1, time.time() + 86_400)
    month = QuotaCharge(f"bench:month:{n % 8}", 10**12, 1, time.time() + 86_400)
    return await backend.reserve([day, month])


async def one_at_a_time(backend: StateBackend, op: Operation, calls: int) -> tuple[float, float]:
    """p50 and p99 of one call, in microseconds."""
    spent = []
    for n in range(calls):
        started = time.perf_counter()
        await op(backend, n)
        spent.append((time.perf_counter() - started) * 1e6)
    cuts = statistics.quantiles(spent, n=100)
    return cuts[49], cuts[98]


async def many_at_once(backend: StateBackend, op: Operation, calls: int) -> float:
    """Calls a second with ``CONCURRENT`` in flight."""
    gate = asyncio.Semaphore(CONCURRENT)

    async def one(n: int) -> None:
        async with gate:
            await op(backend, n)

    started = time.perf_counter()
    await asyncio.gather(*(one(n) for n in range(calls)))
    return calls / (time.perf_counter() - started)


async def measure(url: str, calls: int) -> list[str]:
    backend = open_state(url)
    rows = []
    for name, op in (("take_token", take_token), ("reserve", reserve)):
        await one_at_a_time(backend, op, calls // 10)  # warm-up: file, connections, scripts
        p50, p99 = await one_at_a_time(backend, op, calls)
        rate = await many_at_once(backend, op, calls)
        scheme = url.split(":", 1)[0]
        rows.append(f"| {scheme} | {name} | {p50:.0f} | {p99:.0f} | {rate:,.0f} |")
    await backend.close()
    return rows


@contextmanager
def stores() -> Iterator[list[str]]:
    """The three URLs: memory, a fresh SQLite file, a fresh redis-server."""
    with tempfile.TemporaryDirectory(prefix="bench-state-") as folder:
        server = RedisServer(Path(folder))
        server.start()
        try:
            yield ["memory://", f"sqlite:///{folder}/state.db", server.url]
        finally:
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--calls", type=int, default=5000, help="calls per figure")
    args = parser.parse_args()
    lines = ["| backend | call | p50 µs | p99 µs | calls/s, 32 at once |", "|---|---|---|---|---|"]
    with stores() as urls:
        for url in urls:
            lines += asyncio.run(measure(url, args.calls))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
