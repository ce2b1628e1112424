"""The admin listener of a real ``serve`` process: its own port, nothing of it on the proxy's,
and a write that every worker applies within 3 s through the tenants-file poll."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
from pathlib import Path

import aiohttp

from tests.admin_setup import ADMIN_TOKEN, AUTH
from tests.conftest import CREDS_A, KEY_A, Upstream
from tests.processes import (
    ROOT,
    START_TIMEOUT,
    eventually,
    free_port,
    gateway_process,
    tenant_entry,
)

README = ROOT / "README.md"

NEW = {"alias": "tenant-new", "openapi": {"accessKey": "ak-tenant-a", "accessSecret": "s-1"}}


async def test_every_worker_takes_an_admin_write_within_three_seconds(
    tmp_path: Path, upstream: Upstream
) -> None:
    tenants = [tenant_entry("tenant-a", KEY_A, upstream.base_url, CREDS_A)]
    port = free_port()
    settings = {"ADMIN_PORT": str(port), "ADMIN_TOKEN": ADMIN_TOKEN, "WORKERS": "2"}
    async with gateway_process(tmp_path, tenants, **settings) as gateway:
        await gateway.wait_logged("admin listening", count=2)
        admin = f"http://127.0.0.1:{port}/admin/api"
        async with aiohttp.ClientSession() as client:
            async with client.post(f"{admin}/tenants", json=NEW, headers=AUTH) as response:
                assert response.status == 201
                key = (await response.json())["data"]["apiKey"]
            written = asyncio.get_running_loop().time()

            async def every_worker_knows_it() -> bool:
                # Fresh connections: SO_REUSEPORT spreads them over both workers.
                for _ in range(8):
                    async with aiohttp.ClientSession() as fresh:
                        url = gateway.url + "/api/openapi/status"
                        async with fresh.get(url, headers={"x-api-key": key}) as answer:
                            if answer.status != 200:
                                return False
                return True

            await eventually(every_worker_knows_it, what="both workers", timeout=3.0)
            assert asyncio.get_running_loop().time() - written < 3.0
            async with client.get(gateway.url + "/admin/api/tenants", headers=AUTH) as response:
                assert response.status == 404
            async with client.get(f"{admin}/tenants", headers={"x-api-key": KEY_A}) as response:
                assert response.status == 401
    access = [line for line in gateway.log_lines() if line.get("logger") == "aiohttp.access"]
    assert {"path": "/admin/api/tenants", "status": 201} in [
        {"path": line["path"], "status": line["status"]} for line in access
    ]
    assert KEY_A in gateway.tenants_file.read_text()  # untouched entries keep their form
    assert key not in gateway.tenants_file.read_text()
    assert ADMIN_TOKEN not in gateway.stdout() + gateway.stderr()
    assert key not in gateway.stdout() + gateway.stderr()


def readme_blocks() -> list[str]:
    """The indented command blocks of the README's Administration section."""
    section = README.read_text(encoding="utf-8").split("\n## Administration\n", 1)[1]
    blocks: list[list[str]] = [[]]
    for line in section.split("\n## ", 1)[0].splitlines():
        if line.startswith("    "):
            blocks[-1].append(line[4:])
        elif line.strip() and blocks[-1]:
            blocks.append([])
        elif not line.strip() and blocks[-1]:
            blocks[-1].append("")
    return ["\n".join(block).strip() for block in blocks if block]


async def test_the_readme_administration_commands_run_as_printed(tmp_path: Path) -> None:
    start, calls = readme_blocks()
    ports = {"8001": free_port(), "8002": free_port(), "8003": free_port()}
    for documented, port in ports.items():  # the documented ports may be taken on this machine
        start, calls = start.replace(documented, str(port)), calls.replace(documented, str(port))
    (tmp_path / "config").mkdir()
    shutil.copy(ROOT / "config" / "tenants.example.json", tmp_path / "config")
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    with (tmp_path / "gateway.log").open("wb") as log:
        gateway = subprocess.Popen(
            ["bash", "-c", start], cwd=tmp_path, stdout=log, stderr=log, start_new_session=True
        )
    try:
        await eventually(
            lambda: _answers(f"http://127.0.0.1:{ports['8003']}/admin/"),
            what="the documented admin listener",
            timeout=START_TIMEOUT,
        )
        result = await asyncio.to_thread(
            subprocess.run,
            ["bash", "-e", "-o", "pipefail", "-c", calls],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.killpg(gateway.pid, signal.SIGTERM)
        await asyncio.to_thread(gateway.wait, 10)
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith("apiKey: nxk_")
    for said in ("Tenant updated", "Key revoked", '"ok": true', "CONFLICT", "Tenant deleted"):
        assert said in result.stdout
    assert result.stdout.count('"message": "Usage"') == 2 and "tenant.delete" in result.stdout


async def _answers(url: str) -> bool:
    async with aiohttp.ClientSession() as session:
        try:
            async with session.get(url) as response:
                return response.status == 200
        except aiohttp.ClientConnectionError:
            return False
