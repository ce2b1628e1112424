"""Process lifetime: SIGTERM drains in-flight requests, readiness while draining, workers."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import stat
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.appkeys import STATE
from tests.conftest import CREDS_A, KEY_A, MakeGateway, MakeUpstream, Upstream, make_tenant
from tests.processes import (
    HELD_ACTION,
    HELD_PATH,
    Gate,
    GatewayProcess,
    eventually,
    free_port,
    gateway_process,
    tenant_entry,
)


async def _refused(url: str) -> bool:
    """True when a fresh connection to ``url`` gets no answer."""
    async with aiohttp.ClientSession() as fresh:
        try:
            async with fresh.get(url + "/healthz") as response:
                await response.read()
                return False
        except aiohttp.ClientConnectionError:
            return True


def worker_pids(pid: int) -> list[int]:
    """Child processes of ``pid`` (Linux ``/proc``)."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in children.read_text().split()]


# ---------------------------------------------------------------------------------------------


async def test_sigterm_lets_an_in_flight_request_finish_then_exits_zero(
    tmp_path: Path, make_upstream: MakeUpstream
) -> None:
    gate = Gate()
    upstream = await make_upstream(extra={HELD_PATH: gate.handler})
    tenants = [tenant_entry("tenant-a", KEY_A, upstream.base_url, CREDS_A)]
    async with (
        gateway_process(tmp_path, tenants, SHUTDOWN_GRACE="10") as gateway,
        aiohttp.ClientSession() as client,
    ):
        headers = {"x-api-key": KEY_A, **HELD_ACTION}
        async with client.get(gateway.url + HELD_PATH, headers=headers) as response:
            assert await response.content.readexactly(6) == b"first-"
            loop = asyncio.get_running_loop()
            signalled = loop.time()
            gateway.send(signal.SIGTERM)
            await gateway.wait_logged("shutting down")

            async def refuses_new_connections() -> bool:
                return await _refused(gateway.url)

            await eventually(refuses_new_connections, what="the listener to close")
            assert gateway.process.poll() is None
            gate.release.set()
            assert response.status == 200
            assert await response.read() == b"second"
        assert await gateway.wait_exit(timeout=10) == 0
        assert loop.time() - signalled < 9  # done when the request is, not at the grace (10 s)


async def test_sigterm_stops_a_request_still_running_when_the_grace_ends(
    tmp_path: Path, make_upstream: MakeUpstream
) -> None:
    gate = Gate()
    upstream = await make_upstream(extra={HELD_PATH: gate.handler})
    tenants = [tenant_entry("tenant-a", KEY_A, upstream.base_url, CREDS_A)]
    try:
        async with (
            gateway_process(tmp_path, tenants, SHUTDOWN_GRACE="0.5") as gateway,
            aiohttp.ClientSession() as client,
        ):
            headers = {"x-api-key": KEY_A, **HELD_ACTION}
            async with client.get(gateway.url + HELD_PATH, headers=headers) as response:
                assert await response.content.readexactly(6) == b"first-"
                loop = asyncio.get_running_loop()
                signalled = loop.time()
                gateway.send(signal.SIGTERM)
                with pytest.raises(aiohttp.ClientPayloadError):
                    await response.read()
                assert await gateway.wait_exit(timeout=5) == 0
                assert loop.time() - signalled < 4.5  # cut at the 0.5 s grace, not left hanging
    finally:
        gate.release.set()


async def test_sigint_stops_an_idle_gateway_with_exit_code_zero(
    tmp_path: Path, upstream: Upstream
) -> None:
    tenants = [tenant_entry("tenant-a", KEY_A, upstream.base_url, CREDS_A)]
    async with gateway_process(tmp_path, tenants) as gateway:
        gateway.send(signal.SIGINT)
        assert await gateway.wait_exit(timeout=10) == 0
        assert gateway.count_logged("shutting down") == 1


async def test_readyz_answers_503_while_draining(
    upstream: Upstream, make_gateway: MakeGateway
) -> None:
    client = await make_gateway([make_tenant("tenant-a", KEY_A, upstream.base_url, CREDS_A)])
    assert (await client.get("/readyz")).status == 200
    client.app[STATE].draining = True
    response = await client.get("/readyz")
    body = await response.json()
    assert response.status == 503
    assert body["error"] == "NOT_READY"
    assert (await client.get("/healthz")).status == 200


async def test_two_workers_serve_requests_and_exit_zero_on_sigterm(
    tmp_path: Path, upstream: Upstream
) -> None:
    tenants = [tenant_entry("tenant-a", KEY_A, upstream.base_url, CREDS_A)]
    async with gateway_process(tmp_path, tenants, WORKERS="2") as gateway:
        await gateway.wait_logged("gateway listening", count=2)
        assert len(worker_pids(gateway.process.pid)) == 2
        async with aiohttp.ClientSession() as client:
            for _ in range(4):
                async with client.post(
                    gateway.url + "/openapi/aiagent/task/list",
                    data=b"{}",
                    headers={"x-api-key": KEY_A, "Content-Type": "application/json"},
                ) as response:
                    assert response.status == 200
                    assert (await response.json())["code"] == 0
        gateway.send(signal.SIGTERM)
        assert await gateway.wait_exit(timeout=10) == 0
        assert gateway.count_logged("shutting down") == 2
    assert len(upstream.received) == 4


