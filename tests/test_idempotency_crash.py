"""A gateway SIGKILLed in the middle of an append, and a second one taking the run over from
the same SQLite file: no number reaches nxlink twice."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from proxy.idempotency import OUTCOME_UNKNOWN
from proxy.state import open_state
from tests.conftest import CREDS_A, KEY_A
from tests.holding_nxlink import HoldingNxlink
from tests.processes import gateway_process, tenant_entry

PHONES = [f"1370000{i:04d}" for i in range(8)]  # four batches of two
SETTINGS = {"IDEMPOTENCY_LEASE": "1", "APPEND_BATCH_SIZE": "2", "APPEND_CONCURRENCY": "1"}

Servers = Callable[..., Awaitable[TestServer]]


async def append(
    session: aiohttp.ClientSession, url: str, phones: list[str], key: str
) -> tuple[int, Any]:
    body = {"taskId": "t-crash", "phoneNumbers": phones}
    headers = {"x-api-key": KEY_A, "Idempotency-Key": key}
    async with session.post(f"{url}/api/openapi/append-numbers", json=body, headers=headers) as r:
        return r.status, await r.json()


async def killed_then_taken_over(
    tmp_path: Path, aiohttp_server: Servers, nxlink: HoldingNxlink, phones: list[str], **extra: Any
) -> tuple[list[str], int, Any]:
    """A gateway SIGKILLed while nxlink holds a batch of the append of ``phones``, then the
    same request to a second gateway on the same SQLite file: the numbers nxlink got before
    the second started, and the second's answer."""
    server = await aiohttp_server(nxlink.app())
    base_url = str(server.make_url("")).rstrip("/")
    tenants = [tenant_entry("tenant-a", KEY_A, base_url, CREDS_A, **extra)]
    settings = {"STATE_URL": f"sqlite:///{tmp_path / 'state.db'}", **SETTINGS}
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    first_dir.mkdir()
    second_dir.mkdir()
    try:
        async with aiohttp.ClientSession() as session:
            async with gateway_process(first_dir, tenants, **settings) as first:
                cut = asyncio.create_task(append(session, first.url, phones, tmp_path.name))
                async with asyncio.timeout(10):
                    await nxlink.holding.wait()
                first.process.kill()
                await first.wait_exit(10)
                with contextlib.suppress(aiohttp.ClientError):
                    await cut
            before = list(nxlink.received)
            async with gateway_process(second_dir, tenants, **settings) as second:
                status, body = await append(session, second.url, phones, tmp_path.name)
    finally:
        nxlink.release.set()
    return before, status, body


@pytest.mark.slow
async def test_a_run_killed_mid_append_is_taken_over_without_calling_anyone_twice(
    tmp_path: Path, aiohttp_server: Servers
) -> None:
    nxlink = HoldingNxlink(CREDS_A, hold={PHONES[4]})  # the third batch never gets an answer
    before, status, body = await killed_then_taken_over(tmp_path, aiohttp_server, nxlink, PHONES)
    assert before == PHONES[:6]
    assert status == 200, body
    assert max(Counter(nxlink.received).values()) == 1
    assert nxlink.received == PHONES
    results = body["data"]["results"]
    assert [r["success"] for r in results] == [True] * 4 + [False] * 2 + [True] * 2
    assert {r["error"] for r in results[4:6]} == {OUTCOME_UNKNOWN}
    assert body["data"]["unknownCount"] == 2
    assert json.dumps(body).count("OUTCOME_UNKNOWN") == 2


@pytest.mark.slow
async def test_a_taken_over_run_charges_the_quota_once_for_numbers_accepted_or_unknown(
    tmp_path: Path, aiohttp_server: Servers
) -> None:
    phones = [f"1360000{i:04d}" for i in range(10)]  # ok, refused, held, refused, ok
    nxlink = HoldingNxlink(CREDS_A, hold={phones[4]}, refuse={phones[2], phones[7]})
    today = datetime.now(UTC).date().isoformat()
    quotas = {"numbersPerDay": 100}
    taken = await killed_then_taken_over(
        tmp_path, aiohttp_server, nxlink, phones, id="tenant-a", quotas=quotas
    )
    before, status, body = taken
    assert before == phones[:6]
    assert status == 200, body
    data = body["data"]
    assert (data["successCount"], data["unknownCount"]) == (4, 2)
    backend = open_state(f"sqlite:///{tmp_path / 'state.db'}")
    try:
        used = await backend.quota_used([f"q:tenant-a:numbersPerDay:{today}"])
    finally:
        await backend.close()
    assert used == [4 + 2]
