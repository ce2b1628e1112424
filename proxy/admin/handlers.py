"""Tenant and key handlers: read the live registry, write through the tenants file."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from aiohttp import web

from proxy.admin.audit import audited, note
from proxy.admin.context import AdminContext, admin_context
from proxy.admin.edits import (
    CREATE_FIELDS,
    PATCH_FIELDS,
    check_body,
    check_grace,
    create_edit,
    delete_edit,
    patch_edit,
    revoke_edit,
    rotate_edit,
)
from proxy.admin.store import Edit, Written
from proxy.admin.views import source_kind, tenant_view
from proxy.admin.wire import envelope, read_json
from proxy.errors import NotFound, RequestError
from proxy.tenants import Registry, Tenant


async def handle_list(request: web.Request) -> web.Response:
    """Every tenant, with the tenants file's version as the ETag."""
    registry, etag = await current(request)
    now = datetime.now(UTC)
    tenants = [tenant_view(t, now) for t in registry.tenants]
    return envelope(200, "Tenants", {"tenants": tenants, "total": len(tenants)}, etag=etag)


async def handle_get(request: web.Request) -> web.Response:
    """One tenant."""
    registry, etag = await current(request)
    tenant = find_tenant(registry, request.match_info["id"])
    return envelope(200, "Tenant", tenant_view(tenant, datetime.now(UTC)), etag=etag)


async def current(request: web.Request) -> tuple[Registry, str | None]:
    """The registry as of the tenants file now, and that file's version.

    Another process may have written the file since this one last reloaded it (its poll runs
    every 2 s): an answer whose data and ETag came from two versions would let a write with
    that ETag undo the other process's change. So the file is read, and if it changed, checked
    and swapped in here first (as the reload would, a moment later)."""
    ctx = admin_context(request)
    async with ctx.gateway.swap_lock:  # the reload's too: swaps in the files' order
        etag, registry = await asyncio.to_thread(ctx.tenants_file.snapshot)
        if registry is not None and etag != ctx.seen[0]:
            ctx.gateway.registry, ctx.seen[0] = registry, etag
    return ctx.gateway.registry, etag


@audited("tenant.create")
async def handle_create(request: web.Request) -> web.Response:
    """A new tenant; its key is in this answer and nowhere else."""
    body = check_body(await read_json(request), CREATE_FIELDS, create=True)
    note(request).alias = body["alias"]
    written = await write(request, create_edit(body))
    tenant = find_tenant(written.registry, written.result.tenant_id)
    note(request).tenant_id = tenant.id
    data = {
        "id": tenant.id,
        "tenant": tenant_view(tenant, datetime.now(UTC)),
        "apiKey": written.result.api_key,
    }
    return envelope(201, "Tenant created; its apiKey is shown this once", data, etag=written.etag)


@audited("tenant.update")
async def handle_patch(request: web.Request) -> web.Response:
    """Change some of a tenant's fields."""
    tenant = await editable_tenant(request)
    body = check_body(await read_json(request), PATCH_FIELDS, create=False)
    written = await write(request, patch_edit(tenant.id, body))
    changed = find_tenant(written.registry, tenant.id)
    note(request).alias = changed.alias
    view = tenant_view(changed, datetime.now(UTC))
    return envelope(200, "Tenant updated", view, etag=written.etag)


@audited("tenant.delete")
async def handle_delete(request: web.Request) -> web.Response:
    """Remove a tenant: its keys stop working."""
    tenant = await editable_tenant(request)
    written = await write(request, delete_edit(tenant.id))
    return envelope(200, "Tenant deleted", {"id": tenant.id}, etag=written.etag)


@audited("key.rotate")
async def handle_rotate(request: web.Request) -> web.Response:
    """A new key for the tenant; the others end after ``graceSeconds``."""
    tenant = await editable_tenant(request)
    grace = check_grace(await read_json(request, optional=True))
    written = await write(request, rotate_edit(tenant.id, grace, datetime.now(UTC)))
    view = tenant_view(find_tenant(written.registry, tenant.id), datetime.now(UTC))
    data = {"keyId": written.result.key_id, "apiKey": written.result.api_key, "tenant": view}
    return envelope(201, "Key created; it is shown this once", data, etag=written.etag)


@audited("key.revoke")
async def handle_revoke(request: web.Request) -> web.Response:
    """Remove one of the tenant's keys now."""
    tenant = await editable_tenant(request)
    key_id = request.match_info["keyId"]
    if all(key.id != key_id for key in tenant.keys):
        raise NotFound(f"Tenant {tenant.id} has no key {key_id}", error="KEY_NOT_FOUND")
    written = await write(request, revoke_edit(tenant.id, key_id))
    view = tenant_view(find_tenant(written.registry, tenant.id), datetime.now(UTC))
    return envelope(200, "Key revoked", view, etag=written.etag)


def find_tenant(registry: Registry, tenant_id: str) -> Tenant:
    """The tenant with ``tenant_id``, or 404 ``TENANT_NOT_FOUND``."""
    for tenant in registry.tenants:
        if tenant.id == tenant_id:
            return tenant
    raise NotFound(f"No tenant with id {tenant_id}", error="TENANT_NOT_FOUND")


async def editable_tenant(request: web.Request) -> Tenant:
    """The tenant a write names, noted for the audit; 409 ``READ_ONLY_TENANT`` unless it
    comes from the tenants file."""
    registry, _etag = await current(request)
    tenant = find_tenant(registry, request.match_info["id"])
    note(request).alias = tenant.alias
    kind = source_kind(tenant)
    if kind == "env":
        prefix = tenant.source
        raise RequestError(
            f"Tenant {tenant.alias} comes from the environment: change {prefix} and "
            f"{prefix}_* (in the environment or ENV_FILE), then reload",
            error="READ_ONLY_TENANT",
            status=409,
            variables=[prefix, f"{prefix}_*"],
        )
    if kind == "demo":
        raise RequestError(
            "Demo tenants exist only in demo mode; configure TENANTS_FILE to manage tenants",
            error="READ_ONLY_TENANT",
            status=409,
            variables=["TENANTS_FILE"],
        )
    return tenant


async def write(request: web.Request, edit: Edit) -> Written:
    """Apply ``edit`` to the tenants file, then to this process at once (other processes
    watching the file reload it on their next poll)."""
    ctx = admin_context(request)
    if_match = request.headers.get("If-Match")
    # Shielded: once the file is being written, a client that leaves must not stop this process
    # from serving what the file now says (the audit then records the real outcome too).
    return await asyncio.shield(_write(ctx, edit, if_match))


async def _write(ctx: AdminContext, edit: Edit, if_match: str | None) -> Written:
    # Writes of this process one at a time, and never while a reload reads the file.
    async with ctx.gateway.swap_lock:
        written = await asyncio.to_thread(ctx.tenants_file.change, edit, if_match)
        ctx.gateway.registry, ctx.seen[0] = written.registry, written.etag
    return written
