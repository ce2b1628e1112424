"""The container image's own commands, run as plain processes: ENTRYPOINT serves, HEALTHCHECK tells.

No Docker engine is needed: the Dockerfile is parsed, its exec-form commands are taken
verbatim and run against this checkout's venv, with in-image paths mapped by one helper.
"""

from __future__ import annotations

import fnmatch
import http.client
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Final

import pytest

from proxy.config import parse_settings
from proxy.settings_table import DEFAULTS

REPO: Final = Path(__file__).resolve().parent.parent
DOCKERFILE: Final = REPO / "Dockerfile"
DOCKERIGNORE: Final = REPO / ".dockerignore"
IMAGE_VENV: Final = "/opt/venv"
LOCAL_VENV: Final = Path(sys.prefix)
BASE_IMAGE: Final = "python:3.11-slim"
# Variables the image may set that are the Python runtime's, not the gateway's.
RUNTIME_VARIABLES: Final = frozenset({"PATH", "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED"})
BUILD_TOOLS: Final = re.compile(r"\b(apt-get|apk|gcc|g\+\+|make|build-essential|curl|wget)\b")
START_TIMEOUT: Final = 20.0
SHUTDOWN_GRACE: Final = 5

API_KEY: Final = "container-test-key-0123456789"
ACCESS_KEY: Final = "ak-container-test"
ACCESS_SECRET: Final = "container-secret-DO-NOT-LEAK"


@dataclass(frozen=True, slots=True)
class Instruction:
    """One logical Dockerfile line: its keyword (upper case) and the rest."""

    keyword: str
    args: str


def parse_dockerfile(text: str) -> list[list[Instruction]]:
    """The Dockerfile's stages, each a list of instructions (continuations joined)."""
    stages: list[list[Instruction]] = []
    pending = ""
    for line in text.splitlines():
        if line.strip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, args = pending.strip().partition(" ")
        pending = ""
        if keyword.upper() == "FROM":
            stages.append([])
        assert stages, f"{keyword} before the first FROM"
        stages[-1].append(Instruction(keyword.upper(), args.strip()))
    return stages


def dockerfile_stages() -> list[list[Instruction]]:
    """This repository's Dockerfile, parsed."""
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))


def final_stage() -> list[Instruction]:
    """The instructions of the stage that becomes the image."""
    return dockerfile_stages()[-1]


def only(stage: list[Instruction], keyword: str) -> str:
    """The arguments of the one (last, as Docker does) ``keyword`` instruction in ``stage``."""
    found = [i.args for i in stage if i.keyword == keyword]
    assert found, f"the final stage has no {keyword}"
    return found[-1]


def exec_form(args: str) -> list[str]:
    """A JSON exec array; Docker silently falls back to a shell for anything else."""
    argv = json.loads(args)
    assert isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv), args
    return argv


def image_command(stage: list[Instruction]) -> list[str]:
    """ENTRYPOINT followed by CMD, as ``docker run`` with no arguments would start it."""
    command = exec_form(only(stage, "ENTRYPOINT"))
    cmd = [i.args for i in stage if i.keyword == "CMD"]
    return command + (exec_form(cmd[-1]) if cmd else [])


def healthcheck(stage: list[Instruction]) -> tuple[dict[str, str], list[str]]:
    """The HEALTHCHECK's options (``--timeout=5s`` -> ``{"timeout": "5s"}``) and command."""
    found = re.fullmatch(r"((?:--[\w-]+=\S+\s+)*)CMD\s+(\[.*\])", only(stage, "HEALTHCHECK"))
    assert found, "HEALTHCHECK must be options then CMD in exec form"
    options = dict(o[2:].split("=", 1) for o in found.group(1).split())
    return options, exec_form(found.group(2))


def image_env(stage: list[Instruction]) -> dict[str, str]:
    """Every ``ENV NAME=value`` of ``stage``, unquoted."""
    env: dict[str, str] = {}
    for args in (i.args for i in stage if i.keyword == "ENV"):
        for item in shlex.split(args):
            name, sep, value = item.partition("=")
            assert sep, f"ENV {args}: use the NAME=value form"
            env[name] = value
    return env


def seconds(duration: str) -> float:
    """A Docker duration such as ``5s`` or ``1m`` in seconds."""
    found = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)", duration)
    assert found, f"unsupported duration {duration!r}"
    return float(found.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0}[found.group(2)]


def local_command(argv: list[str]) -> list[str]:
    """Map in-image absolute paths (the image's venv) to this checkout's venv."""
    mapped = []
    for arg in argv:
        if arg.startswith(IMAGE_VENV + "/"):
            local = LOCAL_VENV / arg[len(IMAGE_VENV) + 1 :]
            assert local.exists(), f"{arg} maps to {local}, which is missing: run make install"
            arg = str(local)
        else:
            assert not arg.startswith("/"), f"no local equivalent for the in-image path {arg}"
        mapped.append(arg)
    return mapped


