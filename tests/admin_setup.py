"""The admin listener next to a real gateway, for the admin API and console tests: a tenants
file in a temporary folder, one environment tenant, a memory state backend, a sandbox upstream."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from aiohttp import web
from aiohttp.test_utils import TestClient

from proxy.admin import AdminContext, TenantsFile, create_admin_app
from proxy.app import create_app
from proxy.appkeys import STATE, UPSTREAM
from proxy.state import MemoryState
from proxy.tenants import Registry, load_registry
from tests.conftest import CREDS_A, CREDS_B, KEY_A, KEY_B, make_settings
from tests.processes import tenant_entry

ADMIN_TOKEN: Final = "admin-token-0123456789-abcdefghij-XYZ"
ENV_KEY: Final = "env-tenant-key-0123456789"
AUTH: Final = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
ENV: Final = {"EXTERNAL_API_KEY_1": ENV_KEY, "EXTERNAL_API_KEY_1_ALIAS": "from-env"}

Client = TestClient[web.Request, web.Application]


@dataclass(slots=True)
class Admin:
    """A running admin listener and the gateway it manages."""

    client: Client
    proxy: Client
    path: Path | None
    state: MemoryState
    proxy_app: web.Application

    def file(self) -> Any:
        """The tenants file as it is on disk now."""
        assert self.path is not None
        return json.loads(self.path.read_text(encoding="utf-8"))

    def registry(self) -> Registry:
        """The gateway's live registry."""
        return self.proxy_app[STATE].registry


def file_entries(base_url: str) -> list[dict[str, Any]]:
    """Tenant A (with an id), tenant B (without: the admin writes its derived id)."""
    return [
        tenant_entry("tenant-a", KEY_A, base_url, CREDS_A, id="tenant-a", description="Shop A"),
        tenant_entry("tenant-b", KEY_B, base_url, CREDS_B, rateLimitRps=5),
    ]


async def start_admin(
    client_for: Callable[[web.Application], Awaitable[Client]],
    folder: Path,
    base_url: str,
    *,
    with_file: bool = True,
    env: Mapping[str, str] = ENV,
) -> Admin:
    """The gateway and its admin application, sharing registry, upstream client and state."""
    path = folder / "tenants.json" if with_file else None
    variables = {"ADMIN_PORT": "0", "ADMIN_TOKEN": ADMIN_TOKEN}
    if path is not None:
        path.write_text(json.dumps(file_entries(base_url), indent=2), encoding="utf-8")
        variables["TENANTS_FILE"] = str(path)
    settings = make_settings(**variables)
    proxy_app = create_app(settings, load_registry(env, settings))
    proxy = await client_for(proxy_app)

    def validate(document: Any) -> Registry:
        return load_registry(env, settings, document=document)

    state = MemoryState()
    context = AdminContext(
        settings, proxy_app[STATE], state, lambda: proxy_app[UPSTREAM], TenantsFile(path, validate)
    )
    client = await client_for(create_admin_app(context))
    return Admin(client, proxy, path, state, proxy_app)
