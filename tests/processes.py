"""Helpers the process and operations tests share: free ports, tenants files, an upstream
route held open by the test, polling, and a real ``python -m proxy serve`` subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiohttp
from aiohttp import web

ROOT: Final = Path(__file__).resolve().parent.parent
PASSED_ENV: Final = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "SYSTEMROOT")
HELD_PATH: Final = "/openapi/test/held"
HELD_ACTION: Final = {"action": "heldStream"}
START_TIMEOUT: Final = 15.0


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tenant_entry(alias: str, key: str, base_url: str, creds: Any, **extra: Any) -> dict[str, Any]:
    """One tenants-file entry; ``creds`` is a ``Credentials`` or ``None`` (no openapi account)."""
    openapi: dict[str, str] = {"baseUrl": base_url}
    if creds is not None:
        openapi |= {
            "accessKey": creds.access_key,
            "accessSecret": creds.access_secret.reveal(),
            "bizType": creds.biz_type,
            "algorithm": creds.algorithm,
        }
    return {"apiKey": key, "alias": alias, "openapi": openapi, **extra}


def write_tenants(path: Path, entries: Sequence[dict[str, Any]]) -> Path:
    """Write a tenants file (replacing it, so the reloader sees a new inode as well)."""
    scratch = path.with_suffix(".tmp")
    scratch.write_text(json.dumps({"keys": list(entries)}, ensure_ascii=False), encoding="utf-8")
    scratch.replace(path)
    return path


@dataclass(slots=True)
class Gate:
    """An upstream route answering ``first-``, then holding until released, then ``second``."""

    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    calls: int = 0

    async def handler(self, request: web.Request) -> web.StreamResponse:
        self.calls += 1
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await response.prepare(request)
        await response.write(b"first-")
        self.arrived.set()
        await self.release.wait()
        await response.write(b"second")
        await response.write_eof()
        return response

    async def wait_arrived(self, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            await self.arrived.wait()


async def eventually(
    check: Callable[[], Awaitable[bool]], *, what: str, timeout: float = 10.0
) -> None:
    """Poll ``check`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.05)


def process_env(**settings: str) -> dict[str, str]:
    """A clean environment: what Python needs to start, no tenants, plus ``settings``."""
    env = {name: os.environ[name] for name in PASSED_ENV if name in os.environ}
    env["PYTHONPATH"] = str(ROOT)
    env.update(settings)
    return env


@dataclass(slots=True)
class GatewayProcess:
    """A ``python -m proxy serve`` subprocess, its port and its captured output."""

    process: subprocess.Popen[bytes]
    port: int
    stdout_path: Path
    stderr_path: Path
    tenants_file: Path
    scheme: str = "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def stdout(self) -> str:
        return self.stdout_path.read_text(encoding="utf-8")

    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8")

    def log_lines(self) -> list[dict[str, Any]]:
        """Every stdout line, parsed: each one must be a JSON object."""
        return [json.loads(line) for line in self.stdout().splitlines() if line.strip()]

    def count_logged(self, message: str) -> int:
        return sum(1 for line in self.log_lines() if line.get("message") == message)

    async def wait_logged(self, message: str, count: int = 1, timeout: float = 10.0) -> None:
        async def logged() -> bool:
            return self.count_logged(message) >= count

        await eventually(logged, what=f"{count} log line(s) {message!r}", timeout=timeout)

    def send(self, signum: signal.Signals) -> None:
        os.kill(self.process.pid, signum)

    async def wait_exit(self, timeout: float) -> int:
        """The exit code, waiting off the event loop (in-process upstreams keep serving)."""
        return await asyncio.to_thread(self.process.wait, timeout)


async def _wait_ready(gateway: GatewayProcess) -> None:
    async with aiohttp.ClientSession() as session:

        async def ready() -> bool:
            code = gateway.process.poll()
            if code is not None:
                raise AssertionError(f"gateway exited with {code}:\n{gateway.stderr()}")
            try:
                # Readiness only: TLS tests check the certificate themselves.
                async with session.get(gateway.url + "/readyz", ssl=False) as response:
                    return response.status == 200
            except aiohttp.ClientConnectionError:
                return False

        await eventually(ready, what="the gateway's /readyz", timeout=START_TIMEOUT)


@asynccontextmanager
async def gateway_process(
    tmp_path: Path, tenants: Sequence[dict[str, Any]] | None, *args: str, **settings: str
) -> AsyncIterator[GatewayProcess]:
    """Run ``python -m proxy serve [--tenants FILE]`` until ready; always stopped and reaped."""
    tenants_file = tmp_path / "tenants.json"
    port = free_port()
    argv = [sys.executable, "-m", "proxy", "serve", "--host", "127.0.0.1", "--port", str(port)]
    if tenants is not None:
        argv += ["--tenants", str(write_tenants(tenants_file, tenants))]
    argv += list(args)
    stdout_path, stderr_path = tmp_path / "stdout.log", tmp_path / "stderr.log"
    with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
        # A session (and process group) of its own: workers it forks can be stopped with it.
        process = subprocess.Popen(
            argv,
            stdout=out,
            stderr=err,
            cwd=tmp_path,
            env=process_env(**settings),
            start_new_session=True,
        )
        scheme = "https" if settings.get("TLS_CERT_FILE") else "http"
        gateway = GatewayProcess(process, port, stdout_path, stderr_path, tenants_file, scheme)
        try:
            await _wait_ready(gateway)
            yield gateway
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    await gateway.wait_exit(10)
                except subprocess.TimeoutExpired:
                    process.kill()
            await asyncio.to_thread(process.wait)
            with contextlib.suppress(ProcessLookupError):  # workers left behind, if any
                os.killpg(process.pid, signal.SIGKILL)
