"""Forwarding end to end: signature, exact bodies, headers, confinement, streaming, failures."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gzip
import hashlib
import io
import json
import logging
import re
import socket
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from proxy.errors import RequestError
from proxy.forwarding import build_upstream_url
from proxy.signing import compute_sign
from proxy.tenants import Credentials
from tests.conftest import (
    CREDS_A,
    CREDS_B,
    KEY_A,
    KEY_B,
    Client,
    MakeGateway,
    MakeUpstream,
    Upstream,
    make_tenant,
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
StartPair = Callable[..., Awaitable[tuple[Upstream, Client]]]

TASK_LIST: Final = "/openapi/aiagent/task/list"
ECHO: Final = "/openapi/test/echo"
ECHO_ACTION: Final = "testEcho"
JSON_TYPE: Final = {"Content-Type": "application/json"}
CHUNK: Final = 64 * 1024


@dataclass(frozen=True, slots=True)
class RawAnswer:
    """An HTTP answer read off a raw socket."""

    status: int
    head: bytes
    payload: bytes

    def json(self) -> Any:
        return json.loads(self.payload)


async def raw_exchange(client: Client, head: str, body: bytes = b"") -> RawAnswer:
    """Send a request line and headers byte for byte (no client-side URL normalisation)."""
    assert client.port is not None
    async with asyncio.timeout(10):
        reader, writer = await asyncio.open_connection(client.host, client.port)
        try:
            writer.write(head.encode() + b"\r\nConnection: close\r\n\r\n" + body)
            await writer.drain()
            data = await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
    head_bytes, _, payload = data.partition(b"\r\n\r\n")
    return RawAnswer(int(head_bytes.split(b" ", 2)[1]), head_bytes, payload)


async def echo(request: web.Request) -> web.Response:
    """A test-only upstream route answering like nxlink; the recorder keeps what it got."""
    return web.json_response({"code": 0, "message": "success", "data": None})


def pattern_chunks(total: int) -> Iterator[bytes]:
    """Deterministic, non-repeating bytes in ``CHUNK``-sized pieces."""
    sent, index = 0, 0
    while sent < total:
        block = hashlib.sha256(index.to_bytes(8, "big")).digest() * (CHUNK // 32)
        piece = block[: total - sent]
        sent, index = sent + len(piece), index + 1
        yield piece


async def stream_pattern(request: web.Request) -> web.StreamResponse:
    """A large answer produced chunk by chunk, never held in memory whole."""
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    await response.prepare(request)
    for piece in pattern_chunks(int(request.query["size"])):
        await response.write(piece)
    await response.write_eof()
    return response


def tenants_on(upstream: Upstream, base_url: str | None = None) -> list[Any]:
    """Tenants A (md5) and B (sha256) pointed at ``upstream``."""
    url = base_url or upstream.base_url
    return [
        make_tenant("tenant-a", KEY_A, url, CREDS_A),
        make_tenant("tenant-b", KEY_B, url, CREDS_B),
    ]


@pytest.fixture
def start(make_upstream: MakeUpstream, make_gateway: MakeGateway) -> StartPair:
    """Start an upstream with extra routes and a gateway for tenants A and B in front of it."""

    async def go(extra: Mapping[str, Handler] | None = None, **env: Any) -> tuple[Upstream, Client]:
        upstream = await make_upstream(extra={ECHO: echo, **(extra or {})})
        return upstream, await make_gateway(tenants_on(upstream), **env)

    return go


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A loopback port that is bound but not listening, so connecting is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def headers_for(key: str, **extra: str) -> dict[str, str]:
    return {"x-api-key": key, **JSON_TYPE, **extra}


# --- signature and exact bodies -------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "creds"), [(KEY_A, CREDS_A), (KEY_B, CREDS_B)], ids=["md5", "sha256"]
)
async def test_forward_is_signed_for_the_callers_tenant_and_accepted_by_nxlink(
    gateway: Client, upstream: Upstream, key: str, creds: Credentials
) -> None:
    body = b'{"pageNumber": 1}'
    resp = await gateway.post(TASK_LIST, data=body, headers=headers_for(key))
    answer = await resp.json()
    assert resp.status == 200
    assert answer["code"] == 0, answer
    [got] = upstream.received
    ts = int(got.headers["ts"])
    assert abs(ts - time.time() * 1000) < 5000
    assert got.headers["accessKey"] == creds.access_key
    assert got.headers["bizType"] == creds.biz_type
    assert got.headers["action"] == "pageCallTaskInfo"
    assert got.headers["algorithm"] == creds.algorithm
    assert got.headers["sign"] == compute_sign(creds, "pageCallTaskInfo", ts, body)


@pytest.mark.parametrize(
    ("key", "creds"), [(KEY_A, CREDS_A), (KEY_B, CREDS_B)], ids=["md5", "sha256"]
)
async def test_forward_sign_matches_a_hand_built_string_to_sign(
    gateway: Client, upstream: Upstream, key: str, creds: Credentials
) -> None:
    await gateway.post(TASK_LIST, data='{"x":"中"}'.encode(), headers=headers_for(key))
    [got] = upstream.received
    plain = (
        f"accessKey={creds.access_key}&action=pageCallTaskInfo&bizType={creds.biz_type}"
        f'&ts={got.headers["ts"]}&body={{"x":"中"}}&accessSecret={creds.access_secret.reveal()}'
    )
    expected = hashlib.new(creds.algorithm, plain.encode()).hexdigest()
    assert got.headers["sign"] == expected


@pytest.mark.parametrize(
    "body",
    [
        '{"b":1,  "a":2}',
        '{"taskId": "中文任务", "name": "张三"}',
        '{\n\t"pageNumber" :  1 ,\r\n "pageSize":2}',
        '{"escaped": "\\u4e2d", "float": 1.50, "big": 12345678901234567890}',
        '  {"padded": true}  ',
    ],
    ids=["key-order", "non-ascii", "odd-spacing", "escapes-and-numbers", "padding"],
)
async def test_forward_keeps_the_body_byte_for_byte_and_signs_it_as_received(
    gateway: Client, upstream: Upstream, body: str
) -> None:
    resp = await gateway.post(TASK_LIST, data=body.encode(), headers=headers_for(KEY_A))
    answer = await resp.json()
    assert answer["code"] == 0, answer
    [got] = upstream.received
    assert got.body == body.encode()
    assert got.headers["sign"] == compute_sign(
        CREDS_A, "pageCallTaskInfo", int(got.headers["ts"]), body.encode()
    )


async def test_signed_body_larger_than_a_mebibyte_is_forwarded_and_verified(
    gateway: Client, upstream: Upstream
) -> None:
    body = json.dumps({"pad": "数据" * 700_000}, ensure_ascii=False).encode()
    assert len(body) > 4 * 1024 * 1024
    resp = await gateway.post(TASK_LIST, data=io.BytesIO(body), headers=headers_for(KEY_A))
    answer = await resp.json()
    assert answer["code"] == 0, answer
    assert upstream.received[0].body == body


async def test_forward_without_body_signs_without_a_body_part(
    gateway: Client, upstream: Upstream
) -> None:
    resp = await gateway.post(TASK_LIST, headers={"x-api-key": KEY_A})
    answer = await resp.json()
    assert answer["code"] == 0, answer
    [got] = upstream.received
    assert got.body == b""
    assert got.headers["sign"] == compute_sign(
        CREDS_A, "pageCallTaskInfo", int(got.headers["ts"]), None
    )


async def test_two_tenants_on_two_upstreams_never_cross(
    make_upstream: MakeUpstream, make_gateway: MakeGateway
) -> None:
    upstream_a = await make_upstream([CREDS_A])
    upstream_b = await make_upstream([CREDS_B])
    gateway = await make_gateway(
        [
            make_tenant("tenant-a", KEY_A, upstream_a.base_url, CREDS_A),
            make_tenant("tenant-b", KEY_B, upstream_b.base_url, CREDS_B),
        ]
    )
    append = {"taskId": "t-1", "list": [{"phoneNumber": "13800000001", "contactId": "c-1"}]}
    for key in (KEY_A, KEY_B, KEY_A):
        resp = await gateway.post(
            "/openapi/aiagent/call/append", data=json.dumps(append), headers=headers_for(key)
        )
        assert (await resp.json())["code"] == 0
    assert {r.headers["accessKey"] for r in upstream_a.received} == {"ak-tenant-a"}
    assert {r.headers["accessKey"] for r in upstream_b.received} == {"ak-tenant-b"}
    assert (len(upstream_a.received), len(upstream_b.received)) == (2, 1)


# --- action -----------------------------------------------------------------------------------


async def test_path_without_known_action_is_unknown_action(
    gateway: Client, upstream: Upstream
) -> None:
    resp = await gateway.post("/openapi/not/a/known/op", data=b"{}", headers=headers_for(KEY_A))
    answer = await resp.json()
    assert (resp.status, answer["code"], answer["error"]) == (400, 400, "UNKNOWN_ACTION")
    assert upstream.received == []


async def test_client_action_header_wins_over_the_table(
    gateway: Client, upstream: Upstream
) -> None:
    resp = await gateway.post(
        TASK_LIST, data=b"{}", headers=headers_for(KEY_A, action="pageCallRecords")
    )
    answer = await resp.json()
    [got] = upstream.received
    assert got.headers.getall("action") == ["pageCallRecords"]
    # The sandbox checks the signature first, then refuses the action for this path.
    assert answer["code"] == 1002
    assert "pageCallTaskInfo" in answer["message"]


@pytest.mark.parametrize("action", ["call Append", "x" * 80, "1abc", "a/b"])
async def test_malformed_action_header_is_refused(
    gateway: Client, upstream: Upstream, action: str
) -> None:
    resp = await gateway.post(TASK_LIST, data=b"{}", headers=headers_for(KEY_A, action=action))
    answer = await resp.json()
    assert (resp.status, answer["code"], answer["error"]) == (400, 400, "INVALID_ACTION")
    assert upstream.received == []


async def test_configured_actions_extend_the_table(start: StartPair) -> None:
    upstream, gateway = await start(OPENAPI_ACTIONS=f"{ECHO}={ECHO_ACTION}")
    resp = await gateway.post(ECHO, data=b"{}", headers=headers_for(KEY_A))
    assert resp.status == 200
    assert upstream.received[0].headers["action"] == ECHO_ACTION


# --- request bodies ---------------------------------------------------------------------------


async def test_body_that_is_not_utf8_is_invalid_encoding(
    gateway: Client, upstream: Upstream
) -> None:
    resp = await gateway.post(TASK_LIST, data=b'{"a": "\xff\xfe"}', headers=headers_for(KEY_A))
    answer = await resp.json()
    assert (resp.status, answer["code"], answer["error"]) == (400, 400, "INVALID_ENCODING")
    assert upstream.received == []


async def chunked(data: bytes, size: int = 64) -> AsyncIterator[bytes]:
    """``data`` as a chunked body (no Content-Length)."""
    for start in range(0, len(data), size):
        yield data[start : start + size]


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_body_over_max_body_bytes_is_413(start: StartPair, framing: str) -> None:
    upstream, gateway = await start(MAX_BODY_BYTES=100)
    body = b'{"pad": "' + b"x" * 200 + b'"}'
    data: Any = body if framing == "content-length" else chunked(body)
    resp = await gateway.post(TASK_LIST, data=data, headers=headers_for(KEY_A))
    answer = await resp.json()
    assert (resp.status, answer["code"], answer["error"]) == (413, 413, "PAYLOAD_TOO_LARGE")
    assert upstream.received == []


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_body_of_exactly_max_body_bytes_is_forwarded(start: StartPair, framing: str) -> None:
    upstream, gateway = await start(MAX_BODY_BYTES=100)
    body = b'{"pad": "' + b"x" * 89 + b'"}'
    assert len(body) == 100
    data: Any = body if framing == "content-length" else chunked(body)
    resp = await gateway.post(TASK_LIST, data=data, headers=headers_for(KEY_A))
    assert (await resp.json())["code"] == 0
    assert upstream.received[0].body == body


# --- header policy ----------------------------------------------------------------------------

STRIPPED_REQUEST_HEADERS: Final = {
    "Authorization": "Basic dXNlcjpwYXNz",
    "Cookie": "session=abc",
    "accessKey": "client-chosen-ak",
    "accessSecret": "client-chosen-secret",
    "ts": "1",
    "sign": "deadbeef",
    "bizType": "77",
    "algorithm": "sha1",
    "Forwarded": "for=10.0.0.1;host=evil.example",
    "X-Forwarded-For": "10.0.0.1",
    "X-Forwarded-Host": "evil.example",
    "X-Forwarded-Proto": "http",
    "Keep-Alive": "timeout=5",
    "TE": "trailers",
    "Upgrade": "h2c",
    "Proxy-Authorization": "Basic eDp5",
    "Proxy-Connection": "keep-alive",
    "Connection": "keep-alive, X-Hop-Secret",
    "X-Hop-Secret": "named-in-connection",
}


async def test_forward_strips_credentials_forwarding_and_hop_by_hop_headers(
    start: StartPair,
) -> None:
    upstream, gateway = await start()
    headers = {**headers_for(KEY_A, action=ECHO_ACTION), **STRIPPED_REQUEST_HEADERS}
    resp = await gateway.post(ECHO, data=b"{}", headers=headers)
    assert resp.status == 200
    got = upstream.received[0].headers
    assert "x-api-key" not in got
    assert got.getall("accessKey") == [CREDS_A.access_key]
    assert got.getall("bizType") == [CREDS_A.biz_type]
    assert got.getall("algorithm") == [CREDS_A.algorithm]
    assert got["ts"] != "1" and got["sign"] != "deadbeef"
    for name in STRIPPED_REQUEST_HEADERS:
        if name not in {"accessKey", "ts", "sign", "bizType", "algorithm", "Connection"}:
            assert name not in got, name
    assert "X-Hop-Secret" not in got.get("Connection", "")
    assert not any(k.lower().startswith("x-forwarded-") for k in got)


@pytest.mark.parametrize(
    "name", ["ACCESSKEY", "Sign", "TS", "BizType", "AUTHORIZATION", "x-forwarded-for"]
)
async def test_forward_strips_client_credentials_whatever_their_case(
    start: StartPair, name: str
) -> None:
    upstream, gateway = await start()
    headers = {**headers_for(KEY_A, action=ECHO_ACTION), name: "client-value"}
    await gateway.post(ECHO, data=b"{}", headers=headers)
    got = upstream.received[0].headers
    assert "client-value" not in got.getall(name, [])


async def test_forward_strips_bearer_authorization(start: StartPair) -> None:
    upstream, gateway = await start()
    headers = {"Authorization": f"Bearer {KEY_A}", "action": ECHO_ACTION}
    resp = await gateway.post(ECHO, data=b"{}", headers=headers)
    assert resp.status == 200
    assert "Authorization" not in upstream.received[0].headers


async def test_forward_passes_end_to_end_headers_and_sets_the_upstream_host(
    start: StartPair,
) -> None:
    upstream, gateway = await start()
    passed = {
        "X-Custom": "kept as is",
        "Accept-Language": "zh-CN,zh;q=0.9",
        "Accept": "application/json",
        "Cache-Control": "no-cache",
        "User-Agent": "tenant-client/1.0",
    }
    headers = {**headers_for(KEY_A, action=ECHO_ACTION), **passed, "Host": "evil.example"}
    await gateway.post(ECHO, data=b"{}", headers=headers)
    got = upstream.received[0].headers
    for name, value in {**passed, **JSON_TYPE}.items():
        assert got.getall(name) == [value], name
    assert got["Host"] == f"127.0.0.1:{upstream.server.port}"


async def test_forward_invents_no_accept_encoding_or_user_agent(start: StartPair) -> None:
    upstream, gateway = await start()
    resp = await gateway.post(
        ECHO,
        data=b"{}",
        headers=headers_for(KEY_A, action=ECHO_ACTION),
        skip_auto_headers=["Accept-Encoding", "User-Agent", "Accept"],
    )
    assert resp.status == 200
    got = upstream.received[0].headers
    assert "Accept-Encoding" not in got
    assert "User-Agent" not in got
    assert "Accept" not in got


async def test_forward_passes_the_clients_accept_encoding(start: StartPair) -> None:
    upstream, gateway = await start()
    headers = headers_for(KEY_A, action=ECHO_ACTION, **{"Accept-Encoding": "br"})
    await gateway.post(ECHO, data=b"{}", headers=headers)
    assert upstream.received[0].headers.getall("Accept-Encoding") == ["br"]


async def test_forward_sends_the_request_id_to_upstream(start: StartPair) -> None:
    upstream, gateway = await start()
    headers = headers_for(KEY_A, action=ECHO_ACTION, **{"X-Request-Id": "trace-42.a:b_c"})
    resp = await gateway.post(ECHO, data=b"{}", headers=headers)
    assert resp.headers["X-Request-Id"] == "trace-42.a:b_c"
    assert upstream.received[0].headers.getall("X-Request-Id") == ["trace-42.a:b_c"]


async def upstream_with_odd_headers(request: web.Request) -> web.Response:
    headers = CIMultiDict(
        [
            ("X-Upstream", "one"),
            ("X-Upstream", "two"),
            ("Set-Cookie", "session=upstream"),
            ("Keep-Alive", "timeout=9"),
            ("Proxy-Authenticate", "Basic"),
            ("Connection", "X-Hop-Resp"),
            ("X-Hop-Resp", "hop"),
            ("X-Request-Id", "upstream-own-id"),
            ("Content-Type", "text/plain; charset=utf-8"),
        ]
    )
    return web.Response(status=299, reason="Odd But Fine", body=b"teapot", headers=headers)


async def test_response_keeps_status_reason_and_end_to_end_headers_but_drops_hop_by_hop(
    start: StartPair,
) -> None:
    _, gateway = await start({"/openapi/test/odd": upstream_with_odd_headers})
    resp = await gateway.get(
        "/openapi/test/odd", headers={"x-api-key": KEY_A, "action": "odd", "X-Request-Id": "rid-1"}
    )
    assert (resp.status, resp.reason) == (299, "Odd But Fine")
    assert await resp.read() == b"teapot"
    assert resp.headers.getall("X-Upstream") == ["one", "two"]
    assert resp.headers["Content-Type"] == "text/plain; charset=utf-8"
    for name in ("Set-Cookie", "Keep-Alive", "Proxy-Authenticate", "X-Hop-Resp"):
        assert name not in resp.headers, name
    assert resp.headers.getall("X-Request-Id") == ["rid-1"]


GZIPPED: Final = gzip.compress('{"code":0,"data":"压缩的回答"}'.encode() * 50, mtime=0)


async def gzipped(request: web.Request) -> web.Response:
    return web.Response(
        body=GZIPPED, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}
    )


async def test_encoded_response_passes_through_byte_identical(start: StartPair) -> None:
    _, gateway = await start({"/openapi/test/gzip": gzipped})
    headers = {"x-api-key": KEY_A, "action": "gz", "Accept-Encoding": "gzip"}
    async with (
        aiohttp.ClientSession(auto_decompress=False) as session,
        session.get(gateway.make_url("/openapi/test/gzip"), headers=headers) as resp,
    ):
        raw = await resp.read()
        assert resp.status == 200
        assert resp.headers["Content-Encoding"] == "gzip"
    assert raw == GZIPPED


async def test_upstream_error_answer_passes_through_unchanged(start: StartPair) -> None:
    async def broken(request: web.Request) -> web.Response:
        return web.Response(status=503, body=b"nxlink maintenance", content_type="text/plain")

    _, gateway = await start({"/openapi/test/broken": broken})
    resp = await gateway.post("/openapi/test/broken", headers={"x-api-key": KEY_A, "action": "b"})
    assert resp.status == 503
    assert await resp.read() == b"nxlink maintenance"


@pytest.mark.parametrize("method", ["GET", "PUT", "PATCH", "DELETE", "POST"])
async def test_forward_keeps_the_method(start: StartPair, method: str) -> None:
    upstream, gateway = await start()
    resp = await gateway.request(method, ECHO, headers={"x-api-key": KEY_A, "action": "m"})
    assert resp.status == 200
    assert upstream.received[0].method == method


# --- URL confinement --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        "/openapi/../admin",
        "/openapi/aiagent/../../secret",
        "/openapi/aiagent/task/list/../../../../etc/passwd",
        "/openapi/%2e%2e/secret",
        "/openapi/%2E%2e/",
        "/openapi/aiagent/%2E%2E/%2e%2e/x",
        "/openapi/./aiagent/task/list",
        "/openapi/a%2fb",
        "/openapi/a%2F..%2F..%2Fx",
        "/openapi/a%5cb",
        "/openapi/a%5C..%5C..%5Cx",
        "/openapi/a\\..\\x",
        "/openapi//evil.com/x",
        "//evil.com/openapi/x",
        "/openapi/%00/x",
        "/openapi/a%3fb",
        "/openapi/a%23b",
        "/openapi/..;/admin",
        "/openapi/aiagent/..;x/..;y/secret",
        "/openapi/%2e%2e%3b/admin",
        "/openapi/%252e%252e/secret",
        "/openapi/a%252fb",
        "/openapi/%25252e%25252e/x",
    ],
)
async def test_path_that_could_escape_the_base_url_is_refused(
    gateway: Client, upstream: Upstream, target: str
) -> None:
    answer = await raw_exchange(
        gateway, f"POST {target} HTTP/1.1\r\nHost: gw\r\nx-api-key: {KEY_A}\r\naction: x"
    )
    assert answer.status in (400, 404), answer
    envelope = answer.json()
    assert envelope["code"] == answer.status
    assert envelope["error"]
    assert upstream.received == []


@pytest.mark.parametrize(
    "target",
    [
        "/openapi//aiagent/task/list",
        "/openapi/../api/openapi/keys",
        "/openapi/%2e%2e/api/openapi/keys",
        "/openapi/aiagent/./task/list",
        "/openapi/aiagent%2ftask/list",
    ],
)
async def test_an_escaping_path_is_invalid_path_before_any_action_lookup(
    gateway: Client, upstream: Upstream, target: str
) -> None:
    # No action header: the path's check must come first, not "send the nxlink action name".
    answer = await raw_exchange(
        gateway, f"POST {target} HTTP/1.1\r\nHost: gw\r\nx-api-key: {KEY_A}"
    )
    assert (answer.status, answer.json()["error"]) == (400, "INVALID_PATH"), answer
    assert upstream.received == []


PREFIXED_BASE: Final = "http://nxlink.test:8080/prefix"


@pytest.mark.parametrize(
    "raw_path",
    [
        "/openapi/..",
        "/openapi/%2e%2e/x",
        "/openapi/%2E%2e",
        "/openapi/.%2e/x",
        "/openapi/a/./b",
        "/openapi//evil.com/x",
        "/openapi/a%2fb",
        "/openapi/a%5cb",
        "/openapi/a\\b",
        "/openapi/a%00b",
        "/openapi/a%3Fb",
        "/openapi/a%23b",
        "/openapi/%252e%252e/x",
        "/openapi/%25%32%65%25%32%65/x",
        "/openapi/a%255cb",
        "/openapi/%2525252e",
        "/openapi/",
        "//evil.com/openapi/x",
        "http://evil.com/openapi/x",
        "/api/openapi/status",
    ],
)
def test_build_upstream_url_refuses_paths_that_could_leave_the_base(raw_path: str) -> None:
    with pytest.raises(RequestError):
        build_upstream_url(PREFIXED_BASE, raw_path, "")


@pytest.mark.parametrize(
    ("raw_path", "raw_query", "expected"),
    [
        ("/openapi/a/b", "", f"{PREFIXED_BASE}/openapi/a/b"),
        ("/openapi/a%20b/c", "x=%zz&y=a+b", f"{PREFIXED_BASE}/openapi/a%20b/c?x=%zz&y=a+b"),
        ("/openapi/@evil.com", "", f"{PREFIXED_BASE}/openapi/@evil.com"),
        ("/openapi/...", "", f"{PREFIXED_BASE}/openapi/..."),
    ],
)
def test_build_upstream_url_keeps_the_prefix_and_the_raw_query(
    raw_path: str, raw_query: str, expected: str
) -> None:
    url = build_upstream_url(PREFIXED_BASE, raw_path, raw_query)
    assert (str(url), url.host, url.port) == (expected, "nxlink.test", 8080)


@pytest.mark.parametrize(
    "target",
    [
        "http://evil.example/openapi/aiagent/task/list",
        f"http://127.0.0.1:1{TASK_LIST}",
        "https://evil.example:443/openapi/x",
    ],
)
async def test_absolute_form_target_is_refused(
    gateway: Client, upstream: Upstream, target: str
) -> None:
    answer = await raw_exchange(
        gateway, f"POST {target} HTTP/1.1\r\nHost: evil.example\r\nx-api-key: {KEY_A}"
    )
    assert answer.status in (400, 404), answer
    assert answer.json()["code"] == answer.status
    assert upstream.received == []


async def test_base_url_path_prefix_is_kept(
    make_upstream: MakeUpstream, make_gateway: MakeGateway
) -> None:
    upstream = await make_upstream(extra={"/prefix/openapi/test/echo": echo})
    gateway = await make_gateway(tenants_on(upstream, upstream.base_url + "/prefix"))
    resp = await gateway.post(ECHO, data=b"{}", headers=headers_for(KEY_A, action=ECHO_ACTION))
    assert resp.status == 200
    assert [r.path for r in upstream.received] == ["/prefix/openapi/test/echo"]


async def test_dot_segments_cannot_climb_out_of_a_base_url_prefix(
    make_upstream: MakeUpstream, make_gateway: MakeGateway
) -> None:
    upstream = await make_upstream(extra={"/openapi/test/echo": echo})
    gateway = await make_gateway(tenants_on(upstream, upstream.base_url + "/prefix"))
    answer = await raw_exchange(
        gateway,
        f"POST /openapi/%2e%2e/openapi/test/echo HTTP/1.1\r\nHost: gw\r\nx-api-key: {KEY_A}",
    )
    assert answer.status in (400, 404)
    assert upstream.received == []


@pytest.mark.parametrize(
    "query",
    [
        "a=1&b=2",
        "q=%E4%B8%AD%E6%96%87&slash=%2F&qm=%3F&amp=%26",
        "plus=a+b&space=a%20b",
        "flag&empty=&=v",
        "dup=1&dup=2&DUP=3",
        "pct=%25&bad=%zz&lower=%2f",
        "semi=a;b&star=*&tilde=~&comma=,&colon=:&at=@",
    ],
)
async def test_query_string_is_forwarded_verbatim(start: StartPair, query: str) -> None:
    upstream, gateway = await start()
    url = URL(f"{gateway.make_url(ECHO)}?{query}", encoded=True)
    async with gateway.session.post(
        url, data=b"{}", headers=headers_for(KEY_A, action=ECHO_ACTION)
    ) as resp:
        assert resp.status == 200
    [got] = upstream.received
    assert (got.path, got.query) == (ECHO, query)


# --- streaming --------------------------------------------------------------------------------

UPLOAD: Final = "/openapi/test/upload"
BOUNDARY: Final = "gw-test-boundary-7f3a"


def multipart_body(payload: bytes) -> bytes:
    """A two-part form: a text field and a file."""
    return (
        (
            f"--{BOUNDARY}\r\n"
            'Content-Disposition: form-data; name="note"\r\n\r\n'
            "上传说明\r\n"
            f"--{BOUNDARY}\r\n"
            'Content-Disposition: form-data; name="file"; filename="numbers.csv"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + payload
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


def upload_sink(completed: list[dict[str, Any]]) -> Handler:
    """An upstream route that reads a multipart upload as a stream and reports what it got."""

    async def sink(request: web.Request) -> web.Response:
        parts: dict[str, Any] = {}
        async for part in await request.multipart():
            assert isinstance(part, aiohttp.BodyPartReader)
            digest, size = hashlib.sha256(), 0
            while chunk := await part.read_chunk():
                digest.update(chunk)
                size += len(chunk)
            parts[part.name or ""] = {"size": size, "sha256": digest.hexdigest()}
        completed.append(parts)
        return web.json_response({"code": 0, "data": parts})

    return sink


MULTIPART_TYPE: Final = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_multipart_upload_is_streamed_and_signed_without_its_body(
    start: StartPair, framing: str
) -> None:
    completed: list[dict[str, Any]] = []
    upstream, gateway = await start({UPLOAD: upload_sink(completed)}, MAX_BODY_BYTES=1024)
    payload = b"".join(pattern_chunks(3 * 1024 * 1024 + 17))
    body = multipart_body(payload)
    data: Any = io.BytesIO(body) if framing == "content-length" else chunked(body, CHUNK)
    headers = {"x-api-key": KEY_A, "action": "fileUpload", **MULTIPART_TYPE}
    resp = await gateway.post(UPLOAD, data=data, headers=headers)
    answer = await resp.json()
    assert resp.status == 200, answer
    assert answer["data"]["file"] == {
        "size": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
    }
    assert answer["data"]["note"]["size"] == len("上传说明".encode())
    got = upstream.received[0].headers
    assert got["Content-Type"] == MULTIPART_TYPE["Content-Type"]
    assert got["sign"] == compute_sign(CREDS_A, "fileUpload", int(got["ts"]), None, multipart=True)


@pytest.mark.slow
async def test_large_multipart_upload_arrives_whole(start: StartPair) -> None:
    size = 64 * 1024 * 1024 + 7
    head, _, tail = multipart_body(b"\0").partition(b"\0")

    async def body() -> AsyncIterator[bytes]:
        yield head
        for piece in pattern_chunks(size):
            yield piece
        yield tail

    expected = hashlib.sha256()
    for piece in pattern_chunks(size):
        expected.update(piece)
    completed: list[dict[str, Any]] = []
    _, gateway = await start({UPLOAD: upload_sink(completed)})
    headers = {"x-api-key": KEY_A, "action": "fileUpload", **MULTIPART_TYPE}
    resp = await gateway.post(UPLOAD, data=body(), headers=headers)
    answer = await resp.json()
    assert answer["data"]["file"] == {"size": size, "sha256": expected.hexdigest()}


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_multipart_upload_past_max_upload_bytes_is_413(
    start: StartPair, framing: str
) -> None:
    completed: list[dict[str, Any]] = []
    _, gateway = await start({UPLOAD: upload_sink(completed)}, MAX_UPLOAD_BYTES=64 * 1024)
    body = multipart_body(b"".join(pattern_chunks(256 * 1024)))
    data: Any = body if framing == "content-length" else chunked(body, 8 * 1024)
    headers = {"x-api-key": KEY_A, "action": "fileUpload", **MULTIPART_TYPE}
    resp = await gateway.post(UPLOAD, data=data, headers=headers)
    answer = await resp.json()
    assert (resp.status, answer["code"], answer["error"]) == (413, 413, "PAYLOAD_TOO_LARGE")
    assert completed == []


@pytest.mark.parametrize(
    "size",
    [
        0,
        1,
        CHUNK + 1,
        4 * 1024 * 1024 + 3,
        pytest.param(80 * 1024 * 1024 + 5, marks=pytest.mark.slow, id="80MiB"),
    ],
)
async def test_large_streamed_response_arrives_complete_and_identical(
    start: StartPair, size: int
) -> None:
    _, gateway = await start({"/openapi/test/big": stream_pattern})
    expected = hashlib.sha256()
    for piece in pattern_chunks(size):
        expected.update(piece)
    resp = await gateway.get(
        f"/openapi/test/big?size={size}", headers={"x-api-key": KEY_A, "action": "big"}
    )
    assert resp.status == 200
    received, count = hashlib.sha256(), 0
    async for chunk in resp.content.iter_chunked(CHUNK):
        received.update(chunk)
        count += len(chunk)
    assert count == size
    assert received.hexdigest() == expected.hexdigest()


def cut_stream(*, declared_length: bool, sent: int) -> Handler:
    """An upstream route that starts an answer and drops the connection part-way."""

    async def cut(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        if declared_length:
            response.content_length = 1_000_000
        await response.prepare(request)
        if sent:
            await response.write(b"x" * sent)
        assert request.transport is not None
        request.transport.close()
        return response

    return cut


@pytest.mark.parametrize("declared_length", [True, False], ids=["content-length", "chunked"])
@pytest.mark.parametrize("sent", [0, 100_000])
async def test_upstream_cutting_the_stream_breaks_the_clients_response(
    start: StartPair, declared_length: bool, sent: int
) -> None:
    route = {"/openapi/test/cut": cut_stream(declared_length=declared_length, sent=sent)}
    _, gateway = await start(route)
    resp = await gateway.get("/openapi/test/cut", headers={"x-api-key": KEY_A, "action": "cut"})
    assert resp.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()


# --- upstream failures ------------------------------------------------------------------------


async def test_upstream_down_is_502_quickly(make_gateway: MakeGateway, refused_port: int) -> None:
    gateway = await make_gateway(
        [make_tenant("tenant-a", KEY_A, f"http://127.0.0.1:{refused_port}", CREDS_A)]
    )
    started = time.monotonic()
    resp = await gateway.post(TASK_LIST, data=b"{}", headers=headers_for(KEY_A))
    answer = await resp.json()
    assert (resp.status, answer["code"], answer["error"]) == (502, 502, "UPSTREAM_UNAVAILABLE")
    assert time.monotonic() - started < 3
    assert KEY_A not in json.dumps(answer)


async def test_upstream_slower_than_upstream_timeout_is_504(start: StartPair) -> None:
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await release.wait()
        return web.json_response({"code": 0})

    _, gateway = await start({"/openapi/test/slow": slow}, UPSTREAM_TIMEOUT=0.3)
    started = time.monotonic()
    try:
        resp = await gateway.post("/openapi/test/slow", headers={"x-api-key": KEY_A, "action": "s"})
        answer = await resp.json()
    finally:
        release.set()
    assert (resp.status, answer["code"], answer["error"]) == (504, 504, "UPSTREAM_TIMEOUT")
    assert set(answer) == {"code", "message", "error"}
    assert time.monotonic() - started < 3


async def test_upstream_hanging_up_before_answering_is_502(start: StartPair) -> None:
    async def hang_up(request: web.Request) -> web.Response:
        await request.read()
        assert request.transport is not None
        request.transport.close()
        return web.Response()

    upstream, gateway = await start({"/openapi/test/hang-up": hang_up})
    resp = await gateway.post(
        "/openapi/test/hang-up", data=b"{}", headers={"x-api-key": KEY_A, "action": "h"}
    )
    answer = await resp.json()
    assert (resp.status, answer["code"], answer["error"]) == (502, 502, "UPSTREAM_UNAVAILABLE")
    assert set(answer) == {"code", "message", "error"}
    assert [r.path for r in upstream.received] == ["/openapi/test/hang-up"]  # sent once


async def test_head_is_forwarded_and_answered_without_a_body(start: StartPair) -> None:
    upstream, gateway = await start()
    resp = await gateway.head(ECHO, headers={"x-api-key": KEY_A, "action": "h"})
    assert resp.status == 200
    assert await resp.read() == b""
    assert upstream.received[0].method == "HEAD"


async def test_expect_continue_upload_is_forwarded(start: StartPair) -> None:
    upstream, gateway = await start()
    resp = await gateway.post(
        ECHO, data=b'{"k": 1}', headers=headers_for(KEY_A, action="e"), expect100=True
    )
    assert resp.status == 200
    assert upstream.received[0].body == b'{"k": 1}'
    assert "Expect" not in upstream.received[0].headers


COMPRESSORS: Final[dict[str, Callable[[bytes], bytes]]] = {
    "gzip": gzip.compress,
    "deflate": zlib.compress,
}


@pytest.mark.parametrize("encoding", sorted(COMPRESSORS))
async def test_compressed_request_body_is_forwarded_decoded_and_signed_as_forwarded(
    gateway: Client, upstream: Upstream, encoding: str
) -> None:
    plain = '{"pageNumber": 1, "名": "值"}'.encode()
    headers = headers_for(KEY_A, **{"Content-Encoding": encoding})
    resp = await gateway.post(TASK_LIST, data=COMPRESSORS[encoding](plain), headers=headers)
    assert (await resp.json())["code"] == 0
    [got] = upstream.received
    assert (got.body, got.headers.get("Content-Encoding")) == (plain, None)


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_compressed_multipart_upload_is_streamed_decoded(
    start: StartPair, framing: str
) -> None:
    completed: list[dict[str, Any]] = []
    upstream, gateway = await start({UPLOAD: upload_sink(completed)})
    payload = b"".join(pattern_chunks(200_000))
    packed = gzip.compress(multipart_body(payload))
    data: Any = packed if framing == "content-length" else chunked(packed, 4096)
    headers = {"x-api-key": KEY_A, "action": "up", "Content-Encoding": "gzip", **MULTIPART_TYPE}
    resp = await gateway.post(UPLOAD, data=data, headers=headers)
    answer = await resp.json()
    assert resp.status == 200, answer
    assert answer["data"]["file"]["sha256"] == hashlib.sha256(payload).hexdigest()
    assert "Content-Encoding" not in upstream.received[0].headers


async def test_upload_reaches_upstream_before_the_client_finished_sending(
    start: StartPair,
) -> None:
    first_bytes_arrived = asyncio.Event()

    async def early_reader(request: web.Request) -> web.Response:
        first = await request.content.readany()
        first_bytes_arrived.set()
        rest = await request.content.read()
        return web.json_response({"code": 0, "size": len(first) + len(rest)})

    async def body() -> AsyncIterator[bytes]:
        yield b"--" + BOUNDARY.encode() + b"\r\n" + b"a" * 1000
        # Deadlocks (then times out) if the gateway buffered the upload before forwarding it.
        async with asyncio.timeout(5):
            await first_bytes_arrived.wait()
        yield b"b" * 1000

    _, gateway = await start({UPLOAD: early_reader})
    headers = {"x-api-key": KEY_A, "action": "up", **MULTIPART_TYPE}
    resp = await gateway.post(UPLOAD, data=body(), headers=headers)
    assert (await resp.json())["size"] == len(BOUNDARY) + 2 + 2 + 2000


async def test_response_reaches_the_client_before_upstream_finished_sending(
    start: StartPair,
) -> None:
    client_got_first = asyncio.Event()

    async def drip(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"first")
        # Deadlocks (then times out) if the gateway buffered the answer before passing it on.
        async with asyncio.timeout(5):
            await client_got_first.wait()
        await response.write(b"second")
        await response.write_eof()
        return response

    _, gateway = await start({"/openapi/test/drip": drip})
    resp = await gateway.get("/openapi/test/drip", headers={"x-api-key": KEY_A, "action": "d"})
    assert await resp.content.readexactly(5) == b"first"
    client_got_first.set()
    assert await resp.content.read() == b"second"


async def test_client_going_away_mid_stream_closes_the_upstream_connection(
    start: StartPair,
) -> None:
    upstream_done = asyncio.Event()
    written: list[int] = []

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        try:
            # Blocks on back-pressure once buffers fill, until the gateway hangs up.
            for _ in range(20_000):
                await response.write(b"z" * CHUNK)
                written.append(CHUNK)
        finally:
            upstream_done.set()
        return response

    _, gateway = await start({"/openapi/test/endless": endless})
    resp = await gateway.get("/openapi/test/endless", headers={"x-api-key": KEY_A, "action": "e"})
    assert len(await resp.content.readany()) > 0
    resp.close()
    async with asyncio.timeout(5):
        await upstream_done.wait()
    assert len(written) < 20_000


async def test_logs_never_show_a_key_or_secret(
    make_upstream: MakeUpstream,
    make_gateway: MakeGateway,
    refused_port: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    upstream = await make_upstream(
        extra={"/openapi/test/cut": cut_stream(declared_length=True, sent=10)}
    )
    gateway = await make_gateway(
        [
            make_tenant("tenant-a", KEY_A, upstream.base_url, CREDS_A),
            make_tenant("tenant-b", KEY_B, f"http://127.0.0.1:{refused_port}", CREDS_B),
        ]
    )
    await gateway.post(TASK_LIST, data=b"{}", headers=headers_for(KEY_A))
    await gateway.post(TASK_LIST, data=b"{}", headers=headers_for(KEY_B))
    await gateway.post(TASK_LIST, data=b"{}", headers=headers_for("wrong-key-0123456789"))
    cut = await gateway.get("/openapi/test/cut", headers=headers_for(KEY_A, action="c"))
    with pytest.raises(aiohttp.ClientPayloadError):
        await cut.read()
    assert caplog.records
    for secret in (KEY_A, KEY_B, "wrong-key-0123456789", "secret-a", "secret-b"):
        assert secret not in caplog.text, secret


SERVER_TIMING: Final = re.compile(r"gateway;dur=(\d+\.\d{2}), upstream;dur=(\d+\.\d{2})")


async def test_forwarded_answers_carry_the_gateway_and_upstream_time(start: StartPair) -> None:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(0.2)  # the upstream's own latency, which the header must show
        return web.json_response({"code": 0})

    _, gateway = await start({"/openapi/test/slow": slow})
    resp = await gateway.post("/openapi/test/slow", headers=headers_for(KEY_A, action="s"))
    found = SERVER_TIMING.fullmatch(resp.headers["Server-Timing"])
    assert found is not None, resp.headers["Server-Timing"]
    gateway_ms, upstream_ms = float(found.group(1)), float(found.group(2))
    assert upstream_ms >= 200
    assert gateway_ms < upstream_ms


async def test_a_stream_idle_longer_than_upstream_timeout_is_not_cut(start: StartPair) -> None:
    async def pausing(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"first-")
        await asyncio.sleep(1.0)  # longer than UPSTREAM_TIMEOUT: the headers came long ago
        await response.write(b"second")
        await response.write_eof()
        return response

    _, gateway = await start({"/openapi/test/pausing": pausing}, UPSTREAM_TIMEOUT=0.5)
    resp = await gateway.get("/openapi/test/pausing", headers={"x-api-key": KEY_A, "action": "p"})
    assert resp.status == 200
    assert await resp.read() == b"first-second"


async def test_a_wrong_key_with_undecodable_bytes_gets_the_403_envelope(gateway: Client) -> None:
    assert gateway.port is not None
    reader, writer = await asyncio.open_connection(gateway.host, gateway.port)
    try:
        writer.write(
            b"GET /api/openapi/status HTTP/1.1\r\nHost: gw\r\nx-api-key: \xffbad-key-0123"
            b"\r\nConnection: close\r\n\r\n"
        )
        await writer.drain()
        async with asyncio.timeout(10):
            data = await reader.read()
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    head, _, payload = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 403")
    assert json.loads(payload)["error"] == "INVALID_API_KEY"


async def test_two_tenants_with_one_alias_never_share_an_upstream_connection(
    make_upstream: MakeUpstream, make_gateway: MakeGateway
) -> None:
    async def peer_port(request: web.Request) -> web.Response:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        return web.json_response({"port": peer[1] if peer else None})

    upstream = await make_upstream(extra={"/openapi/test/peer": peer_port})
    first = make_tenant("same-alias", KEY_A, upstream.base_url, CREDS_A)
    second = make_tenant("same-alias", KEY_B, upstream.base_url, CREDS_B)
    second = dataclasses.replace(second, id="another-id")
    gateway = await make_gateway([first, second])

    async def port_of(key: str) -> int:
        headers = {"x-api-key": key, "action": "testPeer"}
        async with gateway.get("/openapi/test/peer", headers=headers) as response:
            assert response.status == 200
            return int((await response.json())["port"])

    a_port = await port_of(KEY_A)
    assert await port_of(KEY_A) == a_port  # kept alive and reused for the same tenant
    assert await port_of(KEY_B) != a_port  # never for another tenant, whatever its alias
