"""The middleware chain end to end: request id, the error envelope and API-key auth."""

from __future__ import annotations

import re
from typing import Any, Final

import pytest

from proxy.appkeys import STATE
from tests.conftest import (
    CREDS_A,
    KEY_A,
    KEY_B,
    KEY_NOCREDS,
    Client,
    MakeGateway,
    Upstream,
    make_tenant,
)

STATUS: Final = "/api/openapi/status"
TASK_LIST: Final = "/openapi/aiagent/task/list"
GENERATED_ID: Final = re.compile(r"[0-9a-f]{32}")
DIRECTORY: Final = [
    {"alias": "tenant-a", "description": "tenant-a description"},
    {"alias": "tenant-b", "description": "tenant-b description"},
    {"alias": "tenant-c", "description": "tenant-c description"},
]


async def envelope_of(resp: Any) -> dict[str, Any]:
    """The JSON error envelope, checked to carry the HTTP status as its code."""
    body: dict[str, Any] = await resp.json()
    assert body["code"] == resp.status
    assert isinstance(body["message"], str) and body["message"]
    assert resp.headers["Content-Type"].startswith("application/json")
    return body


# --- SPEC error rows --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "headers", "status", "error"),
    [
        ("GET", STATUS, {}, 401, "MISSING_API_KEY"),
        ("POST", TASK_LIST, {}, 401, "MISSING_API_KEY"),
        ("GET", STATUS, {"x-api-key": "   "}, 401, "MISSING_API_KEY"),
        ("GET", STATUS, {"Authorization": "Basic dXNlcjpwYXNz"}, 401, "MISSING_API_KEY"),
        ("GET", STATUS, {"Authorization": "Bearer"}, 401, "MISSING_API_KEY"),
        ("GET", STATUS, {"Authorization": KEY_A}, 401, "MISSING_API_KEY"),
        ("GET", STATUS, {"x-api-key": "wrong-key-0123456789"}, 403, "INVALID_API_KEY"),
        ("POST", TASK_LIST, {"Authorization": "Bearer nope-nope-nope"}, 403, "INVALID_API_KEY"),
        ("POST", TASK_LIST, {"x-api-key": KEY_NOCREDS}, 500, "OPENAPI_CONFIG_INCOMPLETE"),
        ("GET", "/no/such/route", {}, 404, "NOT_FOUND"),
        ("GET", "/api/openapi/nothing", {"x-api-key": KEY_A}, 404, "NOT_FOUND"),
        ("POST", STATUS, {"x-api-key": KEY_A}, 405, "METHOD_NOT_ALLOWED"),
        ("DELETE", "/healthz", {}, 405, "METHOD_NOT_ALLOWED"),
    ],
)
async def test_failures_answer_with_an_envelope_whose_code_is_the_http_status(
    gateway: Client,
    upstream: Upstream,
    method: str,
    path: str,
    headers: dict[str, str],
    status: int,
    error: str,
) -> None:
    resp = await gateway.request(method, path, headers=headers, data=b"{}")
    body = await envelope_of(resp)
    assert (resp.status, body["error"]) == (status, error)
    assert upstream.received == []
    assert "Traceback" not in body["message"]


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [("POST", STATUS, "GET, HEAD"), ("DELETE", "/healthz", "GET, HEAD")],
)
async def test_method_not_allowed_lists_the_allowed_methods(
    gateway: Client, method: str, path: str, allowed: str
) -> None:
    resp = await gateway.request(method, path, headers={"x-api-key": KEY_A})
    body = await envelope_of(resp)
    assert (resp.status, body["error"]) == (405, "METHOD_NOT_ALLOWED")
    assert resp.headers["Allow"] == allowed


async def test_invalid_key_is_masked_and_lists_available_keys(gateway: Client) -> None:
    resp = await gateway.get(STATUS, headers={"x-api-key": "wrong-key-0123456789"})
    body = await envelope_of(resp)
    assert body["apiKey"] == "wrong-ke***"
    assert body["availableKeys"] == DIRECTORY
    assert "wrong-key-0123456789" not in await resp.text()


async def test_short_invalid_key_is_shown_unchanged(gateway: Client) -> None:
    resp = await gateway.get(STATUS, headers={"x-api-key": "12345678"})
    assert (await envelope_of(resp))["apiKey"] == "12345678"


