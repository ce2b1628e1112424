"""CORS: off by default; with CORS_ALLOW_ORIGINS, preflights need no key and only listed origins."""

from __future__ import annotations

from typing import Final

import pytest

from tests.conftest import CREDS_A, KEY_A, Client, MakeGateway, Upstream, make_tenant

ALLOWED: Final = "https://app.example.com"
ALSO_ALLOWED: Final = "http://localhost:3000"
STRANGER: Final = "https://evil.example.net"
ACAO: Final = "Access-Control-Allow-Origin"
TASK_LIST: Final = "/openapi/aiagent/task/list"
PREFLIGHT_PATHS: Final = (TASK_LIST, "/openapi/anything/else", "/api/openapi/status")


async def cors_gateway(
    upstream: Upstream, make_gateway: MakeGateway, origins: str | None
) -> Client:
    env = {} if origins is None else {"CORS_ALLOW_ORIGINS": origins}
    return await make_gateway([make_tenant("tenant-a", KEY_A, upstream.base_url, CREDS_A)], **env)


def preflight_headers(origin: str, method: str = "POST") -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": "x-api-key, content-type",
    }


@pytest.mark.parametrize("path", PREFLIGHT_PATHS)
@pytest.mark.parametrize("origin", [ALLOWED, ALSO_ALLOWED])
async def test_preflight_from_an_allowed_origin_is_answered_without_an_api_key(
    path: str, origin: str, upstream: Upstream, make_gateway: MakeGateway
) -> None:
    client = await cors_gateway(upstream, make_gateway, f"{ALLOWED}, {ALSO_ALLOWED}")
    method = "GET" if path.startswith("/api/") else "POST"
    response = await client.options(path, headers=preflight_headers(origin, method))
    assert response.status == 200
    assert response.headers[ACAO] == origin
    assert method in response.headers["Access-Control-Allow-Methods"]
    allowed_headers = response.headers["Access-Control-Allow-Headers"].lower()
    assert "x-api-key" in allowed_headers and "content-type" in allowed_headers
    assert upstream.received == []


@pytest.mark.parametrize("path", PREFLIGHT_PATHS)
async def test_preflight_from_another_origin_gets_no_cors_headers(
    path: str, upstream: Upstream, make_gateway: MakeGateway
) -> None:
    client = await cors_gateway(upstream, make_gateway, ALLOWED)
    response = await client.options(path, headers=preflight_headers(STRANGER))
    assert response.status >= 400
    assert ACAO not in response.headers
    assert upstream.received == []


async def test_cors_is_off_by_default(upstream: Upstream, make_gateway: MakeGateway) -> None:
    client = await cors_gateway(upstream, make_gateway, None)
    preflight = await client.options(TASK_LIST, headers=preflight_headers(ALLOWED))
    assert ACAO not in preflight.headers
    assert preflight.status >= 400
    actual = await client.post(
        TASK_LIST, data=b"{}", headers={"x-api-key": KEY_A, "Origin": ALLOWED}
    )
    assert actual.status == 200
    assert ACAO not in actual.headers


async def test_forwarded_answer_carries_the_allowed_origin(
    upstream: Upstream, make_gateway: MakeGateway
) -> None:
    client = await cors_gateway(upstream, make_gateway, ALLOWED)
    response = await client.post(
        TASK_LIST,
        data=b"{}",
        headers={"x-api-key": KEY_A, "Origin": ALLOWED, "Content-Type": "application/json"},
    )
    assert response.status == 200
    assert (await response.json())["code"] == 0
    assert response.headers[ACAO] == ALLOWED
    assert "Origin" in upstream.received[0].headers  # an end-to-end header, passed on


async def test_error_answer_carries_the_allowed_origin_so_a_browser_can_read_it(
    upstream: Upstream, make_gateway: MakeGateway
) -> None:
    client = await cors_gateway(upstream, make_gateway, ALLOWED)
    response = await client.post(TASK_LIST, data=b"{}", headers={"Origin": ALLOWED})
    assert response.status == 401
    assert response.headers[ACAO] == ALLOWED


async def test_answer_to_another_origin_carries_no_cors_header(
    upstream: Upstream, make_gateway: MakeGateway
) -> None:
    client = await cors_gateway(upstream, make_gateway, ALLOWED)
    response = await client.get(
        "/api/openapi/status", headers={"x-api-key": KEY_A, "Origin": STRANGER}
    )
    assert response.status == 200
    assert ACAO not in response.headers


async def test_options_that_is_not_a_preflight_is_never_forwarded(
    upstream: Upstream, make_gateway: MakeGateway
) -> None:
    client = await cors_gateway(upstream, make_gateway, ALLOWED)
    response = await client.options(TASK_LIST, headers={"Origin": ALLOWED})
    assert response.status >= 400
    assert upstream.received == []
