"""Every application and request key, with typed accessors."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from aiohttp import web

from proxy.config import Settings
from proxy.errors import ConfigIncomplete
from proxy.idempotency import IdempotencyStore
from proxy.limits import Limiter
from proxy.metrics import Metrics
from proxy.reload import Reloader
from proxy.tenants import Credentials, Registry, Tenant
from proxy.upstream import UpstreamClient


@dataclass(slots=True)
class GatewayState:
    """What changes while the gateway runs: the registry (swapped whole on reload) and readiness."""

    registry: Registry
    ready: bool = False
    draining: bool = False


SETTINGS: Final = web.AppKey("settings", Settings)
STATE: Final = web.AppKey("state", GatewayState)
ACTIONS: Final = web.AppKey[Mapping[str, str]]("actions")
UPSTREAM: Final = web.AppKey("upstream", UpstreamClient)
METRICS: Final = web.AppKey("metrics", Metrics)
LIMITER: Final = web.AppKey("limiter", Limiter)
RELOADER: Final = web.AppKey("reloader", Reloader)
IDEMPOTENCY: Final = web.AppKey[IdempotencyStore]("idempotency")

REQUEST_ID: Final = web.RequestKey("request_id", str)
TENANT: Final = web.RequestKey("tenant", Tenant)
API_KEY: Final = web.RequestKey("api_key", str)
RESPONSE_STARTED: Final = web.RequestKey("response_started", bool)
UPSTREAM_STATUS: Final = web.RequestKey("upstream_status", int)
STARTED: Final = web.RequestKey("started", float)


def current_tenant(request: web.Request) -> Tenant:
    """The tenant the auth middleware resolved for this request."""
    return request[TENANT]


def current_credentials(request: web.Request) -> Credentials:
    """The tenant's nxlink credentials, or 500 ``OPENAPI_CONFIG_INCOMPLETE``."""
    tenant = request[TENANT]
    if tenant.credentials is None:
        raise ConfigIncomplete(apiKeyAlias=tenant.alias)
    return tenant.credentials


def upstream_client(request: web.Request) -> UpstreamClient:
    """The app's one upstream client."""
    return request.app[UPSTREAM]


def metrics(request: web.Request) -> Metrics:
    """The app's metrics."""
    return request.app[METRICS]