def process_env(extra: Mapping[str, str]) -> dict[str, str]:
    """The image's environment with the local venv first on PATH, plus ``extra``."""
    env = {k: v for k, v in image_env(final_stage()).items() if k != "PATH"}
    env["PATH"] = f"{LOCAL_VENV / 'bin'}{os.pathsep}{os.environ.get('PATH', os.defpath)}"
    env["LANG"] = "C.UTF-8"
    return env | dict(extra)


def test_image_is_built_in_a_separate_stage_on_python_slim() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2
    assert stages[0][0].args == f"{BASE_IMAGE} AS builder"
    assert stages[-1][0].args == BASE_IMAGE
    assert any(i.keyword == "COPY" and "--from=builder" in i.args for i in stages[-1])
    runs = [i.args for i in stages[-1] if i.keyword == "RUN"]
    assert not [r for r in runs if BUILD_TOOLS.search(r)], "no build tools in the final stage"


def test_image_runs_as_a_numeric_non_root_user() -> None:
    user = only(final_stage(), "USER").split(":")[0]
    # numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd
    assert user.isdigit() and int(user) != 0


def test_image_exposes_and_sets_the_gateways_default_port() -> None:
    stage = final_stage()
    assert only(stage, "EXPOSE") == DEFAULTS["PORT"]
    assert image_env(stage).get("PORT", DEFAULTS["PORT"]) == DEFAULTS["PORT"]


def test_image_env_sets_only_valid_gateway_settings() -> None:
    env = image_env(final_stage())
    settings = {k: v for k, v in env.items() if k not in RUNTIME_VARIABLES}
    assert set(settings) <= set(DEFAULTS), set(settings) - set(DEFAULTS)
    parse_settings(settings)  # raises ConfigError on a value the gateway would refuse


def test_healthcheck_is_exec_form_python_without_curl() -> None:
    options, argv = healthcheck(final_stage())
    assert Path(argv[0]).name.startswith("python")
    assert not any(tool in " ".join(argv) for tool in ("curl", "wget"))
    assert "/healthz" in " ".join(argv)
    assert seconds(options["timeout"]) <= seconds(options["interval"])


def test_entrypoint_is_exec_form_nxlink_proxy_serve() -> None:
    argv = image_command(final_stage())
    assert Path(argv[0]).name == "nxlink-proxy"
    assert argv[1] == "serve"
    assert "--demo" not in argv


def dockerignore_admits(patterns: list[str], name: str) -> bool:
    """Whether a top-level ``name`` reaches the build context (the last matching pattern wins)."""
    admitted = True
    for pattern in patterns:
        negated = pattern.startswith("!")
        if fnmatch.fnmatchcase(name, pattern.lstrip("!").rstrip("/")):
            admitted = negated
    return admitted


def test_build_context_admits_every_copied_file_and_no_local_secrets() -> None:
    lines = DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
    patterns = [p.strip() for p in lines if p.strip() and not p.startswith("#")]
    copied = [
        source.lstrip("./").split("/")[0]
        for stage in dockerfile_stages()
        for i in stage
        if i.keyword == "COPY" and "--from=" not in i.args
        for source in i.args.split()[:-1]
    ]
    assert copied
    for name in copied:
        assert (REPO / name).exists(), f"COPY {name}, which the repository does not have"
        assert dockerignore_admits(patterns, name), f"COPY {name} but .dockerignore drops it"
    for name in (".env", ".git", ".venv", "tests", "deploy", "secrets"):
        assert not dockerignore_admits(patterns, name), f"{name} would enter the build context"


def pip_installs(stages: list[list[Instruction]]) -> list[str]:
    """Every ``pip install`` of the Dockerfile's RUN lines (one per ``&&``-joined command)."""
    commands = [
        c.strip() for s in stages for i in s if i.keyword == "RUN" for c in i.args.split("&&")
    ]
    return [c for c in commands if re.search(r"\bpip install\b", c)]


