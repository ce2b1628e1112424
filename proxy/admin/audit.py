"""The audit trail: every admin write, whatever its result, in the state backend and the log."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from aiohttp import web

from proxy.admin.context import admin_context
from proxy.appkeys import CONTEXT
from proxy.errors import GatewayError
from proxy.state import StateUnavailable

logger = logging.getLogger(__name__)

AUDIT_KEEP: Final = 10_000


@dataclass(slots=True)
class AuditNote:
    """What a write handler tells the audit about the tenant it touches."""

    action: str
    tenant_id: str = ""
    alias: str = ""


NOTE: Final = web.RequestKey("audit_note", AuditNote)


def note(request: web.Request) -> AuditNote:
    """This write's audit note (the ``audited`` wrapper put it there)."""
    return request[NOTE]


AdminHandler = Callable[[web.Request], Awaitable[web.Response]]


def audited(action: str) -> Callable[[AdminHandler], AdminHandler]:
    """Record the wrapped write handler's every call: ``ok`` or the error code it ended with."""

    def wrap(handler: AdminHandler) -> AdminHandler:
        @functools.wraps(handler)
        async def wrapped(request: web.Request) -> web.Response:
            request[NOTE] = AuditNote(action, request.match_info.get("id", ""))
            result = "INTERNAL_ERROR"
            try:
                response = await handler(request)
                result = "ok"
                return response
            except GatewayError as exc:
                result = exc.code
                raise
            finally:
                await record(request, result)

        return wrapped

    return wrap


async def record(request: web.Request, result: str) -> None:
    """Keep the entry in the state backend and log it as a JSON line; a backend that is down
    costs the entry there, never the write that already happened."""
    mark = request[NOTE]
    entry = {
        "time": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "action": mark.action,
        "tenantId": mark.tenant_id,
        "alias": mark.alias,
        "requestId": request[CONTEXT].request_id,
        "result": result,
    }
    logger.info("admin %s %s", entry["action"], result, extra={"audit": entry})
    try:
        await admin_context(request).state.append_audit(json.dumps(entry).encode(), AUDIT_KEEP)
    except StateUnavailable:
        logger.warning("audit entry not kept: the state backend is unavailable")


async def read_entries(request: web.Request, limit: int) -> list[dict[str, Any]]:
    """The newest ``limit`` audit entries, newest first."""
    raw = await admin_context(request).state.read_audit(limit)
    return [json.loads(item) for item in raw]
