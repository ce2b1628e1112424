"""A first end-to-end pass: a signed forward reaches the sandbox and is accepted."""

from __future__ import annotations

from aiohttp import web
from aiohttp.test_utils import TestClient

from tests.conftest import KEY_A, Upstream


async def test_forward_reaches_sandbox_with_valid_signature(
    gateway: TestClient[web.Request, web.Application], upstream: Upstream
) -> None:
    resp = await gateway.post(
        "/openapi/aiagent/task/list", data=b'{"pageNumber": 1}', headers={"x-api-key": KEY_A,
        "Content-Type": "application/json"}
    )
    body = await resp.json()
    assert resp.status == 200
    assert body["code"] == 0, body
    assert upstream.received[0].body == b'{"pageNumber": 1}'
