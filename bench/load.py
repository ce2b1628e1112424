"""Load generation with wrk (a C load generator, so the client is never the bottleneck)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from bench.procs import BENCH_KEY

# A signed-looking 200-byte JSON body, the shape of a task/list call.
BODY: Final = json.dumps(
    {
        "pageNumber": 1,
        "pageSize": 20,
        "taskId": "task-bench-0001",
        "status": "running",
        "filter": {"name": "benchmark campaign", "countryCode": "86", "tags": ["a", "b", "c"]},
        "pad": "",
    },
    separators=(",", ":"),
)
BODY_200: Final = BODY[:-2] + "x" * (200 - len(BODY)) + BODY[-2:]
SCRIPT: Final = """
wrk.method = "POST"
wrk.body = '{body}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["x-api-key"] = "{key}"
"""
UNITS: Final = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


@dataclass(frozen=True, slots=True)
class LoadResult:
    """What one wrk run measured."""

    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int


def have_wrk() -> bool:
    """True when wrk is on PATH."""
    return shutil.which("wrk") is not None


def _script() -> Path:
    text = SCRIPT.format(body=BODY_200, key=BENCH_KEY)
    path = Path(tempfile.mkstemp(prefix="bench-", suffix=".lua")[1])
    path.write_text(text)
    return path


def wrk(url: str, *, connections: int = 64, seconds: float = 8) -> LoadResult:
    """POST the 200-byte body to ``url`` for ``seconds`` over ``connections`` connections."""
    script = _script()
    duration = f"{max(1, int(seconds))}s"
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{duration}", "--latency", "-s", str(script), url]
    try:
        out = subprocess.run(
            argv, capture_output=True, text=True, timeout=seconds + 120, check=True
        ).stdout
    finally:
        script.unlink(missing_ok=True)
    return parse_wrk(out)


def wrk_count(url: str, requests: int) -> int:
    """Load ``url`` in 5-second runs until at least ``requests`` answers; how many there were."""
    done = 0
    while done < requests:
        result = wrk(url, seconds=5)
        if result.requests == 0 or result.errors:
            raise RuntimeError(f"load run failed: {result}")
        done += result.requests
    return done


def parse_wrk(out: str) -> LoadResult:
    """Requests/sec, p50, p99, count and non-2xx/socket errors from wrk's --latency output."""

    def latency(pct: str) -> float:
        found = re.search(rf"^\s*{pct}%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
        return float(found.group(1)) * UNITS[found.group(2)] if found else float("nan")

    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    count = re.search(r"(\d+) requests in", out)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = int(non2xx.group(1)) if non2xx else 0
    errors += sum(int(g) for g in sock.groups()) if sock else 0
    return LoadResult(
        rps=float(rps.group(1)) if rps else 0.0,
        p50_ms=latency("50"),
        p99_ms=latency("99"),
        requests=int(count.group(1)) if count else 0,
        errors=errors,
    )
