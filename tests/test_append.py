"""append-numbers end to end: the sandbox and steerable fake nxlinks behind the real gateway."""

from __future__ import annotations

import asyncio
import json
import math
import socket
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.app import create_app
from proxy.batches import Batch, Result, run_batches
from proxy.config import ConfigError
from proxy.nxlink import APPEND_ACTION, APPEND_PATH
from proxy.tenants import Credentials, Limits, Registry
from tests.conftest import (
    CREDS_A,
    CREDS_B,
    KEY_A,
    KEY_B,
    KEY_NOCREDS,
    Client,
    MakeGateway,
    Upstream,
    make_settings,
    make_tenant,
)
from tests.holding_nxlink import refusal
from tests.processes import eventually
from tests.state_fakes import SwitchableState

JSON = dict[str, Any]
URL = "/api/openapi/append-numbers"
KEY_SHOP = "ecommerce-platform-key-abc123"
KEY_BANK = "finance-platform-key-xyz789"


def shop_params(name: str, order: str, product: str, discount: str) -> list[JSON]:
    """The e-commerce tenant's template variables."""
    values = {"客户姓名": name, "订单号": order, "商品名称": product, "优惠金额": discount}
    return [{"name": k, "value": v} for k, v in values.items()]


def bank_params(level: str, product: str, due: str) -> list[JSON]:
    """The finance tenant's template variables."""
    values = {"客户等级": level, "产品类型": product, "到期时间": due}
    return [{"name": k, "value": v} for k, v in values.items()]


SHOP_EXAMPLE: JSON = {
    "taskId": "task-ecommerce-001",
    "autoFlowId": 1001,
    "countryCode": "86",
    "phoneNumbers": [
        {
            "phoneNumber": "13800138001",
            "name": "张三",
            "params": shop_params("张三", "ORD20240101001", "iPhone 15 Pro", "200元"),
        },
        {
            "phoneNumber": "13800138002",
            "name": "李四",
            "params": shop_params("李四", "ORD20240101002", "MacBook Air", "500元"),
        },
    ],
}
BANK_EXAMPLE: JSON = {
    "taskId": "task-finance-001",
    "countryCode": "86",
    "phoneNumbers": [
        {
            "phoneNumber": "13900139001",
            "contactId": "vip-0001",
            "params": bank_params("VIP", "定期理财", "2024-12-31"),
        },
        {"phoneNumber": "13900139002", "params": bank_params("普通", "基金产品", "2024-11-30")},
    ],
}


async def post(
    client: Client, key: str, body: Any, idempotency_key: str | None = None
) -> tuple[int, JSON]:
    """POST append-numbers as JSON (or raw bytes) and return status and answer."""
    data = body if isinstance(body, bytes) else json.dumps(body, ensure_ascii=False).encode()
    headers = {"x-api-key": key}
    if idempotency_key is not None:
        headers["Idempotency-Key"] = idempotency_key
    resp = await client.post(URL, data=data, headers=headers)
    return resp.status, await resp.json()


def appended(upstream: Upstream) -> list[JSON]:
    """The call/append bodies the upstream received, in arrival order."""
    return [json.loads(r.body) for r in upstream.received if r.path == APPEND_PATH]


def numbers(n: int) -> list[str]:
    """``n`` distinct mobile numbers."""
    return [f"1380000{i:04d}" for i in range(n)]


