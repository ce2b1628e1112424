"""Shared fixtures: settings from a dict, a real upstream (sandbox + recorder), the gateway."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from aiohttp.typedefs import Handler
from multidict import CIMultiDict

from proxy.app import create_app
from proxy.config import Secret, Settings, mask_key, parse_settings
from proxy.sandbox import create_sandbox_app
from proxy.tenants import ApiKey, Credentials, Limits, Registry, Tenant, hash_key

# A real redis-server for the tests that need one (fixtures ``redis_server`` and ``own_redis``).
pytest_plugins = ("tests.redis_server",)

KEY_A = "tenant-a-key-0123456789"
KEY_B = "tenant-b-key-9876543210"
KEY_NOCREDS = "tenant-c-key-nocreds-000"
CREDS_A = Credentials("ak-tenant-a", Secret("secret-a-DO-NOT-LEAK"), "8", "md5")
CREDS_B = Credentials("ak-tenant-b", Secret("secret-b-DO-NOT-LEAK"), "9", "sha256")


@dataclass(frozen=True, slots=True)
class ReceivedRequest:
    """What the fake upstream really got."""

    method: str
    path: str
    query: str
    headers: CIMultiDict[str]
    body: bytes


@dataclass(slots=True)
class Upstream:
    """A running fake nxlink: the sandbox wrapped with a recorder."""

    server: TestServer
    received: list[ReceivedRequest] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")


Client = TestClient[web.Request, web.Application]
MakeGateway = Callable[..., Awaitable[Client]]
MakeUpstream = Callable[..., Awaitable[Upstream]]


def recorder(received: list[ReceivedRequest]) -> Callable[..., Awaitable[web.StreamResponse]]:
    """A middleware keeping every request the upstream receives (bodies read once, cached)."""

    @web.middleware
    async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
        body = b"" if request.content_type == "multipart/form-data" else await request.read()
        received.append(
            ReceivedRequest(
                request.method,
                request.path,
                request.rel_url.raw_query_string,
                CIMultiDict(request.headers),
                body,
            )
        )
        return await handler(request)

    return record


def make_settings(**env: str) -> Settings:
    """Settings as the gateway would build them from these variables."""
    return parse_settings(env)


def make_tenant(
    alias: str,
    key: str,
    base_url: str,
    creds: Credentials | None,
    *,
    limits: Limits | None = None,
) -> Tenant:
    """One tenant with one plain key."""
    return Tenant(
        alias=alias,
        description=f"{alias} description",
        base_url=base_url,
        biz_type=creds.biz_type if creds else "8",
        credentials=creds,
        keys=(ApiKey(hash_key(key), mask_key(key)),),
        source=f"test tenant {alias}",
        limits=limits or Limits(),
    )


@pytest.fixture
async def make_upstream(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
) -> Callable[..., Awaitable[Upstream]]:
    """Start a sandbox upstream for some accounts; ``extra`` adds test-only routes."""

    async def start(
        accounts: list[Credentials] | None = None,
        extra: Mapping[str, Callable[[web.Request], Awaitable[web.StreamResponse]]] | None = None,
    ) -> Upstream:
        received: list[ReceivedRequest] = []
        app = create_sandbox_app(accounts if accounts is not None else [CREDS_A, CREDS_B])
        app.middlewares.append(recorder(received))
        for path, handler in (extra or {}).items():
            app.router.add_route("*", path, handler)
        server = await aiohttp_server(app)
        return Upstream(server, received)

    return start


@pytest.fixture
async def upstream(make_upstream: Callable[..., Awaitable[Upstream]]) -> Upstream:
    """The default fake nxlink, knowing tenants A and B."""
    return await make_upstream()


@pytest.fixture
async def make_gateway(
    aiohttp_client: Callable[..., Awaitable[TestClient[web.Request, web.Application]]],
) -> Callable[..., Awaitable[TestClient[web.Request, web.Application]]]:
    """Start the gateway for some tenants and settings variables."""

    async def start(tenants: list[Tenant], **env: Any) -> TestClient[web.Request, web.Application]:
        app = create_app(make_settings(**{k: str(v) for k, v in env.items()}), Registry(tenants))
        return await aiohttp_client(app)

    return start


@pytest.fixture
async def gateway(
    upstream: Upstream,
    make_gateway: Callable[..., Awaitable[TestClient[web.Request, web.Application]]],
) -> TestClient[web.Request, web.Application]:
    """The gateway with tenants A (md5), B (sha256) and one without credentials."""
    return await make_gateway(
        [
            make_tenant("tenant-a", KEY_A, upstream.base_url, CREDS_A),
            make_tenant("tenant-b", KEY_B, upstream.base_url, CREDS_B),
            make_tenant("tenant-c", KEY_NOCREDS, upstream.base_url, None),
        ]
    )
