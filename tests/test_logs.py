"""Logs: JSON lines, one access line per request, and never a secret or a full API key."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.app import create_app
from proxy.config import Secret
from proxy.logs import AccessLogger, JsonFormatter, RequestIdFilter, request_id_var, setup_logging
from proxy.tenants import ApiKey, Registry, Tenant, hash_key
from tests.conftest import (
    CREDS_A,
    CREDS_B,
    KEY_A,
    KEY_B,
    KEY_NOCREDS,
    Client,
    MakeUpstream,
    Upstream,
    make_settings,
    make_tenant,
)
from tests.processes import free_port, gateway_process, tenant_entry

AiohttpClient = Callable[..., Awaitable[Client]]
AiohttpServer = Callable[..., Awaitable[TestServer]]
TASK_LIST: Final = "/openapi/aiagent/task/list"
APPEND: Final = "/api/openapi/append-numbers"
KEY_DOWN: Final = "tenant-d-key-upstream-down-77"
KEY_EXPIRED: Final = "tenant-e-key-expired-888888"
WRONG_KEY: Final = "wrong-key-nobody-has-999999"
SECRETS: Final = (
    KEY_A,
    KEY_B,
    KEY_NOCREDS,
    KEY_DOWN,
    KEY_EXPIRED,
    WRONG_KEY,
    CREDS_A.access_secret.reveal(),
    CREDS_B.access_secret.reveal(),
)
# (method, path, key, body): every way a request can end, each with its own request id.
SCENARIOS: Final = (
    ("POST", TASK_LIST, KEY_A, b'{"pageNumber": 1}'),  # forwarded, 200
    ("POST", APPEND, KEY_B, b'{"taskId": "t-1", "phoneNumbers": ["13800000000"]}'),  # 200
    ("GET", "/api/openapi/status", KEY_A, b""),  # 200
    ("POST", TASK_LIST, WRONG_KEY, b"{}"),  # 403 INVALID_API_KEY
    ("POST", TASK_LIST, KEY_EXPIRED, b"{}"),  # 403 API_KEY_EXPIRED
    ("POST", TASK_LIST, KEY_NOCREDS, b"{}"),  # 500 OPENAPI_CONFIG_INCOMPLETE
    ("POST", TASK_LIST, KEY_DOWN, b"{}"),  # 502 UPSTREAM_UNAVAILABLE
    ("POST", TASK_LIST, None, b"{}"),  # 401 MISSING_API_KEY
    ("POST", TASK_LIST, KEY_A, b"\xff\xfe"),  # 400 not UTF-8
)
EXPECTED_STATUSES: Final = [200, 200, 200, 403, 403, 500, 502, 401, 400]


def record(message: str = "hello %s", *args: object, **extra: Any) -> logging.LogRecord:
    return logging.makeLogRecord(
        {"name": "proxy.test", "levelno": 20, "levelname": "INFO", "msg": message, "args": args}
        | extra
    )


def expired_tenant(base_url: str) -> Tenant:
    past = datetime.now(UTC) - timedelta(days=1)
    tenant = make_tenant("tenant-e", KEY_EXPIRED, base_url, CREDS_B)
    return replace(tenant, keys=(ApiKey(hash_key(KEY_EXPIRED), "tenant-e***", past),))


def all_tenants(base_url: str) -> list[Tenant]:
    return [
        make_tenant("tenant-a", KEY_A, base_url, CREDS_A),
        make_tenant("tenant-b", KEY_B, base_url, CREDS_B),
        make_tenant("tenant-c", KEY_NOCREDS, base_url, None),
        make_tenant("tenant-d", KEY_DOWN, f"http://127.0.0.1:{free_port()}", CREDS_A),
        expired_tenant(base_url),
    ]


async def play(
    session: aiohttp.ClientSession | Client, base: str = ""
) -> AsyncIterator[tuple[str, int]]:
    """Send every scenario; yield each request id and the status it got."""
    for n, (method, path, key, body) in enumerate(SCENARIOS):
        request_id = f"scenario-{n}"
        headers = {"X-Request-Id": request_id, "Content-Type": "application/json"}
        if key is not None:
            headers["Authorization" if n % 2 else "x-api-key"] = f"Bearer {key}" if n % 2 else key
        async with session.request(method, base + path, data=body or None, headers=headers) as r:
            await r.read()
            yield request_id, r.status


@pytest.fixture
async def logged_gateway(
    upstream: Upstream, aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient
) -> Client:
    """Every kind of tenant, served with the gateway's own access logger (as serve.py does)."""
    app = create_app(make_settings(), Registry(all_tenants(upstream.base_url)))
    return await aiohttp_client(await aiohttp_server(app, access_log_class=AccessLogger))


