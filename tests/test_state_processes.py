"""Two OS processes sharing one store (a SQLite file, a Redis server) reserve quota or take
tokens at the same time: together they never get more than the limit, and a bucket shared on
the real clock admits ``burst + rate x T``. Run as a module, this file is one of them."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Final

import pytest

from proxy.state import open_state
from proxy.state.base import QuotaCharge, StateBackend
from tests.processes import ROOT
from tests.redis_server import RedisServer

LIMIT: Final = 120
ATTEMPTS: Final = 100  # per process: 200 attempts for 120 units
CONCURRENCY: Final = 10  # calls in flight per process
KEY: Final = "t-1:numbersPerDay:2026-12-01"
WAIT: Final = 30.0
RATE: Final = 100.0
BURST: Final = 20
DEMAND: Final = 1.0  # seconds of excess demand


async def reserve_all(backend: StateBackend) -> int:
    """``ATTEMPTS`` reservations of one unit, ``CONCURRENCY`` at a time; how many were granted."""
    gate = asyncio.Semaphore(CONCURRENCY)
    charge = QuotaCharge(KEY, LIMIT, 1, time.time() + 86_400)

    async def one() -> bool:
        async with gate:
            return (await backend.reserve([charge])).granted

    return sum(await asyncio.gather(*(one() for _ in range(ATTEMPTS))))


async def take_for_a_while(backend: StateBackend) -> str:
    """Take tokens for ``DEMAND`` seconds, ``CONCURRENCY`` at a time: ``granted first last``."""
    granted, calls = 0, []
    deadline = time.time() + DEMAND

    async def one() -> None:
        nonlocal granted
        while (now := time.time()) < deadline:
            calls.append(now)
            decision = await backend.take_token("bucket", RATE, BURST, now)
            granted += decision.allowed  # after the await: ``+=`` around one would lose counts

    await asyncio.gather(*(one() for _ in range(CONCURRENCY)))
    return f"{granted} {min(calls)} {max(calls)}"


async def child(url: str, work: str) -> None:
    """Say ``ready``, wait for a line on stdin, do ``work``, print what it got."""
    backend = open_state(url)
    await backend.ping()
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    print(await (reserve_all(backend) if work == "reserve" else take_for_a_while(backend)))
    await backend.close()


async def start_children(url: str, work: str) -> list[asyncio.subprocess.Process]:
    """Two children, both ready, then told to go at once."""
    children = [await start_child(url, work) for _ in range(2)]
    for process in children:
        assert process.stdin is not None
        process.stdin.write(b"go\n")
    return children


async def start_child(url: str, work: str) -> asyncio.subprocess.Process:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.test_state_processes",
        url,
        work,
        cwd=ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), WAIT)
    assert line == b"ready\n", f"the child did not start: {line!r}"
    return process


async def answer(process: asyncio.subprocess.Process) -> list[float]:
    out, _err = await asyncio.wait_for(process.communicate(), WAIT)
    assert process.returncode == 0
    return [float(figure) for figure in out.split()]


def shared_url(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if kind == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        server.flush()
        return server.url
    return f"sqlite:///{tmp_path / 'shared.db'}"


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
async def test_two_processes_never_reserve_past_the_limit(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = shared_url(kind, tmp_path, request)
    granted = [(await answer(p))[0] for p in await start_children(url, "reserve")]
    assert sum(granted) == LIMIT and min(granted) > 0
    backend = open_state(url)
    assert await backend.quota_used([KEY]) == [LIMIT]
    await backend.close()


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
async def test_two_processes_share_one_bucket_on_the_real_clock(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = shared_url(kind, tmp_path, request)
    answers = [await answer(p) for p in await start_children(url, "tokens")]
    granted = sum(figures[0] for figures in answers)
    spent = max(figures[2] for figures in answers) - min(figures[1] for figures in answers)
    expected = BURST + RATE * spent
    assert 0.9 * expected <= granted <= 1.05 * expected + 1, (granted, expected)


if __name__ == "__main__":
    asyncio.run(child(sys.argv[1], sys.argv[2]))
