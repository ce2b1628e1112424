"""Instructions per forwarded request under callgrind: a figure the machine's noise cannot
move (the same binary, inputs and requests give the same count whatever else runs).

The gateway and the bare http1 forwarder each run under ``valgrind --tool=callgrind`` with
counting off; after a warm-up the counter is switched on for ``requests`` sequential POSTs on
one keep-alive connection, then off. Start-up is never counted.
"""

from __future__ import annotations

import http.client
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

from bench.load import BODY_200
from bench.procs import (
    BENCH_KEY,
    LOOPBACK,
    RATE_LIMITED,
    free_port,
    gateway_env,
    process,
    wait_http,
)

PATH: Final = "/openapi/aiagent/task/list"
WARM_UP: Final = 50


def have_callgrind() -> bool:
    """True when valgrind and callgrind_control are on PATH."""
    return all(shutil.which(tool) for tool in ("valgrind", "callgrind_control"))


def post(port: int, requests: int) -> None:
    """``requests`` signed-looking POSTs on one keep-alive connection, each checked."""
    connection = http.client.HTTPConnection(LOOPBACK, port, timeout=120)
    headers = {"Content-Type": "application/json", "x-api-key": BENCH_KEY}
    try:
        for _ in range(requests):
            connection.request("POST", PATH, body=BODY_200.encode(), headers=headers)
            answer = connection.getresponse()
            answer.read()
            if answer.status != 200:
                raise RuntimeError(f"{port} answered {answer.status}")
    finally:
        connection.close()


@contextmanager
def counted(argv: list[str], env: dict[str, str], ready: str) -> Iterator[tuple[int, Path]]:
    """``argv`` under callgrind with counting off; yields (pid, output file)."""
    out = Path(tempfile.mkdtemp(prefix="bench-callgrind-")) / "callgrind.out"
    command = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]
    with process([*command, *argv], env) as proc:
        wait_http(ready, timeout=120)
        yield proc.pid, out


def count(argv: list[str], env: dict[str, str], port: int, ready: str, requests: int) -> float:
    """Instructions per request of the process ``argv`` serving ``requests`` POSTs."""
    with counted(argv, env, ready) as (pid, out):
        post(port, WARM_UP)
        subprocess.run(["callgrind_control", "-i", "on", str(pid)], check=True, capture_output=True)
        post(port, requests)
        subprocess.run(
            ["callgrind_control", "-i", "off", str(pid)], check=True, capture_output=True
        )
    # Written when the process exits (the context above stopped it).
    total = 0
    for line in out.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            total = max(total, int(line.split()[1]))
    shutil.rmtree(out.parent, ignore_errors=True)
    return total / requests


def measure(origin: int, requests: int) -> dict[str, float]:
    """Instructions per request: the gateway, the bare http1 forwarder, and their ratio."""
    root = str(Path(__file__).resolve().parent.parent)
    gateway_port, bare_port = free_port(), free_port()
    gateway = [sys.executable, "-m", "proxy", "serve", "--host", LOOPBACK]
    gateway += ["--port", str(gateway_port)]
    bare = [sys.executable, "-m", "bench.bare_proxy", "--port", str(bare_port)]
    bare += ["--origin", f"http://{LOOPBACK}:{origin}", "--client", "http1"]
    env = gateway_env(origin, PYTHONPATH=root)
    ready = f"http://{LOOPBACK}:{gateway_port}/readyz"
    gateway_count = count(gateway, env, gateway_port, ready, requests)
    limited_env = gateway_env(origin, PYTHONPATH=root, **RATE_LIMITED)
    limited_count = count(gateway, limited_env, gateway_port, ready, requests)
    bare_ready = f"http://{LOOPBACK}:{bare_port}/openapi/ping"
    bare_count = count(bare, env, bare_port, bare_ready, requests)
    return {
        "requests": requests,
        "gateway": gateway_count,
        "gateway_rate_limited": limited_count,
        "bare_http1_proxy": bare_count,
        "ratio": gateway_count / bare_count,
    }