def free_port() -> int:
    """A loopback port nobody listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class FakeNxlink:
    """call/append checking signatures as nxlink does; refuses chosen numbers, can hold calls."""

    def __init__(self, creds: Credentials, *, refuse: frozenset[str] = frozenset(), wave: int = 1):
        self.accounts = {creds.access_key: creds}
        self.refuse, self.wave, self.expected, self.latency = refuse, wave, 0, 0.0
        self.drop: frozenset[str] = frozenset()
        self.bodies: list[JSON] = []
        self.in_flight = self.max_in_flight = 0
        self.gate, self.arrived = asyncio.Event(), asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        refused = refusal(request, raw, self.accounts)
        if refused is not None:
            return refused
        doc = json.loads(raw)
        self.bodies.append(doc)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.arrived.set()
        try:
            await self.hold()
            await asyncio.sleep(self.latency)  # nxlink's own processing time, not a sync point
        finally:
            self.in_flight -= 1
        phones = {e["phoneNumber"] for e in doc["list"]}
        if self.refuse & phones:
            return answer(1002, "Parameter error: number is blocked")
        if self.drop & phones and request.transport is not None:
            request.transport.close()
        return answer(0, "success", {"successCount": len(doc["list"])})

    async def hold(self) -> None:
        """Let calls through in waves of ``wave`` in flight (the last wave: once all arrived)."""
        gate = self.gate
        if self.in_flight >= self.wave or len(self.bodies) == self.expected:
            gate.set()
            self.gate = asyncio.Event()
        await gate.wait()

    def release(self) -> None:
        """Let the held calls go."""
        self.gate.set()


def answer(code: int, message: str, data: Any = None) -> web.Response:
    """nxlink's answer shape."""
    return web.json_response({"code": code, "message": message, "data": data, "traceId": "t-1"})


@pytest.fixture
async def start_fake(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
) -> Callable[[FakeNxlink], Awaitable[str]]:
    """Serve a FakeNxlink on loopback; returns its base URL."""

    async def start(fake: FakeNxlink) -> str:
        app = web.Application()
        app.router.add_post(APPEND_PATH, fake.handle)
        server = await aiohttp_server(app)
        return str(server.make_url("")).rstrip("/")

    return start


@pytest.mark.parametrize(
    ("alias", "key", "creds", "example"),
    [
        ("电商平台A", KEY_SHOP, CREDS_A, SHOP_EXAMPLE),
        ("金融平台B", KEY_BANK, CREDS_B, BANK_EXAMPLE),
    ],
)
async def test_seed_example_appends_and_numbers_are_listed(
    upstream: Upstream,
    make_gateway: MakeGateway,
    alias: str,
    key: str,
    creds: Credentials,
    example: JSON,
) -> None:
    client = await make_gateway([make_tenant(alias, key, upstream.base_url, creds)])
    status, body = await post(client, key, example)
    assert status == 200, body
    assert body["message"] == "Successfully processed 2 numbers. Success: 2, Failed: 0"
    assert body["apiKey"] == key[:8] + "***"
    data = body["data"]
    assert (data["taskId"], data["totalCount"], data["successCount"], data["failCount"]) == (
        example["taskId"],
        2,
        2,
        0,
    )
    sent = example["phoneNumbers"]
    assert [r["phoneNumber"] for r in data["results"]] == [e["phoneNumber"] for e in sent]
    assert all(r["success"] and r["response"]["code"] == 0 for r in data["results"])
    listing = await client.post(
        "/openapi/aiagent/call/list",
        json={"taskId": example["taskId"], "pageSize": 100},
        headers={"x-api-key": key},
    )
    records = {r["contactId"]: r for r in (await listing.json())["data"]["list"]}
    for entry, result in zip(sent, data["results"], strict=True):
        record = records[result["contactId"]]
        assert (record["phoneNumber"], record["params"]) == (entry["phoneNumber"], entry["params"])
        assert record["name"] == entry.get("name", "")
        assert result["contactId"] == entry.get("contactId", result["contactId"])


async def test_upstream_call_is_signed_callappend_without_nulls(
    gateway: Client, upstream: Upstream
) -> None:
    status, _ = await post(gateway, KEY_A, {"taskId": "t-1", "phoneNumbers": ["13800138000"]})
    assert status == 200
    [received] = upstream.received
    assert received.headers["action"] == APPEND_ACTION
    assert received.headers["Content-Type"] == "application/json"
    assert "x-api-key" not in received.headers
    body = json.loads(received.body)
    assert body == {
        "taskId": "t-1",
        "list": [{"contactId": body["list"][0]["contactId"], "phoneNumber": "13800138000"}],
    }


