"""Hot reload: new keys and secrets without a restart, bad files refused, SIGHUP and polling."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import ClientResponse, web
from aiohttp.typedefs import Handler, Middleware
from prometheus_client.parser import text_string_to_metric_families

from proxy.app import create_app
from proxy.appkeys import CONTEXT, METRICS, RELOADER, STATE, GatewayState
from proxy.config import ConfigError, Secret, parse_settings
from proxy.environment import read_environment, secret_files
from proxy.metrics import Metrics
from proxy.reload import Loader, Reloader, file_stamp
from proxy.serve import config_loader
from proxy.tenants import Credentials, Registry
from tests.conftest import CREDS_A, CREDS_B, KEY_A, KEY_B, Client, MakeUpstream, Upstream
from tests.processes import (
    HELD_ACTION,
    HELD_PATH,
    Gate,
    eventually,
    gateway_process,
    tenant_entry,
    write_tenants,
)

AiohttpClient = Callable[[web.Application], Awaitable[Client]]
TASK_LIST = "/openapi/aiagent/task/list"
NEW_KEY = "tenant-a-new-key-55555555"
CREDS_A_ROTATED = Credentials("ak-tenant-a", Secret("secret-a-ROTATED"), "8", "md5")


def loader_for(tmp_path: Path) -> tuple[Loader, Path]:
    """The gateway's own loader over an empty ``.env`` and a tenants file in ``tmp_path``."""
    env_file = tmp_path / ".env"
    env_file.write_text("", encoding="utf-8")
    tenants_file = tmp_path / "tenants.json"
    environ = {"ENV_FILE": str(env_file), "TENANTS_FILE": str(tenants_file)}
    return config_loader((environ, {})), tenants_file


async def reloading_gateway(
    tmp_path: Path,
    aiohttp_client: AiohttpClient,
    entries: list[dict[str, Any]],
    *,
    middleware: Middleware | None = None,
) -> tuple[Client, Path]:
    """A gateway wired to reload ``tmp_path/tenants.json``; the file poller is parked."""
    load, tenants_file = loader_for(tmp_path)
    write_tenants(tenants_file, entries)
    env = read_environment({"ENV_FILE": str(tmp_path / ".env"), "TENANTS_FILE": str(tenants_file)})
    app = create_app(parse_settings(env), load(), reload=load)
    app[RELOADER].interval = 3600  # only explicit reloads in these tests
    if middleware is not None:
        app.middlewares.append(middleware)
    return await aiohttp_client(app), tenants_file


