"""Read-only reports: usage per tenant and day, the audit log, a credentials test."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import date, datetime, timedelta
from typing import Any, Final
from zoneinfo import ZoneInfo

from aiohttp import web
from yarl import URL

from proxy.admin.audit import read_entries
from proxy.admin.context import admin_context
from proxy.admin.handlers import find_tenant
from proxy.admin.wire import envelope, int_param
from proxy.appkeys import CONTEXT
from proxy.errors import GatewayError
from proxy.nxlink import SUCCESS_CODES
from proxy.quotas import QuotaBook
from proxy.state import StateUnavailable
from proxy.state.fallback import ResilientState
from proxy.tenants import Tenant
from proxy.upstream import UpstreamClient, UpstreamRequest, json_headers
from proxy.usage import day_entry

PROBE_PATH: Final = "/openapi/aiagent/task/list"
PROBE_ACTION: Final = "pageCallTaskInfo"
PROBE_BODY: Final = b'{"pageNumber":1,"pageSize":1}'
PROBE_MAX_ANSWER: Final = 64 * 1024


def last_days(today: date, days: int) -> list[str]:
    """``days`` dates ending today, newest first."""
    return [(today - timedelta(days=n)).isoformat() for n in range(days)]


async def handle_usage(request: web.Request) -> web.Response:
    """Usage of every tenant, or of ``?tenant=ID``, over the last ``?days=N`` days."""
    ctx = admin_context(request)
    days = int_param(request, "days", 7, 1, 90)
    registry = ctx.gateway.registry
    wanted = request.query.get("tenant")
    tenants = [find_tenant(registry, wanted)] if wanted else list(registry.tenants)
    zone = ctx.settings.quota_timezone
    dates = last_days(datetime.now(ZoneInfo(zone)).date(), days)
    try:
        rows = [await _tenant_usage(request, t, dates) for t in tenants]
    except StateUnavailable as exc:
        raise GatewayError(
            "The state backend is unavailable", error="STATE_UNAVAILABLE", status=503
        ) from exc
    return envelope(200, "Usage", {"timezone": zone, "tenants": rows})


async def _tenant_usage(request: web.Request, tenant: Tenant, dates: list[str]) -> dict[str, Any]:
    """One tenant's row: the tenant usage endpoint's shape (quotas included) plus its id."""
    ctx = admin_context(request)
    counters = await ctx.state.read_usage(tenant.id, dates)
    book = QuotaBook(ctx.settings, ResilientState(ctx.state))
    quotas = [status.shown() for status in await book.used(tenant)]
    days = [day_entry(day, counters.get(day, {})) for day in dates]
    return {"id": tenant.id, "apiKeyAlias": tenant.alias, "quotas": quotas, "days": days}


async def handle_audit(request: web.Request) -> web.Response:
    """The newest audit entries, newest first."""
    limit = int_param(request, "limit", 100, 1, 10_000)
    try:
        entries = await read_entries(request, limit)
    except StateUnavailable as exc:
        raise GatewayError(
            "The state backend is unavailable", error="STATE_UNAVAILABLE", status=503
        ) from exc
    return envelope(200, "Audit log", {"entries": entries})


async def handle_test(request: web.Request) -> web.Response:
    """A signed, harmless ``task/list`` (page size 1) to the tenant's nxlink."""
    ctx = admin_context(request)
    tenant = find_tenant(ctx.gateway.registry, request.match_info["id"])
    result = await probe(ctx.upstream(), tenant, request[CONTEXT].request_id)
    return envelope(200, "Credentials test", result)


async def probe(client: UpstreamClient, tenant: Tenant, request_id: str) -> dict[str, Any]:
    """nxlink's answer to the probe: ok, HTTP status, its code and message, latency."""
    result: dict[str, Any] = {"ok": False, "httpStatus": None, "nxlinkCode": None}
    if tenant.credentials is None:
        return result | {"message": "No accessKey/accessSecret configured", "latencyMs": 0}
    url = URL(tenant.base_url + PROBE_PATH)
    headers = json_headers(request_id)
    call = UpstreamRequest(
        "POST",
        url,
        headers,
        PROBE_ACTION,
        tenant.credentials,
        PROBE_BODY,
        tenant=tenant.alias,
        tenant_id=tenant.id,
    )
    started = time.perf_counter()
    try:
        async with client.open(call) as response, asyncio.timeout(client.timeout):
            status, raw = response.status, await _read_bounded(response.iter_chunks())
    except GatewayError as exc:
        return result | {"message": exc.message, "latencyMs": _ms(started)}
    except (TimeoutError, ConnectionError) as exc:
        message = f"nxlink's answer did not arrive whole ({exc.__class__.__name__})"
        return result | {"message": message, "latencyMs": _ms(started)}
    return result | _answer(status, raw) | {"latencyMs": _ms(started)}


async def _read_bounded(chunks: Any) -> bytes:
    body = b""
    async for chunk in chunks:
        body += chunk
        if len(body) > PROBE_MAX_ANSWER:
            break
    return body[:PROBE_MAX_ANSWER]


def _answer(status: int, raw: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        doc = None
    doc = doc if isinstance(doc, dict) else {}
    code = doc.get("code") if type(doc.get("code")) is int else None
    said = doc.get("message")
    message = said if isinstance(said, str) else f"HTTP {status}"
    ok = status < 300 and code in SUCCESS_CODES
    return {"ok": ok, "httpStatus": status, "nxlinkCode": code, "message": message[:500]}


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)