async def test_mixed_formats_global_params_and_bad_entries_failing_alone(
    gateway: Client, upstream: Upstream
) -> None:
    shared = [{"name": "活动", "value": "双十一"}]
    own = [{"name": "客户姓名", "value": "王五"}]
    entries: list[Any] = [
        " 138-0013 8000 ",
        {"phoneNumber": "139 0013 9000", "params": own, "name": "王五", "contactId": "c-1"},
        {"phoneNumber": "13700137000"},
        "",
        {"name": "no number"},
        {"phoneNumber": 13800138000},
        "call me",
        {"phoneNumber": "13600136000", "contactId": "c-1"},
        {"phoneNumber": "13500135000", "params": [{"value": 1}]},
        ["13400134000"],
    ]
    status, body = await post(
        gateway, KEY_A, {"taskId": "t-mix", "phoneNumbers": entries, "params": shared}
    )
    assert status == 200
    results = body["data"]["results"]
    assert [r["success"] for r in results] == [True] * 3 + [False] * 7
    assert [r["phoneNumber"] for r in results[:3]] == ["13800138000", "13900139000", "13700137000"]
    assert [r["phoneNumber"] for r in results[3:9]] == [
        "",
        None,
        13800138000,
        "call me",
        "13600136000",
        "13500135000",
    ]
    reasons = [r["error"] for r in results[3:]]
    for reason, expected in zip(
        reasons,
        ["empty", "missing", "must be a string", "not 3-32 digits", "repeated", "params", "entry"],
        strict=True,
    ):
        assert expected in reason
    assert body["message"] == "Successfully processed 10 numbers. Success: 3, Failed: 7"
    [sent] = appended(upstream)
    items = sent["list"]
    assert items[0]["params"] == shared and items[0]["phoneNumber"] == "13800138000"
    assert items[1] == {
        "contactId": "c-1",
        "phoneNumber": "13900139000",
        "name": "王五",
        "params": own,
    }
    assert set(items[2]) == {"contactId", "phoneNumber"}


async def test_thousand_numbers_go_in_batches_each_number_once(
    gateway: Client, upstream: Upstream
) -> None:
    phones = numbers(1000)
    status, body = await post(gateway, KEY_A, {"taskId": "t-big", "phoneNumbers": phones})
    assert status == 200
    batches = appended(upstream)
    assert len(batches) == math.ceil(1000 / 100)
    assert all(len(b["list"]) <= 100 for b in batches)
    sent = Counter(item["phoneNumber"] for b in batches for item in b["list"])
    assert sent == Counter(phones)
    results = body["data"]["results"]
    assert [r["phoneNumber"] for r in results] == phones
    assert len({r["contactId"] for r in results}) == 1000
    assert body["data"]["successCount"] == 1000


async def test_tenant_batch_size_overrides_the_global_one(
    upstream: Upstream, make_gateway: MakeGateway
) -> None:
    tenant = make_tenant("a", KEY_A, upstream.base_url, CREDS_A, limits=Limits(append_batch_size=7))
    client = await make_gateway([tenant], APPEND_BATCH_SIZE=50)
    status, _ = await post(client, KEY_A, {"taskId": "t", "phoneNumbers": numbers(20)})
    assert status == 200
    # Batches run concurrently, so they may reach nxlink in any order.
    assert sorted(len(b["list"]) for b in appended(upstream)) == [6, 7, 7]


async def test_refused_batch_fails_only_its_numbers_with_nxlink_reason(
    make_gateway: MakeGateway, start_fake: Callable[[FakeNxlink], Awaitable[str]]
) -> None:
    phones = numbers(6)
    fake = FakeNxlink(CREDS_A, refuse=frozenset({phones[3]}))
    client = await make_gateway(
        [make_tenant("a", KEY_A, await start_fake(fake), CREDS_A)], APPEND_BATCH_SIZE=2
    )
    status, body = await post(client, KEY_A, {"taskId": "t", "phoneNumbers": phones})
    assert status == 200
    results = body["data"]["results"]
    assert [r["success"] for r in results] == [True, True, False, False, True, True]
    assert results[2]["error"] == "Parameter error: number is blocked"
    assert results[2]["response"]["code"] == 1002
    assert results[2]["contactId"]
    assert body["message"] == "Successfully processed 6 numbers. Success: 4, Failed: 2"


