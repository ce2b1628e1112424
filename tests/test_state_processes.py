"""Two OS processes sharing one store (a SQLite file, a Redis server) reserve quota at the same
time: together they never get more than the limit. Run as a module, this file is one of them."""

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


async def reserve_all(backend: StateBackend) -> int:
    """``ATTEMPTS`` reservations of one unit, ``CONCURRENCY`` at a time; how many were granted."""
    gate = asyncio.Semaphore(CONCURRENCY)
    charge = QuotaCharge(KEY, LIMIT, 1, time.time() + 86_400)

    async def one() -> bool:
        async with gate:
            return (await backend.reserve([charge])).granted

    return sum(await asyncio.gather(*(one() for _ in range(ATTEMPTS))))


async def child(url: str) -> None:
    """Say ``ready``, wait for a line on stdin, reserve, print the number granted."""
    backend = open_state(url)
    await backend.ping()
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    print(await reserve_all(backend), flush=True)
    await backend.close()


async def start_child(url: str) -> asyncio.subprocess.Process:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.test_state_processes",
        url,
        cwd=ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), WAIT)
    assert line == b"ready\n", f"the child did not start: {line!r}"
    return process


async def granted_by(process: asyncio.subprocess.Process) -> int:
    out, _err = await asyncio.wait_for(process.communicate(), WAIT)
    assert process.returncode == 0
    return int(out)


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
async def test_two_processes_never_reserve_past_the_limit(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if kind == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        server.flush()
        url = server.url
    else:
        url = f"sqlite:///{tmp_path / 'shared.db'}"
    children = [await start_child(url) for _ in range(2)]
    for process in children:
        assert process.stdin is not None
        process.stdin.write(b"go\n")  # both start together: they reserve at the same time
    granted = [await granted_by(process) for process in children]
    assert sum(granted) == LIMIT and min(granted) > 0
    backend = open_state(url)
    assert await backend.quota_used([KEY]) == [LIMIT]
    await backend.close()


if __name__ == "__main__":
    asyncio.run(child(sys.argv[1]))
