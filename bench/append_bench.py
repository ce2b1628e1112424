"""append-numbers benchmark: N numbers through the real gateway against a 20 ms fake nxlink.

Run ``python -m bench.append_bench [--numbers N]``. The baseline (one upstream call per number,
sequentially, as a gateway without batching would do) is measured on a sample of numbers through
the same gateway with APPEND_BATCH_SIZE=1 and APPEND_CONCURRENCY=1, then extrapolated to N.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from bench.state import stores
from bench.upstream import create_upstream_app
from proxy import serve
from proxy.app import create_app
from proxy.config import parse_settings
from proxy.tenants import DEMO_TENANTS, demo_registry

LOOPBACK: Final = "127.0.0.1"
LATENCY: Final = 0.020
BASELINE_SAMPLE: Final = 200
KEY: Final = DEMO_TENANTS[0][2]
URL_PATH: Final = "/api/openapi/append-numbers"
SEQUENTIAL: Final = {"APPEND_BATCH_SIZE": "1", "APPEND_CONCURRENCY": "1"}


@asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    """``app`` listening on a free loopback port; yields its base URL."""
    runner = await serve.start_site(app, LOOPBACK, 0)
    try:
        yield f"http://{LOOPBACK}:{serve.bound_port(runner)}"
    finally:
        await runner.cleanup()


def call_counter(calls: list[int]) -> Middleware:
    """An upstream middleware counting the calls it receives."""

    @web.middleware
    async def count(request: web.Request, handler: Handler) -> web.StreamResponse:
        calls.append(1)
        return await handler(request)

    return count


async def append_once(
    upstream: str, count: int, env: dict[str, str], idempotency_key: str | None = None
) -> tuple[float, int]:
    """Wall time of one append-numbers request of ``count`` numbers, and its success count;
    with ``idempotency_key`` the run goes through the state journal of ``STATE_URL``."""
    gateway = create_app(parse_settings(env), demo_registry(upstream))
    body = {"taskId": "bench", "phoneNumbers": [f"138{n:08d}" for n in range(count)]}
    headers = {"x-api-key": KEY}
    if idempotency_key is not None:
        headers["Idempotency-Key"] = idempotency_key
    async with serving(gateway) as base, aiohttp.ClientSession(base) as client:
        warm = {"taskId": "warm-up", "phoneNumbers": ["13800000000"]}
        await (await client.post(URL_PATH, json=warm, headers={"x-api-key": KEY})).read()
        started = time.perf_counter()
        async with client.post(URL_PATH, json=body, headers=headers) as response:
            answer = await response.json()
        wall = time.perf_counter() - started
    return wall, int(answer["data"]["successCount"])


async def measure(numbers: int) -> dict[str, Any]:
    """Batched run of ``numbers`` and a sequential sample, against one fake upstream."""
    calls: list[int] = []
    upstream_app = create_upstream_app(LATENCY)
    upstream_app.middlewares.append(call_counter(calls))
    async with serving(upstream_app) as upstream:
        wall, succeeded = await append_once(upstream, numbers, {"APPEND_MAX_NUMBERS": str(numbers)})
        batched_calls = len(calls) - 1
        sample = min(numbers, BASELINE_SAMPLE)
        sample_wall, _ = await append_once(upstream, sample, SEQUENTIAL)
        journaled = await journal_runs(upstream, numbers)
    settings = parse_settings({})
    baseline = sample_wall * numbers / sample
    return {
        "numbers": numbers,
        "wall_s": wall,
        "succeeded": succeeded,
        "upstream_calls": batched_calls,
        "batch_size": settings.append_batch_size,
        "concurrency": settings.append_concurrency,
        "upstream_latency_ms": LATENCY * 1000,
        "baseline_sample": sample,
        "baseline_sample_s": sample_wall,
        "baseline_extrapolated_s": baseline,
        "speedup": baseline / wall,
        "journaled_wall_s": journaled,
    }


async def journal_runs(upstream: str, numbers: int) -> dict[str, float]:
    """The same request with an Idempotency-Key, its batches journaled on each backend."""
    walls: dict[str, float] = {}
    with stores() as urls:
        for url in urls:
            env = {"APPEND_MAX_NUMBERS": str(numbers), "STATE_URL": url}
            walls[url.split(":", 1)[0]], _ = await append_once(upstream, numbers, env, "bench-1")
    return walls


def run(numbers: int = 10_000) -> dict[str, Any]:
    """Run the benchmark in a fresh event loop and return its figures."""
    figures: dict[str, Any] = {}

    async def main() -> None:
        figures.update(await measure(numbers))

    serve.run(main())
    return figures


def table(figures: dict[str, Any]) -> list[str]:
    """The figures as a small Markdown table."""
    n, sample = figures["numbers"], figures["baseline_sample"]
    return [
        f"append-numbers: {n} numbers, fake nxlink with {figures['upstream_latency_ms']:.0f} ms "
        f"per call, batch {figures['batch_size']}, concurrency {figures['concurrency']}",
        "| run | upstream calls | wall time |",
        "|---|---|---|",
        f"| batched (gateway defaults) | {figures['upstream_calls']} | {figures['wall_s']:.3f} s |",
        f"| one call per number, sequential: measured on {sample} | {sample} "
        f"| {figures['baseline_sample_s']:.3f} s |",
        f"| same, extrapolated to {n} (x{n / sample:g}) | {n} "
        f"| {figures['baseline_extrapolated_s']:.1f} s |",
        *(
            f"| batched, Idempotency-Key journaled on {name} | {figures['upstream_calls']} "
            f"| {wall:.3f} s |"
            for name, wall in figures.get("journaled_wall_s", {}).items()
        ),
        f"speed-up: {figures['speedup']:.0f}x (target >= 100x); "
        f"batched wall time target < 2 s (ideally < 1 s; journaled < 1 s); "
        f"succeeded {figures['succeeded']}/{n}",
    ]


def main() -> None:
    """Command line: print the table and the figures as JSON."""
    parser = argparse.ArgumentParser(prog="python -m bench.append_bench", description=__doc__)
    parser.add_argument("--numbers", type=int, default=10_000)
    figures = run(parser.parse_args().numbers)
    print("\n".join(table(figures)))
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
