"""``serve --sandbox`` and the stand-alone ``sandbox`` command, run as real processes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Final

import aiohttp

from proxy.config import Secret, mask_key
from proxy.tenants import Credentials
from tests.processes import START_TIMEOUT, free_port, gateway_process, process_env, tenant_entry

KEY: Final = "sandbox-mode-client-key-0001"
CREDS: Final = Credentials("ak-sandbox-mode-0001", Secret("sk-sandbox-mode-NEVER-SHOWN"))
# Nothing listens there: a call that went to the tenant's real base URL would fail with 502.
UNREACHABLE: Final = "http://127.0.0.1:9"


async def test_serve_sandbox_answers_the_configured_tenants_from_an_in_process_sandbox(
    tmp_path: Path,
) -> None:
    tenants = [tenant_entry("shop", KEY, UNREACHABLE, CREDS)]
    async with (
        gateway_process(tmp_path, tenants, "--sandbox") as gateway,
        aiohttp.ClientSession() as client,
    ):
        async with client.post(
            gateway.url + "/openapi/aiagent/task/list",
            headers={"x-api-key": KEY},
            json={"pageNumber": 1, "pageSize": 10},
        ) as response:
            assert response.status == 200
            answer = await response.json()
        async with client.get(gateway.url + "/api/openapi/keys") as response:
            directory = await response.json()
    assert answer["code"] == 0, answer
    assert answer["data"]["list"][0]["taskId"] == "task-demo-001"
    assert [k["alias"] for k in directory["data"]["keys"]] == ["shop"]
    banner = gateway.stderr()
    assert "SANDBOX MODE" in banner and "shop" in banner
    assert mask_key(CREDS.access_key) in banner
    for secret in (KEY, CREDS.access_key, CREDS.access_secret.reveal()):
        assert secret not in banner + gateway.stdout()


def sandbox_log(stdout: Path, proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    """The sandbox's start-up log line, waited for with a deadline."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        for line in stdout.read_text(encoding="utf-8").splitlines():
            record: dict[str, Any] = json.loads(line)
            if record.get("message") == "sandbox listening":
                return record
        assert proc.poll() is None, f"sandbox exited {proc.returncode}"
        time.sleep(0.05)
    raise AssertionError("no 'sandbox listening' line")


def test_standalone_sandbox_logs_the_access_keys_it_accepts_masked(tmp_path: Path) -> None:
    env = process_env(
        EXTERNAL_API_KEY_1=KEY,
        EXTERNAL_API_KEY_1_OPENAPI_ACCESS_KEY=CREDS.access_key,
        EXTERNAL_API_KEY_1_OPENAPI_ACCESS_SECRET=CREDS.access_secret.reveal(),
        EXTERNAL_API_KEY_1_OPENAPI_BIZ_TYPE="9",
    )
    argv = [sys.executable, "-m", "proxy", "sandbox", "--port", str(free_port())]
    stdout = tmp_path / "stdout.log"
    with stdout.open("wb") as out:
        proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            record = sandbox_log(stdout, proc)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=10)
    assert record["accounts"] == 1
    assert record["access_keys"] == [f"{mask_key(CREDS.access_key)} (bizType 9)"]
    logged = stdout.read_text(encoding="utf-8")
    assert CREDS.access_key not in logged and CREDS.access_secret.reveal() not in logged
