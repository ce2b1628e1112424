"""The admin listener of a real ``serve`` process: its own port, nothing of it on the proxy's,
and a write that every worker applies within 3 s through the tenants-file poll."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from tests.admin_setup import ADMIN_TOKEN, AUTH
from tests.conftest import CREDS_A, KEY_A, Upstream
from tests.processes import eventually, free_port, gateway_process, tenant_entry

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
    assert KEY_A in gateway.tenants_file.read_text()  # untouched entries keep their form
    assert key not in gateway.tenants_file.read_text()
    assert ADMIN_TOKEN not in gateway.stdout() + gateway.stderr()
    assert key not in gateway.stdout() + gateway.stderr()
