"""A real ``redis-server`` for the tests, on 127.0.0.1, a free port and its own temporary folder.

Fixtures (registered for every test by ``conftest.py``):

* ``redis_server``: one server for the whole session; tests share it, so each one uses its own
  keys or calls ``flush()`` first (the conformance suite flushes before every test).
* ``own_redis``: a server of the test's own, for tests that stop and restart it::

      async def test_something(own_redis: RedisServer) -> None:
          own_redis.stop()      # the port is free, clients get connection errors
          own_redis.start()     # same port, same URL, an empty database

Without ``redis-server`` on PATH (``make test`` installs it) or when it cannot start, the test
FAILS with the reason: a Redis test never skips. ``RedisServer`` itself needs no pytest (the
benchmark starts one too) and raises ``RedisServerError``.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import pytest
import redis

from tests.processes import free_port

START_TIMEOUT: Final = 10.0
STOP_TIMEOUT: Final = 5.0


class RedisServerError(RuntimeError):
    """redis-server is missing, exited, or did not answer in time."""


@dataclass
class RedisServer:
    """One ``redis-server`` process that the tests own (started, stopped and killed by PID)."""

    directory: Path
    port: int = field(default_factory=free_port)
    password: str | None = None  # --requirepass; the URLs carry it
    unix_socket: bool = False  # also listen on directory/redis.sock (keep the path short)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = "" if self.password is None else f":{self.password}@"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def unix_url(self) -> str:
        auth = "" if self.password is None else f":{self.password}@"
        return f"unix://{auth}{self.directory / 'redis.sock'}?db=0"

    def start(self) -> None:
        """Start the server on ``port`` and wait until it answers."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise RedisServerError("redis-server is not installed: `make test` installs it")
        command = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        command += ["--appendonly", "no", "--dir", str(self.directory)]
        if self.password is not None:
            command += ["--requirepass", self.password]
        if self.unix_socket:
            command += ["--unixsocket", str(self.directory / "redis.sock")]
        log = (self.directory / "redis.log").open("ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self._wait_until_answering()

    def stop(self) -> None:
        """Stop the server (SIGTERM to its PID, SIGKILL if it lingers) and free the port."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(STOP_TIMEOUT)
        self.process = None

    def flush(self) -> None:
        """Empty every database of the server."""
        with redis.Redis.from_url(self.url, socket_timeout=STOP_TIMEOUT) as client:
            client.flushall()

    def _wait_until_answering(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                log = (self.directory / "redis.log").read_text(errors="replace")
                code = self.process.returncode
                raise RedisServerError(f"redis-server exited with {code}:\n{log[-2000:]}")
            if _answers(self.url, self.process.pid):
                return
            time.sleep(0.02)  # polling a child's start-up, bounded by the deadline
        self.stop()
        raise RedisServerError(
            f"redis-server did not answer on port {self.port} in {START_TIMEOUT}s"
        )


def _answers(url: str, pid: int) -> bool:
    """True when the server at ``url`` answers and is process ``pid`` (not another one)."""
    try:
        with redis.Redis.from_url(url, socket_timeout=0.5) as client:
            return bool(client.info("server")["process_id"] == pid)
    except (redis.RedisError, OSError):
        return False


def running_redis(directory: Path) -> Iterator[RedisServer]:
    """A started server in ``directory``, stopped when the iterator is closed."""
    server = RedisServer(directory)
    try:
        server.start()
    except RedisServerError as exc:
        pytest.fail(str(exc))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One Redis for the session (shared: flush or use distinct keys)."""
    yield from running_redis(tmp_path_factory.mktemp("redis"))


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test's own, free to stop and restart."""
    directory = tmp_path / "redis"
    directory.mkdir()
    yield from running_redis(directory)
