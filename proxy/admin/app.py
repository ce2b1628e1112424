"""The admin application factory: routes, console files, middleware order."""

from __future__ import annotations

from importlib import resources
from typing import Final

from aiohttp import web

from proxy.admin import handlers, reports
from proxy.admin.audit import AdminHandler
from proxy.admin.context import ADMIN, AdminContext
from proxy.admin.middleware import (
    error_middleware,
    headers_middleware,
    request_id_middleware,
    token_middleware,
)
from proxy.admin.wire import MAX_BODY

API: Final = "/admin/api"
CONSOLE_FILES: Final = {
    "index.html": "text/html",
    "app.js": "text/javascript",
    "app.css": "text/css",
}


def create_admin_app(context: AdminContext) -> web.Application:
    """The admin API and console as an aiohttp application (its own listener, never the
    proxy's)."""
    app = web.Application(
        middlewares=[
            request_id_middleware,
            headers_middleware,
            error_middleware,
            token_middleware(digest=context.settings.admin_token_digest),
        ],
        client_max_size=MAX_BODY,
    )
    app[ADMIN] = context
    _add_api(app.router)
    _add_console(app.router)
    return app


def _add_api(router: web.UrlDispatcher) -> None:
    router.add_get(f"{API}/tenants", handlers.handle_list)
    router.add_post(f"{API}/tenants", handlers.handle_create)
    router.add_get(f"{API}/tenants/{{id}}", handlers.handle_get)
    router.add_patch(f"{API}/tenants/{{id}}", handlers.handle_patch)
    router.add_delete(f"{API}/tenants/{{id}}", handlers.handle_delete)
    router.add_post(f"{API}/tenants/{{id}}/keys", handlers.handle_rotate)
    router.add_delete(f"{API}/tenants/{{id}}/keys/{{keyId}}", handlers.handle_revoke)
    router.add_post(f"{API}/tenants/{{id}}/test", reports.handle_test)
    router.add_get(f"{API}/usage", reports.handle_usage)
    router.add_get(f"{API}/audit", reports.handle_audit)


def _add_console(router: web.UrlDispatcher) -> None:
    """The console's three files, read once from the package (no path from the client)."""
    static = resources.files("proxy.admin") / "static"
    for name, content_type in CONSOLE_FILES.items():
        body = (static / name).read_bytes()
        path = "/admin/" if name == "index.html" else f"/admin/{name}"
        router.add_get(path, _file_handler(body, content_type))
    router.add_get("/admin", _redirect_to_console)


def _file_handler(body: bytes, content_type: str) -> AdminHandler:
    async def handle(_request: web.Request) -> web.Response:
        return web.Response(body=body, content_type=content_type, charset="utf-8")

    return handle


async def _redirect_to_console(_request: web.Request) -> web.Response:
    raise web.HTTPFound("/admin/")
