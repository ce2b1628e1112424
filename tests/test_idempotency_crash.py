"""A gateway SIGKILLed in the middle of an append, and a second one taking the run over from
the same SQLite file: no number reaches nxlink twice."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from proxy.idempotency import OUTCOME_UNKNOWN
from tests.conftest import CREDS_A, KEY_A
from tests.holding_nxlink import HoldingNxlink
from tests.processes import gateway_process, tenant_entry

PHONES = [f"1370000{i:04d}" for i in range(8)]  # four batches of two
HEADERS = {"x-api-key": KEY_A, "Idempotency-Key": "crash-1"}


async def append(session: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    body = {"taskId": "t-crash", "phoneNumbers": PHONES}
    async with session.post(f"{url}/api/openapi/append-numbers", json=body, headers=HEADERS) as r:
        return r.status, await r.json()


@pytest.mark.slow
async def test_a_run_killed_mid_append_is_taken_over_without_calling_anyone_twice(
    tmp_path: Path, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> None:
    nxlink = HoldingNxlink(CREDS_A, hold={PHONES[4]})  # the third batch never gets an answer
    server = await aiohttp_server(nxlink.app())
    tenants = [tenant_entry("tenant-a", KEY_A, str(server.make_url("")).rstrip("/"), CREDS_A)]
    settings = {
        "STATE_URL": f"sqlite:///{tmp_path / 'state.db'}",
        "IDEMPOTENCY_LEASE": "1",
        "APPEND_BATCH_SIZE": "2",
        "APPEND_CONCURRENCY": "1",
    }
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    first_dir.mkdir()
    second_dir.mkdir()
    try:
        async with aiohttp.ClientSession() as session:
            async with gateway_process(first_dir, tenants, **settings) as first:
                cut = asyncio.create_task(append(session, first.url))
                async with asyncio.timeout(10):
                    await nxlink.holding.wait()
                first.process.kill()
                await first.wait_exit(10)
                with contextlib.suppress(aiohttp.ClientError):
                    await cut
            assert nxlink.received == PHONES[:6]
            async with gateway_process(second_dir, tenants, **settings) as second:
                status, body = await append(session, second.url)
    finally:
        nxlink.release.set()
    assert status == 200, body
    assert max(Counter(nxlink.received).values()) == 1
    assert nxlink.received == PHONES
    results = body["data"]["results"]
    assert [r["success"] for r in results] == [True] * 4 + [False] * 2 + [True] * 2
    assert {r["error"] for r in results[4:6]} == {OUTCOME_UNKNOWN}
    assert body["data"]["unknownCount"] == 2
    assert json.dumps(body).count("OUTCOME_UNKNOWN") == 2