@pytest.fixture
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


# --- the formatter and the filter ----------------------------------------------------------


def test_formatter_writes_one_json_object_with_the_extras() -> None:
    line = JsonFormatter().format(record("tenant %s\nnext", "电商平台A", tenant="电商平台A", n=3))
    assert "\n" not in line
    parsed = json.loads(line)
    assert parsed["message"] == "tenant 电商平台A\nnext"
    assert parsed["level"] == "info"
    assert parsed["logger"] == "proxy.test"
    assert (parsed["tenant"], parsed["n"]) == ("电商平台A", 3)
    assert "电商平台A" in line  # readable, not \\u-escaped
    datetime.strptime(parsed["time"], "%Y-%m-%dT%H:%M:%S.%fZ")
    assert not {"args", "msg", "levelno", "pathname", "exc_info"} & parsed.keys()


def test_formatter_puts_a_traceback_in_one_field_of_one_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        line = JsonFormatter().format(record("failed", exc_info=sys.exc_info()))
    assert "\n" not in line
    assert "ValueError: boom" in json.loads(line)["exception"]


def test_formatter_shows_secrets_masked_through_their_str() -> None:
    line = JsonFormatter().format(record("creds", creds=CREDS_A, secret=Secret("s3cr3t-value")))
    assert "s3cr3t-value" not in line and CREDS_A.access_secret.reveal() not in line
    assert "**********" in json.loads(line)["secret"]


def test_request_id_filter_stamps_the_current_request_id() -> None:
    stamped, given = record(), record(request_id="given")
    token = request_id_var.set("req-42")
    try:
        assert RequestIdFilter().filter(stamped) and RequestIdFilter().filter(given)
    finally:
        request_id_var.reset(token)
    assert stamped.__dict__["request_id"] == "req-42"
    assert given.__dict__["request_id"] == "given"
    outside = record()
    RequestIdFilter().filter(outside)
    assert outside.__dict__["request_id"] == "-"


def test_setup_logging_sends_every_logger_to_stdout_as_json(
    capsys: pytest.CaptureFixture[str], restore_root_logger: None
) -> None:
    setup_logging("warning")
    logging.getLogger("aiohttp.server").warning("from %s", "aiohttp")
    logging.getLogger("proxy.x").info("below the level")
    token = request_id_var.set("req-7")
    try:
        logging.getLogger("proxy.x").error("in a request")
    finally:
        request_id_var.reset(token)
    out, err = capsys.readouterr()
    lines = [json.loads(line) for line in out.splitlines()]
    assert [(x["logger"], x["message"], x["request_id"]) for x in lines] == [
        ("aiohttp.server", "from aiohttp", "-"),
        ("proxy.x", "in a request", "req-7"),
    ]
    assert err == ""


def test_formatter_falls_back_for_what_orjson_refuses() -> None:
    # A lone surrogate (undecodable input echoed in a message) and an int past 64 bits.
    line = JsonFormatter().format(record("odd", text="bad \udcff byte", big=2**70))
    parsed = json.loads(line)
    assert (parsed["text"], parsed["big"]) == ("bad \udcff byte", 2**70)


# --- access lines ----------------------------------------------------------------------------


def access_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The gateway's access lines (the in-process upstream logs plain aiohttp ones too)."""
    return [r for r in caplog.records if r.name == "aiohttp.access" and "duration_ms" in r.__dict__]