async def test_connection_cut_fails_only_that_batch(
    make_gateway: MakeGateway, start_fake: Callable[[FakeNxlink], Awaitable[str]]
) -> None:
    phones = numbers(4)
    fake = FakeNxlink(CREDS_A)
    fake.drop = frozenset({phones[0]})
    base = await start_fake(fake)
    client = await make_gateway([make_tenant("a", KEY_A, base, CREDS_A)], APPEND_BATCH_SIZE=2)
    status, body = await post(client, KEY_A, {"taskId": "t", "phoneNumbers": phones})
    assert status == 200
    results = body["data"]["results"]
    assert [r["success"] for r in results] == [False, False, True, True]
    # nxlink read the batch before the cut: it may have taken it (test_append_outcome.py).
    assert results[0]["error"].startswith("OUTCOME_UNKNOWN: ")
    assert "Upstream connection failed" in results[0]["error"]


async def test_nxlink_refusing_the_account_fails_every_number_not_the_request(
    make_upstream: Callable[..., Awaitable[Upstream]], make_gateway: MakeGateway
) -> None:
    upstream = await make_upstream([CREDS_A])
    client = await make_gateway([make_tenant("b", KEY_B, upstream.base_url, CREDS_B)])
    status, body = await post(client, KEY_B, {"taskId": "t", "phoneNumbers": numbers(3)})
    assert status == 200
    for result in body["data"]["results"]:
        assert not result["success"]
        assert result["error"].startswith("Insufficient permissions")
        assert result["response"]["code"] == 1005


async def test_unreachable_upstream_fails_the_numbers_with_the_reason(
    make_gateway: MakeGateway,
) -> None:
    client = await make_gateway(
        [make_tenant("a", KEY_A, f"http://127.0.0.1:{free_port()}", CREDS_A)]
    )
    status, body = await post(client, KEY_A, {"taskId": "t", "phoneNumbers": numbers(3)})
    assert status == 200
    assert body["data"]["failCount"] == 3
    assert all("Cannot connect to upstream" in r["error"] for r in body["data"]["results"])
    assert all("response" not in r for r in body["data"]["results"])


async def test_concurrency_bound_is_respected(
    make_gateway: MakeGateway, start_fake: Callable[[FakeNxlink], Awaitable[str]]
) -> None:
    fake = FakeNxlink(CREDS_A, wave=3)
    fake.expected, fake.latency = 10, 0.01
    base = await start_fake(fake)
    client = await make_gateway(
        [make_tenant("a", KEY_A, base, CREDS_A)], APPEND_BATCH_SIZE=1, APPEND_CONCURRENCY=3
    )
    async with asyncio.timeout(10):
        status, body = await post(client, KEY_A, {"taskId": "t", "phoneNumbers": numbers(10)})
    assert status == 200 and body["data"]["successCount"] == 10
    assert fake.max_in_flight == 3


async def test_run_batches_keeps_order_and_bound() -> None:
    in_flight, peak = 0, 0

    async def send(batch: Batch) -> list[Result]:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        for _ in range(10 - batch.positions[0]):  # later batches finish first
            await asyncio.sleep(0)
        in_flight -= 1
        return [{"phoneNumber": batch.positions[0], "success": True}]

    batches = [Batch((n,), ()) for n in range(9)]
    outcomes = await run_batches(send, batches, 4)
    assert [o[0]["phoneNumber"] for o in outcomes] == list(range(9))
    assert peak == 4