async def test_invalid_key_lists_no_directory_when_it_is_switched_off(
    upstream: Upstream, make_gateway: MakeGateway
) -> None:
    gateway = await make_gateway(
        [make_tenant("tenant-a", KEY_A, upstream.base_url, CREDS_A)],
        PUBLIC_KEY_DIRECTORY="false",
    )
    resp = await gateway.get(STATUS, headers={"x-api-key": "wrong-key-0123456789"})
    body = await envelope_of(resp)
    assert (resp.status, body["error"]) == (403, "INVALID_API_KEY")
    assert "availableKeys" not in body
    assert "tenant-a" not in await resp.text()
    keys = await gateway.get("/api/openapi/keys")
    assert (keys.status, (await envelope_of(keys))["error"]) == (404, "NOT_FOUND")


async def test_config_incomplete_names_the_tenant_alias(
    gateway: Client, upstream: Upstream
) -> None:
    resp = await gateway.post(TASK_LIST, data=b"{}", headers={"x-api-key": KEY_NOCREDS})
    body = await envelope_of(resp)
    assert body["apiKeyAlias"] == "tenant-c"
    assert KEY_NOCREDS not in await resp.text()
    assert upstream.received == []


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
async def test_bearer_authorization_authenticates(gateway: Client, scheme: str) -> None:
    resp = await gateway.get(STATUS, headers={"Authorization": f"{scheme} {KEY_B}"})
    assert resp.status == 200
    assert (await resp.json())["data"]["apiKeyAlias"] == "tenant-b"


async def test_bearer_authorization_authenticates_a_forward(
    gateway: Client, upstream: Upstream
) -> None:
    resp = await gateway.post(TASK_LIST, data=b"{}", headers={"Authorization": f"Bearer {KEY_A}"})
    assert (await resp.json())["code"] == 0
    assert upstream.received[0].headers["accessKey"] == "ak-tenant-a"


async def test_x_api_key_wins_over_bearer(gateway: Client) -> None:
    headers = {"x-api-key": KEY_A, "Authorization": f"Bearer {KEY_B}"}
    resp = await gateway.get(STATUS, headers=headers)
    assert (await resp.json())["data"]["apiKeyAlias"] == "tenant-a"


async def test_public_routes_need_no_key(gateway: Client) -> None:
    for path in ("/api/openapi/keys", "/healthz", "/readyz"):
        resp = await gateway.get(path)
        assert resp.status == 200, path


async def test_unexpected_failure_is_a_500_without_detail(
    gateway: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    def explode(presented: str) -> None:
        raise RuntimeError("secret-internal-detail")

    monkeypatch.setattr(gateway.app[STATE].registry, "lookup", explode)
    resp = await gateway.get(STATUS, headers={"x-api-key": KEY_A, "X-Request-Id": "boom-1"})
    body = await envelope_of(resp)
    assert (resp.status, body["error"]) == (500, "INTERNAL_ERROR")
    assert "secret-internal-detail" not in await resp.text()
    assert resp.headers["X-Request-Id"] == "boom-1"


# --- request id -------------------------------------------------------------------------------


@pytest.mark.parametrize("request_id", ["abc", "trace-42.a:b_c", "A" * 128, "0"])
async def test_sane_request_id_is_echoed_and_forwarded(
    gateway: Client, upstream: Upstream, request_id: str
) -> None:
    resp = await gateway.post(
        TASK_LIST, data=b"{}", headers={"x-api-key": KEY_A, "X-Request-Id": request_id}
    )
    assert resp.headers["X-Request-Id"] == request_id
    assert upstream.received[0].headers.getall("X-Request-Id") == [request_id]


@pytest.mark.parametrize(
    "request_id", ["", "with space", "A" * 129, "semi;colon", "<script>", "a/b", "%41"]
)
async def test_insane_request_id_is_replaced_everywhere(
    gateway: Client, upstream: Upstream, request_id: str
) -> None:
    resp = await gateway.post(
        TASK_LIST, data=b"{}", headers={"x-api-key": KEY_A, "X-Request-Id": request_id}
    )
    replaced = resp.headers["X-Request-Id"]
    assert GENERATED_ID.fullmatch(replaced)
    assert upstream.received[0].headers.getall("X-Request-Id") == [replaced]


async def test_every_request_gets_its_own_generated_id(gateway: Client) -> None:
    ids = {(await gateway.get("/healthz")).headers["X-Request-Id"] for _ in range(3)}
    assert len(ids) == 3
    assert all(GENERATED_ID.fullmatch(i) for i in ids)


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        (STATUS, {}),
        (STATUS, {"x-api-key": "wrong-key-0123456789"}),
        ("/no/such/route", {}),
    ],
)
async def test_error_answers_carry_the_request_id(
    gateway: Client, path: str, headers: dict[str, str]
) -> None:
    resp = await gateway.get(path, headers={**headers, "X-Request-Id": "err-7"})
    assert resp.status >= 400
    assert resp.headers["X-Request-Id"] == "err-7"