def test_image_installs_the_versions_the_tests_passed_with() -> None:
    builder = dockerfile_stages()[0]
    copied = [i.args.split()[:-1] for i in builder if i.keyword == "COPY"]
    assert any("constraints.txt" in sources for sources in copied), "COPY constraints.txt"
    installs = pip_installs(dockerfile_stages())
    assert installs
    for command in installs:
        assert re.search(r"(-c|--constraint)[ =]constraints\.txt\b", command), command


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def request(
    port: int, method: str, path: str, body: bytes = b"", headers: Mapping[str, str] = {}
) -> tuple[int, bytes]:
    """One HTTP exchange with 127.0.0.1 (never through a proxy); the status and body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path, body=body, headers=dict(headers))
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def answers(port: int, path: str) -> bool:
    """True once ``GET path`` answers 200."""
    try:
        return request(port, "GET", path)[0] == 200
    except OSError:
        return False


def accepts(port: int) -> bool:
    """True once something accepts TCP connections on ``port``."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class Process:
    """A started process and the file its output goes to."""

    proc: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        """Everything the process printed so far."""
        return self.log.read_text(encoding="utf-8", errors="replace")

    def wait_until(self, ready: Callable[[], bool], what: str) -> None:
        """Poll ``ready`` until true; fail early if the process dies, or after a deadline."""
        deadline = time.monotonic() + START_TIMEOUT
        while not ready():
            if self.proc.poll() is not None:
                pytest.fail(f"{what}: exited {self.proc.returncode}\n{self.output()}")
            if time.monotonic() > deadline:
                pytest.fail(f"{what}: not ready after {START_TIMEOUT} s\n{self.output()}")
            time.sleep(0.05)


@contextmanager
def started(argv: list[str], env: Mapping[str, str], cwd: Path, log: Path) -> Iterator[Process]:
    """Run ``argv`` with output to ``log``; on the way out stop it by its PID if still running."""
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, env=dict(env), cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        try:
            yield Process(proc, log)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=SHUTDOWN_GRACE + 5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)


def secret_files(directory: Path) -> dict[str, str]:
    """Tenant 1's key and nxlink credentials as files, the way container secrets arrive."""
    directory.mkdir()
    values = {
        "EXTERNAL_API_KEY_1": API_KEY,
        "EXTERNAL_API_KEY_1_OPENAPI_ACCESS_KEY": ACCESS_KEY,
        "EXTERNAL_API_KEY_1_OPENAPI_ACCESS_SECRET": ACCESS_SECRET,
    }
    env = {}
    for name, value in values.items():
        path = directory / name.lower()
        path.write_text(value + "\n", encoding="utf-8")  # as `echo value > file` leaves it
        env[f"{name}_FILE"] = str(path)
    return env


def run_healthcheck(env: Mapping[str, str], cwd: Path) -> subprocess.CompletedProcess[bytes]:
    """The image's HEALTHCHECK command, bounded by its own ``--timeout``."""
    options, argv = healthcheck(final_stage())
    return subprocess.run(
        local_command(argv),
        env=dict(env),
        cwd=cwd,
        capture_output=True,
        timeout=seconds(options["timeout"]) + 2,
        check=False,
    )


def test_entrypoint_serves_file_secrets_and_healthcheck_follows_it(tmp_path: Path) -> None:
    sandbox_port, gateway_port = free_port(), free_port()
    env = process_env(
        secret_files(tmp_path / "secrets")
        | {
            "EXTERNAL_API_KEY_1_ALIAS": "container-test",
            "EXTERNAL_API_KEY_1_OPENAPI_BASE_URL": f"http://127.0.0.1:{sandbox_port}",
            "HOST": "127.0.0.1",
            "PORT": str(gateway_port),
            "SHUTDOWN_GRACE": str(SHUTDOWN_GRACE),
        }
    )
    sandbox_argv = local_command([f"{IMAGE_VENV}/bin/python", "-m", "proxy", "sandbox"])
    sandbox_argv += ["--port", str(sandbox_port)]
    gateway_argv = local_command(image_command(final_stage()))
    with (
        started(sandbox_argv, env, tmp_path, tmp_path / "sandbox.log") as sandbox,
        started(gateway_argv, env, tmp_path, tmp_path / "gateway.log") as gateway,
    ):
        sandbox.wait_until(lambda: accepts(sandbox_port), "sandbox")
        gateway.wait_until(lambda: answers(gateway_port, "/readyz"), "gateway")

        status, body = request(
            gateway_port,
            "POST",
            "/openapi/aiagent/task/list",
            b'{"pageNumber": 1}',
            {"x-api-key": API_KEY, "Content-Type": "application/json"},
        )
        assert (status, json.loads(body)["code"]) == (200, 0), body
        assert run_healthcheck(env, tmp_path).returncode == 0

        gateway.proc.send_signal(signal.SIGTERM)
        assert gateway.proc.wait(timeout=SHUTDOWN_GRACE + 10) == 0, gateway.output()
        down = run_healthcheck(env, tmp_path)
        assert down.returncode == 1, down
        assert ACCESS_SECRET not in gateway.output() + sandbox.output()


class UnhealthyHandler(BaseHTTPRequestHandler):
    """Answers every request 503, like a process that is up but not well."""

    def do_GET(self) -> None:
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_healthcheck_fails_on_an_answer_other_than_200(tmp_path: Path) -> None:
    with ThreadingHTTPServer(("127.0.0.1", 0), UnhealthyHandler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            port = str(server.server_address[1])
            result = run_healthcheck(process_env({"PORT": port}), tmp_path)
        finally:
            server.shutdown()
            thread.join(timeout=5)
    assert result.returncode == 1, result
