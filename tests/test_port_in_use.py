"""A port that is already taken: one line naming it and how to choose another, exit code 1."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.processes import process_env

TENANT = {
    "EXTERNAL_API_KEY_1": "port-test-client-key-0001",
    "EXTERNAL_API_KEY_1_OPENAPI_ACCESS_KEY": "ak-port-test",
    "EXTERNAL_API_KEY_1_OPENAPI_ACCESS_SECRET": "sk-port-test",
}


@contextmanager
def taken_port() -> Iterator[int]:
    """A loopback port some other socket listens on for the duration."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield int(holder.getsockname()[1])


@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "--demo", "--host", "127.0.0.1"],
        ["serve", "--host", "127.0.0.1", "--workers", "2"],
        ["sandbox"],
    ],
)
def test_a_taken_port_is_one_line_naming_it_and_the_way_out(
    tmp_path: Path, argv: list[str]
) -> None:
    with taken_port() as port:
        result = subprocess.run(
            [sys.executable, "-m", "proxy", *argv, "--port", str(port)],
            cwd=tmp_path,
            env=process_env(**TENANT),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    # One line (each of several workers says the same one).
    [line] = {line for line in result.stderr.splitlines() if "cannot listen" in line}
    assert f"cannot listen on 127.0.0.1:{port}: the address is already in use" in line
    assert "PORT=" in line and "--port" in line
