"""/metrics: Prometheus text by tenant alias, route and status class; never a key or a secret."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from proxy.app import create_app
from proxy.appkeys import RELOADER
from proxy.config import parse_settings
from proxy.environment import read_environment
from proxy.metrics import Metrics, status_class
from proxy.serve import config_loader
from proxy.tenants import Limits
from tests.conftest import (
    CREDS_A,
    CREDS_B,
    KEY_A,
    KEY_B,
    KEY_NOCREDS,
    Client,
    MakeGateway,
    MakeUpstream,
    Upstream,
    make_tenant,
)
from tests.processes import (
    HELD_ACTION,
    HELD_PATH,
    Gate,
    eventually,
    free_port,
    tenant_entry,
    write_tenants,
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
TASK_LIST = "/openapi/aiagent/task/list"
WRONG_KEY = "wrong-key-that-nobody-has-42"


async def scrape(client: Client) -> tuple[str, Samples]:
    """The exposition text and every sample in it, keyed by name and labels."""
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    text = await response.text()
    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    return text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def call(client: Client, path: str, key: str | None = None, method: str = "POST") -> int:
    headers = {"Content-Type": "application/json"} | ({"x-api-key": key} if key else {})
    response = await client.request(method, path, data=b"{}", headers=headers)
    await response.read()
    return response.status


@pytest.fixture
async def client(upstream: Upstream, make_gateway: MakeGateway) -> Client:
    """Tenants A (limited to one request in its burst), B, C (no credentials), D (upstream down)."""
    return await make_gateway(
        [
            make_tenant(
                "tenant-a",
                KEY_A,
                upstream.base_url,
                CREDS_A,
                limits=Limits(rate_limit_rps=0.01, rate_limit_burst=1),
            ),
            make_tenant("tenant-b", KEY_B, upstream.base_url, CREDS_B),
            make_tenant("tenant-c", KEY_NOCREDS, upstream.base_url, None),
            make_tenant(
                "tenant-d", "tenant-d-key-down-0000", f"http://127.0.0.1:{free_port()}", CREDS_B
            ),
        ]
    )


@pytest.mark.parametrize(
    ("status", "label"), [(200, "2xx"), (302, "3xx"), (429, "4xx"), (504, "5xx")]
)
def test_status_class_is_the_hundreds_digit(status: int, label: str) -> None:
    assert status_class(status) == label


async def test_requests_are_counted_by_tenant_alias_route_and_status_class(
    client: Client,
) -> None:
    assert await call(client, TASK_LIST, KEY_B) == 200
    assert await call(client, TASK_LIST, KEY_B) == 200
    assert await call(client, "/api/openapi/status", KEY_B, method="GET") == 200
    assert await call(client, TASK_LIST, KEY_NOCREDS) == 500
    assert await call(client, TASK_LIST, WRONG_KEY) == 403
    assert await call(client, "/nowhere", method="GET") == 404

    _, samples = await scrape(client)
    total = "nxlink_proxy_requests_total"
    assert value(samples, total, tenant="tenant-b", route="forward", status_class="2xx") == 2
    assert value(samples, total, tenant="tenant-b", route="status", status_class="2xx") == 1
    assert value(samples, total, tenant="tenant-c", route="forward", status_class="5xx") == 1
    assert value(samples, total, tenant="", route="forward", status_class="4xx") == 1
    assert value(samples, total, tenant="", route="unmatched", status_class="4xx") == 1


async def test_limited_requests_are_counted_by_tenant_and_reason(client: Client) -> None:
    assert await call(client, TASK_LIST, KEY_A) == 200
    assert await call(client, TASK_LIST, KEY_A) == 429
    assert await call(client, TASK_LIST, KEY_A) == 429
    _, samples = await scrape(client)
    limited = "nxlink_proxy_limited_total"
    assert value(samples, limited, tenant="tenant-a", reason="RATE_LIMITED") == 2
    assert value(samples, limited, tenant="tenant-b", reason="RATE_LIMITED") == 0
    total = "nxlink_proxy_requests_total"
    assert value(samples, total, tenant="tenant-a", route="forward", status_class="4xx") == 2


async def test_busy_tenant_is_counted_as_limited_with_reason_tenant_busy(
    make_upstream: MakeUpstream, make_gateway: MakeGateway
) -> None:
    gate = Gate()
    upstream = await make_upstream(extra={HELD_PATH: gate.handler})
    client = await make_gateway(
        [make_tenant("tenant-a", KEY_A, upstream.base_url, CREDS_A)], MAX_INFLIGHT_PER_TENANT="1"
    )
    held = asyncio.create_task(client.get(HELD_PATH, headers={"x-api-key": KEY_A, **HELD_ACTION}))
    await gate.wait_arrived()
    assert await call(client, TASK_LIST, KEY_A) == 429
    gate.release.set()
    assert (await held).status == 200
    _, samples = await scrape(client)
    assert (
        value(samples, "nxlink_proxy_limited_total", tenant="tenant-a", reason="TENANT_BUSY") == 1
    )


async def test_auth_rejections_are_counted_by_reason(client: Client) -> None:
    assert await call(client, TASK_LIST) == 401
    assert await call(client, TASK_LIST, WRONG_KEY) == 403
    assert await call(client, "/api/openapi/status", WRONG_KEY, method="GET") == 403
    _, samples = await scrape(client)
    rejected = "nxlink_proxy_auth_rejected_total"
    assert value(samples, rejected, reason="MISSING_API_KEY") == 1
    assert value(samples, rejected, reason="INVALID_API_KEY") == 2


async def test_in_flight_gauge_counts_requests_being_served(
    make_upstream: MakeUpstream, make_gateway: MakeGateway
) -> None:
    gate = Gate()
    upstream = await make_upstream(extra={HELD_PATH: gate.handler})
    client = await make_gateway([make_tenant("tenant-a", KEY_A, upstream.base_url, CREDS_A)])
    held = asyncio.create_task(client.get(HELD_PATH, headers={"x-api-key": KEY_A, **HELD_ACTION}))
    await gate.wait_arrived()
    _, during = await scrape(client)
    # The scrape itself is one of the requests being served.
    assert value(during, "nxlink_proxy_in_flight_requests") == 2
    gate.release.set()
    response = await held
    assert await response.read() == b"first-second"

    async def only_the_scrape() -> bool:
        _, after = await scrape(client)
        return value(after, "nxlink_proxy_in_flight_requests") == 1

    await eventually(only_the_scrape, what="the gauge to drop once the stream ended", timeout=5)


async def test_upstream_latency_is_observed_per_tenant_for_each_forwarded_request(
    client: Client,
) -> None:
    assert await call(client, TASK_LIST, KEY_B) == 200
    assert await call(client, TASK_LIST, KEY_B) == 200
    _, samples = await scrape(client)
    count = "nxlink_proxy_upstream_latency_seconds_count"
    assert value(samples, count, tenant="tenant-b") == 2
    assert value(samples, "nxlink_proxy_upstream_latency_seconds_sum", tenant="tenant-b") > 0
    assert value(samples, count, tenant="tenant-a") == 0


def test_latency_histogram_has_buckets_up_to_the_upstream_timeout() -> None:
    metrics = Metrics()
    metrics.upstream_latency.labels("t").observe(0.003)
    metrics.upstream_latency.labels("t").observe(45.0)
    samples = {
        s.labels["le"]: s.value
        for family in text_string_to_metric_families(metrics.render().decode())
        for s in family.samples
        if s.name.endswith("_bucket")
    }
    assert samples["0.005"] == 1
    assert samples["30.0"] == 1
    assert samples["60.0"] == 2
    assert samples["+Inf"] == 2


async def test_reloads_are_counted_by_result(
    tmp_path: Path,
    upstream: Upstream,
    aiohttp_client: Callable[[web.Application], Awaitable[Client]],
) -> None:
    (tmp_path / ".env").write_text("", encoding="utf-8")
    tenants_file = write_tenants(
        tmp_path / "tenants.json", [tenant_entry("tenant-a", KEY_A, upstream.base_url, CREDS_A)]
    )
    environ = {"ENV_FILE": str(tmp_path / ".env"), "TENANTS_FILE": str(tenants_file)}
    load = config_loader((environ, {}))
    app = create_app(parse_settings(read_environment(environ)), load(), reload=load)
    app[RELOADER].interval = 3600
    client = await aiohttp_client(app)
    assert await app[RELOADER].reload("test")
    tenants_file.write_text("[", encoding="utf-8")
    assert not await app[RELOADER].reload("test")
    assert not await app[RELOADER].reload("test")
    _, samples = await scrape(client)
    assert value(samples, "nxlink_proxy_config_reloads_total", result="success") == 1
    assert value(samples, "nxlink_proxy_config_reloads_total", result="failure") == 2


async def test_each_app_has_its_own_metrics(upstream: Upstream, make_gateway: MakeGateway) -> None:
    tenants = [make_tenant("tenant-b", KEY_B, upstream.base_url, CREDS_B)]
    first, second = await make_gateway(tenants), await make_gateway(tenants)
    assert await call(first, TASK_LIST, KEY_B) == 200
    _, samples = await scrape(second)
    total = "nxlink_proxy_requests_total"
    assert value(samples, total, tenant="tenant-b", route="forward", status_class="2xx") == 0


async def test_metrics_never_show_a_key_or_a_secret(client: Client) -> None:
    for key in (KEY_A, KEY_B, KEY_NOCREDS, "tenant-d-key-down-0000", WRONG_KEY, None):
        await call(client, TASK_LIST, key)
        await call(client, "/api/openapi/status", key, method="GET")
    await call(client, TASK_LIST, KEY_A)  # rate limited
    text, _ = await scrape(client)
    assert "nxlink_proxy_requests_total" in text
    for secret in (
        KEY_A,
        KEY_B,
        KEY_NOCREDS,
        "tenant-d-key-down-0000",
        WRONG_KEY,
        CREDS_A.access_secret.reveal(),
        CREDS_B.access_secret.reveal(),
    ):
        assert secret not in text
    assert "***" not in text  # not even masked keys: labels are aliases
