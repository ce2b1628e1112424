"""What the admin application shares with the gateway, under one typed application key."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from aiohttp import web

from proxy.admin.store import TenantsFile
from proxy.appkeys import GatewayState
from proxy.config import Settings
from proxy.state import StateBackend
from proxy.upstream import UpstreamClient


@dataclass(frozen=True, slots=True)
class AdminContext:
    """The gateway's live pieces the admin reads and changes (never copies of them)."""

    settings: Settings
    gateway: GatewayState  # the proxy's registry, swapped whole after a write
    state: StateBackend  # usage and the audit log
    upstream: Callable[[], UpstreamClient]  # the proxy's client, opened with its app
    tenants_file: TenantsFile
    # The version of the tenants file the live registry was last brought up to by the admin.
    seen: list[str | None] = field(default_factory=lambda: [None])


ADMIN: Final = web.AppKey("admin", AdminContext)


def admin_context(request: web.Request) -> AdminContext:
    """The admin application's context."""
    return request.app[ADMIN]