async def test_a_worker_that_dies_makes_the_supervisor_exit_non_zero(
    tmp_path: Path, upstream: Upstream
) -> None:
    tenants = [tenant_entry("tenant-a", KEY_A, upstream.base_url, CREDS_A)]
    async with gateway_process(tmp_path, tenants, WORKERS="2") as gateway:
        await gateway.wait_logged("gateway listening", count=2)
        doomed = worker_pids(gateway.process.pid)[0]
        os.kill(doomed, signal.SIGKILL)
        gateway.send(signal.SIGTERM)
        assert await gateway.wait_exit(timeout=10) == 128 + signal.SIGKILL


async def test_shutdown_delay_keeps_serving_new_connections_unready_then_closes(
    tmp_path: Path, upstream: Upstream
) -> None:
    delay = 3.0
    tenants = [tenant_entry("tenant-a", KEY_A, upstream.base_url, CREDS_A)]
    async with gateway_process(tmp_path, tenants, SHUTDOWN_DELAY=str(delay)) as gateway:
        loop = asyncio.get_running_loop()
        signalled = loop.time()
        gateway.send(signal.SIGTERM)
        await gateway.wait_logged("shutting down")
        # Each call on a NEW connection, as a load balancer's would be.
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as fresh:
            async with fresh.get(gateway.url + "/readyz") as response:
                assert response.status == 503
                assert (await response.json())["error"] == "NOT_READY"
            async with fresh.get(gateway.url + "/healthz") as response:
                assert response.status == 200
            async with fresh.post(
                gateway.url + "/openapi/aiagent/task/list",
                data=b"{}",
                headers={"x-api-key": KEY_A, "Content-Type": "application/json"},
            ) as response:
                assert response.status == 200
                assert (await response.json())["code"] == 0
        assert loop.time() - signalled < delay  # all of the above fell inside the delay

        async def refuses_new_connections() -> bool:
            return await _refused(gateway.url)

        await eventually(refuses_new_connections, what="the listener to close after the delay")
        assert loop.time() - signalled >= delay
        assert gateway.count_logged("closing the listener") == 1
        assert await gateway.wait_exit(timeout=10) == 0
    assert len(upstream.received) == 1


async def test_a_second_sigterm_cuts_the_shutdown_delay_short(
    tmp_path: Path, upstream: Upstream
) -> None:
    tenants = [tenant_entry("tenant-a", KEY_A, upstream.base_url, CREDS_A)]
    async with gateway_process(tmp_path, tenants, SHUTDOWN_DELAY="60") as gateway:
        gateway.send(signal.SIGTERM)
        await gateway.wait_logged("shutting down")
        assert gateway.process.poll() is None
        gateway.send(signal.SIGTERM)
        assert await gateway.wait_exit(timeout=10) == 0  # not the 60 s delay


def state_lines(gateway: GatewayProcess) -> list[dict[str, Any]]:
    return [line for line in gateway.log_lines() if line["message"].startswith("state ")]


async def test_workers_without_a_state_url_share_a_private_sqlite_file(
    tmp_path: Path, upstream: Upstream
) -> None:
    tenants = [tenant_entry("tenant-a", KEY_A, upstream.base_url, CREDS_A)]
    async with gateway_process(tmp_path, tenants, WORKERS="2") as gateway:
        await gateway.wait_logged("gateway listening", count=2)
        (line,) = state_lines(gateway)  # one line, from the supervisor
        found = re.fullmatch(
            r"state sqlite:///(/\S+)/state\.db: shared by this gateway's workers, "
            r"removed when it stops",
            line["message"],
        )
        assert found is not None, line
        folder = Path(found[1])
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert (folder / "state.db").is_file()
        gateway.send(signal.SIGTERM)
        assert await gateway.wait_exit(timeout=10) == 0
    assert not folder.exists()


async def test_an_unreachable_redis_at_start_up_is_a_warning_not_a_stop(
    tmp_path: Path, upstream: Upstream
) -> None:
    tenants = [tenant_entry("tenant-a", KEY_A, upstream.base_url, CREDS_A)]
    url = f"redis://app:pa55word@127.0.0.1:{free_port()}/0"
    async with gateway_process(tmp_path, tenants, STATE_URL=url) as gateway:
        await gateway.wait_logged("gateway listening")
        info, warning = state_lines(gateway)
        assert info["message"].startswith("state redis://app:***@127.0.0.1:")
        assert warning["level"] == "warning"
        assert warning["message"].startswith("state backend unreachable (redis ")
        assert "pa55word" not in gateway.stdout() + gateway.stderr()