def hold_after_auth(arrived: asyncio.Event, release: asyncio.Event) -> Middleware:
    """Innermost middleware: the tenant is resolved, then the request waits for ``release``."""

    @web.middleware
    async def hold(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request[CONTEXT].tenant is not None and request.path == TASK_LIST:
            arrived.set()
            await release.wait()
        return await handler(request)

    return hold


async def task_list(client: Client, key: str) -> ClientResponse:
    response = await client.post(
        TASK_LIST, data=b"{}", headers={"x-api-key": key, "Content-Type": "application/json"}
    )
    await response.read()
    return response


async def nxlink_code(client: Client, key: str) -> int:
    response = await task_list(client, key)
    assert response.status == 200, await response.text()
    code = (await response.json())["code"]
    assert isinstance(code, int)
    return code


def reload_count(metrics: Metrics, result: str) -> float:
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            if sample.name == "nxlink_proxy_config_reloads_total" and sample.labels == {
                "result": result
            }:
                return sample.value
    return 0.0


def entry_a(upstream: Upstream, key: str = KEY_A, creds: Credentials = CREDS_A) -> dict[str, Any]:
    return tenant_entry("tenant-a", key, upstream.base_url, creds)


# --- in-process: Reloader.reload() ----------------------------------------------------------


async def test_create_app_wires_a_reloader_only_when_given_a_loader(tmp_path: Path) -> None:
    load, tenants_file = loader_for(tmp_path)
    settings = parse_settings({"TENANTS_FILE": str(tenants_file)})
    assert RELOADER in create_app(settings, Registry([]), reload=load)
    assert RELOADER not in create_app(settings, Registry([]))


async def test_rotated_api_key_takes_effect_without_restart(
    tmp_path: Path, upstream: Upstream, aiohttp_client: AiohttpClient
) -> None:
    client, tenants_file = await reloading_gateway(tmp_path, aiohttp_client, [entry_a(upstream)])
    assert await nxlink_code(client, KEY_A) == 0

    write_tenants(tenants_file, [entry_a(upstream, key=NEW_KEY)])
    assert await client.app[RELOADER].reload("test") is True

    assert await nxlink_code(client, NEW_KEY) == 0
    old = await task_list(client, KEY_A)
    assert old.status == 403
    assert (await old.json())["error"] == "INVALID_API_KEY"
    assert len(upstream.received) == 2


async def test_rotated_access_secret_takes_effect_without_restart(
    tmp_path: Path, make_upstream: MakeUpstream, aiohttp_client: AiohttpClient
) -> None:
    upstream = await make_upstream([CREDS_A_ROTATED])
    client, tenants_file = await reloading_gateway(tmp_path, aiohttp_client, [entry_a(upstream)])
    assert await nxlink_code(client, KEY_A) == 1003  # nxlink: Invalid signature

    write_tenants(tenants_file, [entry_a(upstream, creds=CREDS_A_ROTATED)])
    assert await client.app[RELOADER].reload("test") is True

    assert await nxlink_code(client, KEY_A) == 0


async def test_in_flight_request_is_signed_with_the_configuration_it_started_with(
    tmp_path: Path, upstream: Upstream, aiohttp_client: AiohttpClient
) -> None:
    arrived, release = asyncio.Event(), asyncio.Event()
    client, tenants_file = await reloading_gateway(
        tmp_path, aiohttp_client, [entry_a(upstream)], middleware=hold_after_auth(arrived, release)
    )
    in_flight = asyncio.create_task(task_list(client, KEY_A))
    async with asyncio.timeout(5):
        await arrived.wait()

    write_tenants(tenants_file, [entry_a(upstream, creds=CREDS_B)])
    assert await client.app[RELOADER].reload("test") is True
    release.set()

    response = await in_flight
    assert response.status == 200
    assert (await response.json())["code"] == 0
    assert await nxlink_code(client, KEY_A) == 0
    assert [r.headers["accessKey"] for r in upstream.received] == ["ak-tenant-a", "ak-tenant-b"]


async def test_in_flight_request_finishes_after_its_tenant_is_removed(
    tmp_path: Path, make_upstream: MakeUpstream, aiohttp_client: AiohttpClient
) -> None:
    gate = Gate()
    upstream = await make_upstream(extra={HELD_PATH: gate.handler})
    client, tenants_file = await reloading_gateway(tmp_path, aiohttp_client, [entry_a(upstream)])
    held = asyncio.create_task(client.get(HELD_PATH, headers={"x-api-key": KEY_A, **HELD_ACTION}))
    await gate.wait_arrived()

    write_tenants(tenants_file, [tenant_entry("tenant-b", KEY_B, upstream.base_url, CREDS_B)])
    assert await client.app[RELOADER].reload("test") is True
    gate.release.set()

    response = await held
    assert response.status == 200
    assert await response.read() == b"first-second"
    assert (await task_list(client, KEY_A)).status == 403


async def test_changed_tenant_rate_limit_applies_after_a_reload(
    tmp_path: Path, upstream: Upstream, aiohttp_client: AiohttpClient
) -> None:
    strict = entry_a(upstream) | {"rateLimitRps": 0.01, "rateLimitBurst": 1}
    client, tenants_file = await reloading_gateway(tmp_path, aiohttp_client, [strict])
    assert [(await task_list(client, KEY_A)).status for _ in range(2)] == [200, 429]

    write_tenants(tenants_file, [strict | {"rateLimitBurst": 3}])
    assert await client.app[RELOADER].reload("test") is True
    assert [(await task_list(client, KEY_A)).status for _ in range(4)] == [200, 200, 200, 429]


async def test_reload_that_leaves_a_tenant_alone_keeps_its_rate_bucket(
    tmp_path: Path, upstream: Upstream, aiohttp_client: AiohttpClient
) -> None:
    strict = entry_a(upstream) | {"rateLimitRps": 0.01, "rateLimitBurst": 1}
    client, tenants_file = await reloading_gateway(tmp_path, aiohttp_client, [strict])
    assert [(await task_list(client, KEY_A)).status for _ in range(2)] == [200, 429]

    other = tenant_entry("tenant-b", KEY_B, upstream.base_url, CREDS_B)
    write_tenants(tenants_file, [strict, other])
    assert await client.app[RELOADER].reload("test") is True
    assert (await task_list(client, KEY_A)).status == 429
    assert (await task_list(client, KEY_B)).status == 200


INVALID_FILES = {
    "broken JSON": '{"keys": [',
    "not a list": '{"keys": 3}',
    "entry without a key": '[{"alias": "x"}]',
    "unknown field": '[{"apiKey": "some-key-000000", "ratelimit": 3}]',
    "bad notAfter": '[{"apiKey": "some-key-000000", "apiKeys": [{"apiKey": "k2-000000000", '
    '"notAfter": "soon"}]}]',
    "same key twice": '[{"apiKey": "dup-key-0000000"}, {"apiKey": "dup-key-0000000"}]',
    "bad base URL": '[{"apiKey": "some-key-000000", "openapi": {"baseUrl": "ftp://x"}}]',
    "negative rate": '[{"apiKey": "some-key-000000", "rateLimitRps": -1}]',
}


@pytest.mark.parametrize("text", INVALID_FILES.values(), ids=INVALID_FILES.keys())
async def test_invalid_tenants_file_is_refused_and_the_running_configuration_stays(
    text: str,
    tmp_path: Path,
    upstream: Upstream,
    aiohttp_client: AiohttpClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    client, tenants_file = await reloading_gateway(tmp_path, aiohttp_client, [entry_a(upstream)])
    tenants_file.write_text(text, encoding="utf-8")

    with caplog.at_level(logging.INFO, logger="proxy.reload"):
        assert await client.app[RELOADER].reload("test") is False

    assert await nxlink_code(client, KEY_A) == 0
    refused = [r for r in caplog.records if r.name == "proxy.reload"]
    assert [r.levelno for r in refused] == [logging.ERROR]
    assert "refused" in refused[0].getMessage()
    problems = refused[0].__dict__["problems"]
    assert problems and all(str(tenants_file) in p or "API key" in p for p in problems)
    metrics = client.app[METRICS]
    assert (reload_count(metrics, "failure"), reload_count(metrics, "success")) == (1.0, 0.0)


async def test_missing_tenants_file_is_refused_and_the_running_configuration_stays(
    tmp_path: Path, upstream: Upstream, aiohttp_client: AiohttpClient
) -> None:
    client, tenants_file = await reloading_gateway(tmp_path, aiohttp_client, [entry_a(upstream)])
    tenants_file.unlink()
    assert await client.app[RELOADER].reload("test") is False
    assert await nxlink_code(client, KEY_A) == 0


async def test_successful_reload_is_logged_and_counted(
    tmp_path: Path,
    upstream: Upstream,
    aiohttp_client: AiohttpClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    client, tenants_file = await reloading_gateway(tmp_path, aiohttp_client, [entry_a(upstream)])
    write_tenants(
        tenants_file, [entry_a(upstream), entry_a(upstream, key=NEW_KEY) | {"alias": "b"}]
    )
    with caplog.at_level(logging.INFO, logger="proxy.reload"):
        assert await client.app[RELOADER].reload("signal") is True
    messages = [(r.getMessage(), r.__dict__.get("tenants")) for r in caplog.records]
    assert ("configuration reloaded (signal)", 2) in messages
    assert len(client.app[STATE].registry) == 2
    metrics = client.app[METRICS]
    assert (reload_count(metrics, "success"), reload_count(metrics, "failure")) == (1.0, 0.0)


def failing_loader(exc: Exception) -> Loader:
    def load() -> Registry:
        raise exc

    return load


@pytest.mark.parametrize(
    "exc",
    [ConfigError(["TENANTS_FILE: broken"]), PermissionError("denied"), ValueError("a bug")],
    ids=["config error", "os error", "unexpected error"],
)
async def test_any_failing_reload_keeps_the_running_registry(exc: Exception) -> None:
    registry = Registry([])
    state = GatewayState(registry)
    metrics = Metrics()
    reloader = Reloader(state, failing_loader(exc), [], metrics)
    assert await reloader.reload("test") is False
    assert state.registry is registry
    assert reload_count(metrics, "failure") == 1.0


# --- the watcher: file stamps and requests --------------------------------------------------


def test_file_stamp_changes_when_the_file_is_replaced_and_is_none_when_missing(
    tmp_path: Path,
) -> None:
    path = tmp_path / "tenants.json"
    assert file_stamp(path) is None
    write_tenants(path, [])
    first = file_stamp(path)
    assert first is not None and file_stamp(path) == first
    write_tenants(path, [])  # same bytes, new inode
    assert file_stamp(path) != first


async def watching(reloader: Reloader) -> asyncio.Task[None]:
    return asyncio.create_task(reloader.watch())


async def stop(task: asyncio.Task[None]) -> None:
    assert not task.done(), task
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_watcher_reloads_when_the_tenants_file_changes(
    tmp_path: Path, upstream: Upstream
) -> None:
    load, tenants_file = loader_for(tmp_path)
    write_tenants(tenants_file, [entry_a(upstream)])
    state = GatewayState(load())
    reloader = Reloader(state, load, [tenants_file], Metrics(), interval=0.02)
    task = await watching(reloader)
    try:
        write_tenants(tenants_file, [entry_a(upstream, key=NEW_KEY)])

        async def rotated() -> bool:
            return state.registry.lookup(NEW_KEY) is not None

        await eventually(rotated, what="the watcher to load the new key", timeout=5)
        assert state.registry.lookup(KEY_A) is None
        assert reload_count(reloader.metrics, "success") == 1.0
    finally:
        await stop(task)


async def test_watcher_reloads_on_request_even_when_nothing_changed(
    tmp_path: Path, upstream: Upstream
) -> None:
    load, tenants_file = loader_for(tmp_path)
    write_tenants(tenants_file, [entry_a(upstream)])
    state = GatewayState(load())
    reloader = Reloader(state, load, [tenants_file], Metrics(), interval=3600)
    task = await watching(reloader)
    try:
        reloader.request()

        async def reloaded() -> bool:
            return reload_count(reloader.metrics, "success") == 1.0

        await eventually(reloaded, what="a reload on request", timeout=5)
    finally:
        await stop(task)


async def test_watcher_keeps_watching_after_a_failed_reload() -> None:
    outcomes: list[Exception | None] = [OSError("disk hiccup"), None]

    def flaky() -> Registry:
        failure = outcomes.pop(0)
        if failure is not None:
            raise failure
        return Registry([])

    reloader = Reloader(GatewayState(Registry([])), flaky, [], Metrics(), interval=3600)
    task = await watching(reloader)
    try:
        for result in ("failure", "success"):
            reloader.request()

            async def counted(result: str = result) -> bool:
                return reload_count(reloader.metrics, result) == 1.0

            await eventually(counted, what=f"a reload {result}", timeout=5)
        assert outcomes == []
    finally:
        await stop(task)


# --- a real process: SIGHUP --------------------------------------------------------------------


async def status_of(session: aiohttp.ClientSession, url: str, key: str) -> int:
    async with session.get(url + "/api/openapi/status", headers={"x-api-key": key}) as response:
        return response.status


async def test_sighup_reloads_a_running_gateway_and_refuses_a_broken_file(
    tmp_path: Path, upstream: Upstream
) -> None:
    async with (
        gateway_process(tmp_path, [entry_a(upstream)]) as gateway,
        aiohttp.ClientSession() as session,
    ):
        assert await status_of(session, gateway.url, KEY_A) == 200

        gateway.tenants_file.write_text("{broken", encoding="utf-8")
        gateway.send(signal.SIGHUP)
        await gateway.wait_logged("configuration reload refused (signal); keeping the running one")
        assert await status_of(session, gateway.url, KEY_A) == 200

        write_tenants(gateway.tenants_file, [entry_a(upstream, key=NEW_KEY)])
        gateway.send(signal.SIGHUP)

        async def rotated() -> bool:
            return await status_of(session, gateway.url, NEW_KEY) == 200

        await eventually(rotated, what="the new key to be accepted")
        assert await status_of(session, gateway.url, KEY_A) == 403
        async with session.get(gateway.url + "/metrics") as response:
            text = await response.text()
        assert 'nxlink_proxy_config_reloads_total{result="failure"} 1.0' in text
        assert 'nxlink_proxy_config_reloads_total{result="success"} 1.0' in text
        assert gateway.process.poll() is None


async def test_sighup_reaches_every_worker(tmp_path: Path, upstream: Upstream) -> None:
    async with (
        gateway_process(tmp_path, [entry_a(upstream)], WORKERS="2") as gateway,
        aiohttp.ClientSession() as session,
    ):
        await gateway.wait_logged("gateway listening", count=2)
        write_tenants(gateway.tenants_file, [entry_a(upstream, key=NEW_KEY)])
        gateway.send(signal.SIGHUP)
        await gateway.wait_logged("configuration reloaded (signal)", count=2)
        for _ in range(4):
            assert await status_of(session, gateway.url, NEW_KEY) == 200
            assert await status_of(session, gateway.url, KEY_A) == 403


@pytest.mark.slow
async def test_running_gateway_picks_up_a_changed_tenants_file_without_a_signal(
    tmp_path: Path, upstream: Upstream
) -> None:
    async with (
        gateway_process(tmp_path, [entry_a(upstream)]) as gateway,
        aiohttp.ClientSession() as session,
    ):
        write_tenants(gateway.tenants_file, [entry_a(upstream, key=NEW_KEY)])

        async def rotated() -> bool:
            return await status_of(session, gateway.url, NEW_KEY) == 200

        await eventually(rotated, what="the poller to load the new key", timeout=8)
        assert await status_of(session, gateway.url, KEY_A) == 403
        assert gateway.count_logged("configuration reloaded (file change)") == 1


async def test_a_rotated_secret_file_reloads_by_itself(tmp_path: Path, upstream: Upstream) -> None:
    secret = tmp_path / "secret-a"
    secret.write_text(CREDS_A.access_secret.reveal() + "\n", encoding="utf-8")
    environ = {
        "ENV_FILE": os.devnull,
        "EXTERNAL_API_KEY_1": KEY_A,
        "EXTERNAL_API_KEY_1_OPENAPI_ACCESS_KEY": CREDS_A.access_key,
        "EXTERNAL_API_KEY_1_OPENAPI_ACCESS_SECRET_FILE": str(secret),
        "EXTERNAL_API_KEY_1_OPENAPI_BASE_URL": upstream.base_url,
    }
    assert secret_files(environ) == [secret]
    load = config_loader((environ, {}))
    app = create_app(
        parse_settings(read_environment(environ)), load(), reload=load, watch=secret_files(environ)
    )
    reloader = app[RELOADER]
    reloader.interval = 0.02
    assert secret in reloader.watched
    task = await watching(reloader)
    try:
        secret.write_text("secret-a-ROTATED\n", encoding="utf-8")

        async def rotated() -> bool:
            match = reloader.state.registry.lookup(KEY_A)
            creds = match.tenant.credentials if match else None
            return creds is not None and creds.access_secret == Secret("secret-a-ROTATED")

        await eventually(rotated, what="the rotated secret file to be loaded", timeout=5)
    finally:
        await stop(task)
