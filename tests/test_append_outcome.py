"""append-numbers when nxlink got a batch but its answer never came: the batch's numbers are
OUTCOME_UNKNOWN, counted in unknownCount, never sent again by a retry, and kept against the
numbers quota; a batch that never left the gateway stays a plain failure."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.app import create_app
from proxy.config import Quotas
from proxy.idempotency import OUTCOME_UNKNOWN
from proxy.state import MemoryState, StateUnavailable
from proxy.tenants import Registry, Tenant
from tests.conftest import CREDS_A, KEY_A, Client, make_settings, make_tenant
from tests.holding_nxlink import HoldingNxlink
from tests.processes import free_port

AiohttpClient = Callable[[web.Application], Awaitable[Client]]
URL = "/api/openapi/append-numbers"
PHONES = [f"1360000{i:04d}" for i in range(6)]  # three batches of two
BODY = json.dumps({"taskId": "t", "phoneNumbers": PHONES}).encode()
SETTINGS = {"APPEND_BATCH_SIZE": "2", "APPEND_CONCURRENCY": "1", "UPSTREAM_TIMEOUT": "0.3"}


@pytest.fixture
async def nxlink(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
) -> AsyncIterator[tuple[HoldingNxlink, str]]:
    """A signature-checking call/append that holds the batch of PHONES[2] and hangs up on the
    batch of PHONES[4] (the test may change both); its base URL."""
    fake = HoldingNxlink(CREDS_A, hold={PHONES[2]}, cut={PHONES[4]})
    server = await aiohttp_server(fake.app())
    try:
        yield fake, str(server.make_url("")).rstrip("/")
    finally:
        fake.release.set()  # the held handler ends before the server shuts down


async def gateway_on(
    aiohttp_client: AiohttpClient, tenant: Tenant, backend: MemoryState | None = None, **env: str
) -> Client:
    state = backend or MemoryState()
    settings = make_settings(**SETTINGS, **env)
    app = create_app(settings, Registry([tenant]), open_backend=lambda _url: state)
    return await aiohttp_client(app)


async def append(client: Client, key: str | None = None) -> tuple[int, dict[str, str], Any]:
    headers = {"x-api-key": KEY_A, "Content-Type": "application/json"}
    if key is not None:
        headers["Idempotency-Key"] = key
    response = await client.post(URL, data=BODY, headers=headers)
    return response.status, dict(response.headers), await response.json()


def errors_of(body: Any) -> list[str | None]:
    return [r.get("error") for r in body["data"]["results"]]


def is_no_answer(error: str | None) -> bool:
    """The OUTCOME_UNKNOWN of a batch sent with no answer (not the crash takeover's text)."""
    return (
        error is not None
        and error.startswith("OUTCOME_UNKNOWN: ")
        and "no answer" in error
        and "check call/list" in error
        and error != OUTCOME_UNKNOWN
    )


@pytest.mark.parametrize(
    ("fault", "failed", "reason"),
    [
        ("hold", [2, 3], "Upstream did not answer within 0.3s"),
        ("cut", [4, 5], "Upstream connection failed"),
    ],
    ids=["read-never-answered", "read-then-hung-up"],
)
async def test_a_batch_nxlink_read_with_no_answer_back_is_outcome_unknown(
    aiohttp_client: AiohttpClient,
    nxlink: tuple[HoldingNxlink, str],
    fault: str,
    failed: list[int],
    reason: str,
) -> None:
    fake, base = nxlink
    fake.hold, fake.cut = (fake.hold, ()) if fault == "hold" else ((), fake.cut)
    client = await gateway_on(aiohttp_client, make_tenant("a", KEY_A, base, CREDS_A))
    status, _headers, body = await append(client)
    assert status == 200
    errors = errors_of(body)
    assert [n for n, e in enumerate(errors) if e is not None] == failed
    assert all(is_no_answer(errors[n]) and reason in str(errors[n]) for n in failed), errors
    counts = {k: body["data"][k] for k in ("successCount", "failCount", "unknownCount")}
    assert counts == {"successCount": 4, "failCount": 2, "unknownCount": 2}
    assert fake.received == PHONES


async def test_an_unreachable_upstream_is_a_plain_failure_safe_to_resend(
    aiohttp_client: AiohttpClient,
) -> None:
    down = make_tenant("a", KEY_A, f"http://127.0.0.1:{free_port()}", CREDS_A)
    client = await gateway_on(aiohttp_client, down)
    status, _headers, body = await append(client)
    assert status == 200
    assert (body["data"]["failCount"], body["data"]["unknownCount"]) == (6, 0)
    assert all(
        e is not None and e.startswith("Cannot connect to upstream") for e in errors_of(body)
    )


async def test_a_retry_with_the_same_key_sends_no_number_again(
    aiohttp_client: AiohttpClient, nxlink: tuple[HoldingNxlink, str]
) -> None:
    fake, base = nxlink
    client = await gateway_on(aiohttp_client, make_tenant("a", KEY_A, base, CREDS_A))
    first = await append(client, "retry-1")
    assert first[0] == 200 and first[2]["data"]["unknownCount"] == 4
    again = await append(client, "retry-1")
    assert again[1]["Idempotent-Replayed"] == "true" and again[2] == first[2]
    assert fake.received == PHONES


class NoAnswerStored(MemoryState):
    """A backend that journals every batch but cannot store a run's answer: a repeat has to
    take the run over from its journal."""

    async def complete(self, key: str, owner: str, answer: bytes, ttl: float, now: float) -> bool:
        raise StateUnavailable("the answer could not be stored")


async def test_a_takeover_reuses_the_recorded_outcome_unknown_and_sends_nothing(
    aiohttp_client: AiohttpClient, nxlink: tuple[HoldingNxlink, str]
) -> None:
    fake, base = nxlink
    tenant = make_tenant("a", KEY_A, base, CREDS_A)
    client = await gateway_on(aiohttp_client, tenant, NoAnswerStored(), IDEMPOTENCY_LEASE="1")
    first = await append(client, "takeover-1")
    assert first[0] == 200 and first[2]["data"]["unknownCount"] == 4
    # The first run ended without its answer stored: the repeat takes over from the journal
    # once the lease lapsed.
    again = await append(client, "takeover-1")
    assert again[0] == 200 and "Idempotent-Replayed" not in again[1]
    assert errors_of(again[2]) == errors_of(first[2])
    assert again[2]["data"]["unknownCount"] == 4
    assert max(Counter(fake.received).values()) == 1 and fake.received == PHONES


async def test_outcome_unknown_numbers_are_not_given_back_to_the_quota(
    aiohttp_client: AiohttpClient, nxlink: tuple[HoldingNxlink, str]
) -> None:
    _fake, base = nxlink
    tenant = make_tenant("a", KEY_A, base, CREDS_A)
    tenant = dataclasses.replace(tenant, quotas=Quotas(numbers_per_day=100))
    backend = MemoryState()
    client = await gateway_on(aiohttp_client, tenant, backend)
    status, _headers, body = await append(client)
    assert status == 200 and body["data"]["unknownCount"] == 4
    day = datetime.now(UTC).date().isoformat()
    assert await backend.quota_used([f"q:{tenant.id}:numbersPerDay:{day}"]) == [6]
