"""Local handlers: status, the public key directory, liveness and readiness, exact shapes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from proxy import __version__
from proxy.appkeys import STATE
from tests.conftest import CREDS_A, CREDS_B, KEY_A, KEY_B, KEY_NOCREDS, Client, Upstream


def parse_utc(text: str) -> datetime:
    """An ISO-8601 timestamp that must be UTC."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    assert moment.utcoffset() == timedelta(0)
    return moment


@pytest.mark.parametrize(
    ("key", "alias", "has_config", "biz_type"),
    [
        (KEY_A, "tenant-a", True, CREDS_A.biz_type),
        (KEY_B, "tenant-b", True, CREDS_B.biz_type),
        (KEY_NOCREDS, "tenant-c", False, "8"),
    ],
)
async def test_status_describes_the_caller_with_its_key_masked(
    gateway: Client, upstream: Upstream, key: str, alias: str, has_config: bool, biz_type: str
) -> None:
    resp = await gateway.get("/api/openapi/status", headers={"x-api-key": key})
    assert resp.status == 200
    body: dict[str, Any] = await resp.json()
    timestamp = body["data"].pop("timestamp")
    assert abs(parse_utc(timestamp) - datetime.now(UTC)) < timedelta(seconds=5)
    assert body == {
        "code": 200,
        "message": "OpenAPI service is running",
        "data": {
            "service": "nxlink-openapi-proxy",
            "version": __version__,
            "apiKey": key[:8] + "***",
            "apiKeyAlias": alias,
            "apiKeyDescription": f"{alias} description",
            "hasOpenApiConfig": has_config,
            "openApiBaseUrl": upstream.base_url,
            "openApiBizType": biz_type,
        },
    }
    assert key not in await resp.text()


async def test_keys_lists_aliases_and_never_a_key_or_secret(
    gateway: Client, upstream: Upstream
) -> None:
    resp = await gateway.get("/api/openapi/keys")
    assert resp.status == 200
    assert await resp.json() == {
        "code": 200,
        "message": "Available API Keys",
        "data": {
            "totalKeys": 3,
            "keys": [
                {
                    "alias": alias,
                    "description": f"{alias} description",
                    "hasOpenApiConfig": has_config,
                    "openApiBaseUrl": upstream.base_url,
                    "bizType": biz_type,
                }
                for alias, has_config, biz_type in [
                    ("tenant-a", True, "8"),
                    ("tenant-b", True, "9"),
                    ("tenant-c", False, "8"),
                ]
            ],
        },
    }
    text = await resp.text()
    for secret in (KEY_A, KEY_B, KEY_NOCREDS, "***", "secret-a", "secret-b", "ak-tenant"):
        assert secret not in text


async def test_healthz_answers_alive(gateway: Client) -> None:
    resp = await gateway.get("/healthz")
    assert resp.status == 200
    assert await resp.json() == {"code": 200, "message": "ok", "data": {"status": "alive"}}


async def test_readyz_answers_ready_once_configuration_is_loaded(gateway: Client) -> None:
    resp = await gateway.get("/readyz")
    assert resp.status == 200
    assert await resp.json() == {
        "code": 200,
        "message": "ready",
        "data": {"status": "ready", "tenants": 3, "state": "ok"},
    }


@pytest.mark.parametrize(("ready", "draining"), [(False, False), (True, True)])
async def test_readyz_is_503_until_loaded_and_while_draining(
    gateway: Client, ready: bool, draining: bool
) -> None:
    state = gateway.app[STATE]
    state.ready, state.draining = ready, draining
    resp = await gateway.get("/readyz")
    body = await resp.json()
    assert (resp.status, body["code"], body["error"]) == (503, 503, "NOT_READY")
    live = await gateway.get("/healthz")
    assert live.status == 200
