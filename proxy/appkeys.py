"""Every application and request key, with typed accessors."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from aiohttp import web

from proxy.config import Settings
from proxy.errors import ConfigIncomplete
from proxy.limits import Limiter, Slot
from proxy.metrics import Metrics
from proxy.quotas import QuotaBook
from proxy.ratelimit_headers import LimitState
from proxy.reload import Reloader
from proxy.state.fallback import ResilientState
from proxy.tenants import Credentials, Registry, Tenant
from proxy.upstream import UpstreamClient
from proxy.usage import UsageLedger


@dataclass(slots=True)
class GatewayState:
    """What changes while the gateway runs: the registry (swapped whole on reload) and readiness."""

    registry: Registry
    ready: bool = False
    draining: bool = False
    # Held by whoever reads the tenants file to swap a registry in (a reload, an admin write or
    # read), from the read to the swap: so a registry read earlier is never swapped in later,
    # over one from a newer file.
    swap_lock: asyncio.Lock = field(default_factory=asyncio.Lock)


SETTINGS: Final = web.AppKey("settings", Settings)
STATE: Final = web.AppKey("state", GatewayState)
ACTIONS: Final = web.AppKey[Mapping[str, str]]("actions")
UPSTREAM: Final = web.AppKey("upstream", UpstreamClient)
METRICS: Final = web.AppKey("metrics", Metrics)
LIMITER: Final = web.AppKey("limiter", Limiter)
RELOADER: Final = web.AppKey("reloader", Reloader)
APPEND_RUNS: Final = web.AppKey[set["asyncio.Task[bytes]"]]("append_runs")
BACKEND: Final = web.AppKey("backend", ResilientState)
QUOTAS: Final = web.AppKey("quotas", QuotaBook)
USAGE: Final = web.AppKey("usage", UsageLedger)


@dataclass(slots=True)
class RequestContext:
    """What the middleware chain learns about one request, in one object (one request-dict
    lookup per use instead of one per field)."""

    request_id: str
    started: float  # perf_counter() when the first middleware saw the request
    tenant: Tenant | None = None
    api_key: str = ""
    upstream_status: int | None = None
    response_started: bool = False  # headers sent: no error envelope is possible any more
    body_sent: int | None = None  # body bytes of a streamed answer written so far (access log)
    action: str = ""  # the nxlink action, once known (usage counts requests by action)
    limits: LimitState | None = None  # the tenant's limits in force, for the RateLimit headers
    slot: Slot | None = None  # the tenant's in-flight slot this request holds


CONTEXT: Final = web.RequestKey("context", RequestContext)


def context(request: web.Request) -> RequestContext:
    """This request's context (set by the first middleware)."""
    return request[CONTEXT]


def current_tenant(request: web.Request) -> Tenant:
    """The tenant the auth middleware resolved for this request."""
    tenant = request[CONTEXT].tenant
    assert tenant is not None, "only routes behind the auth middleware have a tenant"
    return tenant


def current_credentials(request: web.Request) -> Credentials:
    """The tenant's nxlink credentials, or 500 ``OPENAPI_CONFIG_INCOMPLETE``."""
    return credentials_of(current_tenant(request))


def credentials_of(tenant: Tenant) -> Credentials:
    """``tenant``'s nxlink credentials, or 500 ``OPENAPI_CONFIG_INCOMPLETE``."""
    if tenant.credentials is None:
        raise ConfigIncomplete(apiKeyAlias=tenant.alias)
    return tenant.credentials


def upstream_client(request: web.Request) -> UpstreamClient:
    """The app's one upstream client."""
    return request.app[UPSTREAM]


def metrics(request: web.Request) -> Metrics:
    """The app's metrics."""
    return request.app[METRICS]