async def test_one_access_line_per_request_with_who_what_and_how_it_ended(
    logged_gateway: Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    body = b'{"pageNumber": 1}'
    response = await logged_gateway.post(
        TASK_LIST,
        data=body,
        headers={"x-api-key": KEY_A, "X-Request-Id": "req-access-1", "Content-Type": "text/json"},
    )
    answer = await response.read()
    assert response.status == 200
    [line] = access_records(caplog)
    fields = json.loads(JsonFormatter().format(line))
    assert fields["request_id"] == "req-access-1"
    assert fields["tenant"] == "tenant-a"
    assert (fields["method"], fields["path"]) == ("POST", TASK_LIST)
    assert (fields["status"], fields["upstream_status"]) == (200, 200)
    assert isinstance(fields["duration_ms"], float) and fields["duration_ms"] >= 0
    assert fields["bytes_in"] == len(body)
    assert fields["bytes_out"] == len(answer) > 0  # the body, as bytes_in counts it


async def streamed(request: web.Request) -> web.StreamResponse:
    """An answer in two pieces, chunked: the gateway streams it on as it arrives."""
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    await response.prepare(request)
    await response.write(b'{"code": 0, ')
    await asyncio.sleep(0.02)
    await response.write(b'"data": "' + b"x" * 1000 + b'"}')
    await response.write_eof()
    return response


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_access_line_counts_the_body_bytes_of_a_streamed_answer(
    make_upstream: MakeUpstream,
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    caplog: pytest.LogCaptureFixture,
    method: str,
) -> None:
    caplog.set_level(logging.INFO)
    upstream = await make_upstream(extra={"/openapi/test/streamed": streamed})
    app = create_app(make_settings(), Registry(all_tenants(upstream.base_url)))
    client = await aiohttp_client(await aiohttp_server(app, access_log_class=AccessLogger))
    headers = {"x-api-key": KEY_A, "action": "testStreamed"}
    response = await client.request(method, "/openapi/test/streamed", headers=headers)
    answer = await response.read()
    assert response.status == 200 and len(answer) == (0 if method == "HEAD" else 1023)
    [line] = access_records(caplog)
    assert line.__dict__["bytes_out"] == len(answer)


async def test_access_line_of_a_refused_request_has_no_tenant_and_no_upstream_status(
    logged_gateway: Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    response = await logged_gateway.get("/api/openapi/status", headers={"x-api-key": WRONG_KEY})
    assert response.status == 403
    [line] = access_records(caplog)
    fields = json.loads(JsonFormatter().format(line))
    assert (fields["tenant"], fields["status"], fields["upstream_status"]) == (None, 403, None)
    assert len(fields["request_id"]) == 32  # one was made up


async def test_access_line_counts_the_bytes_of_a_chunked_upload(
    logged_gateway: Client, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    parts = [b'{"pageNumber": ', b"1", b", ", b'"pageSize": 5}']

    async def chunked() -> AsyncIterator[bytes]:
        for part in parts:
            yield part

    response = await logged_gateway.post(
        TASK_LIST,
        data=chunked(),
        headers={"x-api-key": KEY_A, "Content-Type": "application/json"},
    )
    assert (await response.json())["code"] == 0
    assert upstream.received[0].body == b"".join(parts)
    [line] = access_records(caplog)
    assert line.__dict__["bytes_in"] == len(b"".join(parts))


async def test_every_request_gets_exactly_one_access_line(
    logged_gateway: Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    sent = [(rid, status) async for rid, status in play(logged_gateway)]
    assert [status for _, status in sent] == EXPECTED_STATUSES
    logged = [(r.__dict__["request_id"], r.__dict__["status"]) for r in access_records(caplog)]
    assert sorted(logged) == sorted(sent)


# --- no secret, no full key, ever ------------------------------------------------------------


def leaks(text: str) -> list[str]:
    return [secret for secret in SECRETS if secret in text]


async def test_no_secret_or_full_key_reaches_any_log_line(
    logged_gateway: Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    sent = [status async for _, status in play(logged_gateway)]
    assert sent == EXPECTED_STATUSES
    formatter = JsonFormatter()
    lines = [formatter.format(r) for r in caplog.records]
    assert len(lines) > len(SCENARIOS)  # access lines and the errors' own lines
    assert any("UPSTREAM_UNAVAILABLE" in line for line in lines)
    assert [line for line in lines if leaks(line)] == []


async def test_no_secret_or_full_key_reaches_a_running_gateways_output(
    tmp_path: Path, upstream: Upstream
) -> None:
    past = (datetime.now(UTC) - timedelta(days=1)).isoformat()
    tenants = [
        tenant_entry("tenant-a", KEY_A, upstream.base_url, CREDS_A),
        tenant_entry("tenant-b", KEY_B, upstream.base_url, CREDS_B),
        tenant_entry("tenant-c", KEY_NOCREDS, upstream.base_url, None),
        tenant_entry("tenant-d", KEY_DOWN, f"http://127.0.0.1:{free_port()}", CREDS_A),
        {
            **tenant_entry("tenant-e", "unused-key-0000000000", upstream.base_url, CREDS_B),
            "apiKeys": [{"apiKey": KEY_EXPIRED, "notAfter": past}],
        },
    ]
    async with (
        gateway_process(tmp_path, tenants, LOG_LEVEL="debug") as gateway,
        aiohttp.ClientSession() as session,
    ):
        sent = [(rid, status) async for rid, status in play(session, gateway.url)]
        assert [status for _, status in sent] == EXPECTED_STATUSES
        gateway.send(signal.SIGTERM)
        assert await gateway.wait_exit(timeout=10) == 0

    lines = gateway.log_lines()  # every stdout line parses as JSON
    access = {(x["request_id"], x["status"]) for x in lines if x["logger"] == "aiohttp.access"}
    assert set(sent) <= access
    assert leaks(gateway.stdout()) == []
    assert leaks(gateway.stderr()) == []


class Collecting(logging.Handler):
    """Keeps the records it gets."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def test_direct_access_line_is_the_line_the_record_would_give(
    logged_gateway: Client,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    restore_root_logger: None,
) -> None:
    """With only setup_logging's handler, access lines skip the LogRecord: same text."""
    setup_logging("info")
    root = logging.getLogger()
    made: list[logging.LogRecord] = []
    make_record = logging.Logger.makeRecord

    def counting(self: logging.Logger, *args: Any, **kwargs: Any) -> logging.LogRecord:
        made.append(make_record(self, *args, **kwargs))
        return made[-1]

    monkeypatch.setattr(logging.Logger, "makeRecord", counting)
    headers = {"x-api-key": KEY_A, "X-Request-Id": "req-direct", "Content-Type": "text/json"}
    response = await logged_gateway.post(TASK_LIST, data=b"{}", headers=headers)
    assert response.status == 200
    await response.read()
    direct = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    [line] = [x for x in direct if x["logger"] == "aiohttp.access" and "duration_ms" in x]
    assert not [r for r in made if "duration_ms" in r.__dict__]  # no record was built

    spy = Collecting()  # a second handler: records are needed again
    root.addHandler(spy)
    headers["X-Request-Id"] = "req-record"
    response = await logged_gateway.post(TASK_LIST, data=b"{}", headers=headers)
    await response.read()
    via_record = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    [other] = [x for x in via_record if x["logger"] == "aiohttp.access" and "duration_ms" in x]
    assert [r.__dict__["request_id"] for r in spy.records if "duration_ms" in r.__dict__] == [
        "req-record"
    ]

    assert list(line) == list(other)  # the same fields in the same order
    for varying in ("time", "request_id", "duration_ms"):
        line.pop(varying), other.pop(varying)
    assert line == other
    assert line["message"] == f"POST {TASK_LIST} 200" and line["level"] == "info"


class BrokenPipe(io.StringIO):
    """A stdout whose reader went away."""

    def write(self, text: str) -> int:
        raise BrokenPipeError("reader gone")


async def test_an_unwritable_stdout_costs_the_line_not_the_request(
    logged_gateway: Client,
    capsys: pytest.CaptureFixture[str],
    restore_root_logger: None,
) -> None:
    setup_logging("info")
    [handler] = logging.getLogger().handlers
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(BrokenPipe())
    server_errors = Collecting()  # aiohttp reports a failing access logger here
    logging.getLogger("aiohttp.server").addHandler(server_errors)
    try:
        for n in range(2):  # the second on the same keep-alive connection
            headers = {"x-api-key": KEY_A, "X-Request-Id": f"req-pipe-{n}"}
            response = await logged_gateway.post(TASK_LIST, data=b"{}", headers=headers)
            assert response.status == 200
            assert json.loads(await response.read())["code"] == 0
    finally:
        logging.getLogger("aiohttp.server").removeHandler(server_errors)
    assert [r.getMessage() for r in server_errors.records] == []
    # The direct path gave up and the record path reported it the way logging does.
    assert capsys.readouterr().err.count("--- Logging error ---") >= 2
