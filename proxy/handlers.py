"""Local handlers: status, the public key directory, the API document, liveness, readiness."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from proxy import __version__
from proxy.apidoc import document_bytes
from proxy.appkeys import (
    BACKEND,
    METRICS,
    QUOTAS,
    SETTINGS,
    STATE,
    USAGE,
    context,
    current_tenant,
)
from proxy.config import mask_key
from proxy.errors import NotFound, NotReady, RequestError, StateUnreachable
from proxy.state.base import StateUnavailable
from proxy.usage import parse_days, usage_report

SERVICE_NAME = "nxlink-openapi-proxy"


def envelope(message: str, data: Any = None, **extra: Any) -> web.Response:
    """A 200 answer in the gateway's ``{"code", "message", "data"}`` envelope."""
    body: dict[str, Any] = {"code": 200, "message": message}
    if data is not None:
        body["data"] = data
    body.update(extra)
    return web.json_response(body, dumps=_dumps)


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def utc_now_iso() -> str:
    """Now as ISO-8601 UTC with milliseconds and a ``Z``."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def handle_status(request: web.Request) -> web.Response:
    """Who the caller is to the gateway, and where its calls go."""
    tenant = current_tenant(request)
    return envelope(
        "OpenAPI service is running",
        {
            "service": SERVICE_NAME,
            "version": __version__,
            "timestamp": utc_now_iso(),
            "apiKey": mask_key(context(request).api_key),
            "apiKeyAlias": tenant.alias,
            "apiKeyDescription": tenant.description,
            "hasOpenApiConfig": tenant.credentials is not None,
            "openApiBaseUrl": tenant.base_url,
            "openApiBizType": tenant.biz_type,
        },
    )


async def handle_keys(request: web.Request) -> web.Response:
    """The public key directory: aliases only, never a key or a secret."""
    if not request.app[SETTINGS].public_key_directory:
        raise NotFound()
    tenants = request.app[STATE].registry.tenants
    keys = [
        {
            "alias": t.alias,
            "description": t.description,
            "hasOpenApiConfig": t.credentials is not None,
            "openApiBaseUrl": t.base_url,
            "bizType": t.biz_type,
        }
        for t in tenants
    ]
    return envelope("Available API Keys", {"totalKeys": len(keys), "keys": keys})


async def handle_spec(request: web.Request) -> web.Response:
    """The OpenAPI 3.1 document of the client-facing API."""
    return web.Response(body=document_bytes(), content_type="application/json", charset="utf-8")


async def handle_metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition of this app's metrics."""
    body = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def handle_healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers."""
    return envelope("ok", {"status": "alive"})


async def handle_readyz(request: web.Request) -> web.Response:
    """Readiness: configuration loaded and not draining. A state backend that does not answer
    is reported, not fatal: requests go on with this process's limits."""
    state = request.app[STATE]
    if state.draining:
        raise NotReady("Draining for shutdown")
    if not state.ready:
        raise NotReady("Configuration not loaded yet")
    shared = "ok" if await request.app[BACKEND].ping() else "unavailable"
    return envelope("ready", {"status": "ready", "tenants": len(state.registry), "state": shared})


async def handle_usage(request: web.Request) -> web.Response:
    """The caller's own quotas and usage of the last ``days`` days, newest first."""
    try:
        days = parse_days(request.query.get("days"))
    except ValueError as exc:
        raise RequestError(str(exc), error="INVALID_DAYS") from exc
    app = request.app
    await app[USAGE].flush()  # this process's latest counts included
    try:
        data = await usage_report(app[BACKEND], app[QUOTAS], current_tenant(request), days)
    except StateUnavailable as exc:
        raise StateUnreachable("The state backend is unavailable; usage cannot be read") from exc
    return envelope("Usage", data)