async def test_idempotent_replay_makes_no_upstream_call(
    gateway: Client, upstream: Upstream
) -> None:
    body = {"taskId": "t", "phoneNumbers": numbers(3)}
    first = await gateway.post(
        URL, json=body, headers={"x-api-key": KEY_A, "Idempotency-Key": "k1"}
    )
    calls = len(upstream.received)
    again = await gateway.post(
        URL, json=body, headers={"x-api-key": KEY_A, "Idempotency-Key": "k1"}
    )
    assert again.status == 200 and again.headers["Idempotent-Replayed"] == "true"
    assert await again.read() == await first.read()
    assert len(upstream.received) == calls == 1


async def test_idempotency_key_with_another_body_is_422(
    gateway: Client, upstream: Upstream
) -> None:
    await post(gateway, KEY_A, {"taskId": "t", "phoneNumbers": ["13800138000"]}, "k")
    status, body = await post(gateway, KEY_A, {"taskId": "t", "phoneNumbers": ["13900139000"]}, "k")
    assert (status, body["error"]) == (422, "IDEMPOTENCY_KEY_REUSED")
    assert len(upstream.received) == 1


async def test_idempotency_keys_are_scoped_per_tenant(gateway: Client, upstream: Upstream) -> None:
    request = {"taskId": "t", "phoneNumbers": ["13800138000"]}
    for key in (KEY_A, KEY_B):
        status, body = await post(gateway, key, request, "same")
        assert status == 200 and body["data"]["successCount"] == 1
    assert len(upstream.received) == 2


async def test_failed_idempotent_request_is_not_stored(gateway: Client) -> None:
    async with asyncio.timeout(10):  # a claim never given up would make the repeat wait forever
        for _ in range(2):
            status, body = await post(gateway, KEY_A, {"taskId": "t"}, "k")
            assert (status, body["error"]) == (400, "INVALID_PHONE_NUMBERS")


def test_an_idempotency_ttl_shorter_than_a_minute_is_refused() -> None:
    # A record that lapses under a live run would let a repeat send every batch again.
    with pytest.raises(ConfigError) as caught:
        make_settings(IDEMPOTENCY_TTL="0")
    assert caught.value.problems[0].startswith("IDEMPOTENCY_TTL=0: out of range")


async def repeat_polls(backend: SwitchableState) -> bool:
    return backend.calls.count("claim") >= 3


async def test_concurrent_duplicate_waits_for_the_first(
    aiohttp_client: Callable[..., Awaitable[Client]],
    start_fake: Callable[[FakeNxlink], Awaitable[str]],
) -> None:
    fake = FakeNxlink(CREDS_A, wave=1_000)
    backend = SwitchableState()
    app = create_app(
        make_settings(),
        Registry([make_tenant("a", KEY_A, await start_fake(fake), CREDS_A)]),
        open_backend=lambda _url: backend,
    )
    client = await aiohttp_client(app)
    body = {"taskId": "t", "phoneNumbers": numbers(3)}
    headers = {"x-api-key": KEY_A, "Idempotency-Key": "dup"}
    async with asyncio.timeout(10):
        first = asyncio.create_task(client.post(URL, json=body, headers=headers))
        await fake.arrived.wait()
        second = asyncio.create_task(client.post(URL, json=body, headers=headers))
        await eventually(lambda: repeat_polls(backend), what="the repeat polling its claim")
        fake.release()
        answers = [await first, await second]
    assert len(fake.bodies) == 1
    assert [a.status for a in answers] == [200, 200]
    assert await answers[0].read() == await answers[1].read()
    assert answers[1].headers["Idempotent-Replayed"] == "true"


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        (b"{not json", 400, "INVALID_JSON"),
        (b'{"taskId": "t", "phoneNumbers": [NaN]}', 400, "INVALID_JSON"),
        (b"[1, 2]", 400, "INVALID_JSON"),
        (b"", 400, "INVALID_JSON"),
        (b"\xff\xfe", 400, "INVALID_ENCODING"),
        ({"phoneNumbers": ["13800138000"]}, 400, "MISSING_TASK_ID"),
        ({"taskId": "  ", "phoneNumbers": ["13800138000"]}, 400, "MISSING_TASK_ID"),
        ({"taskId": 7, "phoneNumbers": ["13800138000"]}, 400, "INVALID_FIELD"),
        ({"taskId": "t"}, 400, "INVALID_PHONE_NUMBERS"),
        ({"taskId": "t", "phoneNumbers": []}, 400, "INVALID_PHONE_NUMBERS"),
        ({"taskId": "t", "phoneNumbers": "13800138000"}, 400, "INVALID_PHONE_NUMBERS"),
        ({"taskId": "t", "phoneNumbers": ["1"], "autoFlowId": "abc"}, 400, "INVALID_FIELD"),
        ({"taskId": "t", "phoneNumbers": ["1"], "autoFlowId": True}, 400, "INVALID_FIELD"),
        ({"taskId": "t", "phoneNumbers": ["1"], "countryCode": 86}, 400, "INVALID_FIELD"),
        ({"taskId": "t", "phoneNumbers": ["1"], "params": {"a": 1}}, 400, "INVALID_FIELD"),
        ({"taskId": "t", "phoneNumbers": numbers(4)}, 413, "TOO_MANY_NUMBERS"),
    ],
)
async def test_invalid_request_is_refused_before_any_upstream_call(
    upstream: Upstream, make_gateway: MakeGateway, body: Any, status: int, error: str
) -> None:
    client = await make_gateway(
        [make_tenant("a", KEY_A, upstream.base_url, CREDS_A)], APPEND_MAX_NUMBERS=3
    )
    got_status, got = await post(client, KEY_A, body)
    assert (got_status, got["code"], got["error"]) == (status, status, error)
    assert got["message"]
    assert upstream.received == []


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"phoneNumbers": ["13800138000"]}, "taskId is required"),
        ({"taskId": "t", "phoneNumbers": []}, "phoneNumbers must be a non-empty array"),
        (
            {"taskId": "t", "phoneNumbers": ["1"], "autoFlowId": "abc"},
            "autoFlowId must be an integer",
        ),
    ],
)
async def test_validation_messages(gateway: Client, body: JSON, message: str) -> None:
    _, got = await post(gateway, KEY_A, body)
    assert got["message"] == message


async def test_tenant_without_credentials_and_missing_key(
    gateway: Client, upstream: Upstream
) -> None:
    status, body = await post(
        gateway, KEY_NOCREDS, {"taskId": "t", "phoneNumbers": ["13800138000"]}
    )
    assert (status, body["error"], body["apiKeyAlias"]) == (
        500,
        "OPENAPI_CONFIG_INCOMPLETE",
        "tenant-c",
    )
    resp = await gateway.post(URL, json={"taskId": "t", "phoneNumbers": ["13800138000"]})
    assert (resp.status, (await resp.json())["error"]) == (401, "MISSING_API_KEY")
    assert upstream.received == []


async def test_text_utf8_cannot_carry_fails_its_entry_and_a_huge_number_goes_through(
    gateway: Client, upstream: Upstream
) -> None:
    huge = "1" + "0" * 400  # an int JSON allows and floats cannot hold
    raw = (
        '{"taskId": "t-odd", "phoneNumbers": ['
        '{"phoneNumber": "13800138000", "name": "\\udcff"}, "13900139000", '
        '{"phoneNumber": "13700137000", "params": [{"name": "n", "value": ' + huge + "}]}]}"
    ).encode()
    status, body = await post(gateway, KEY_A, raw)
    assert status == 200
    assert [r["success"] for r in body["data"]["results"]] == [False, True, True]
    [sent] = appended(upstream)
    assert [item["phoneNumber"] for item in sent["list"]] == ["13900139000", "13700137000"]
    assert sent["list"][1]["params"] == [{"name": "n", "value": int(huge)}]


async def test_task_id_utf8_cannot_carry_is_a_400(gateway: Client, upstream: Upstream) -> None:
    raw = b'{"taskId": "t-\\ud800", "phoneNumbers": ["13800138000"]}'
    status, body = await post(gateway, KEY_A, raw)
    assert (status, body["error"]) == (400, "INVALID_FIELD")
    assert upstream.received == []
