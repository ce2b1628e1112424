"""The application factory: routes, public routes, middleware order and lifetimes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Final

from aiohttp import web

from proxy.appkeys import ACTIONS, SETTINGS, STATE, UPSTREAM, GatewayState
from proxy.config import Settings
from proxy.forwarding import action_table, handle_forward
from proxy.handlers import handle_healthz, handle_keys, handle_readyz, handle_status
from proxy.middleware import auth_middleware, error_middleware, request_id_middleware
from proxy.tenants import Registry
from proxy.upstream import UpstreamClient, create_session, now_ms

# Routes answered without an API key.
PUBLIC_ROUTES: Final = frozenset({"keys", "healthz", "readyz", "metrics"})


def create_app(
    settings: Settings, registry: Registry, *, clock: Callable[[], int] = now_ms
) -> web.Application:
    """The gateway as an aiohttp application; the only way to build one."""
    app = web.Application(
        middlewares=[
            request_id_middleware,
            error_middleware,
            auth_middleware(public_routes=PUBLIC_ROUTES),
        ],
        client_max_size=settings.max_body_bytes,
    )
    app[SETTINGS] = settings
    app[STATE] = GatewayState(registry)
    app[ACTIONS] = action_table(settings.extra_actions)
    app.cleanup_ctx.append(_upstream_lifetime(clock))
    app.router.add_get("/api/openapi/status", handle_status, name="status")
    app.router.add_get("/api/openapi/keys", handle_keys, name="keys")
    app.router.add_get("/healthz", handle_healthz, name="healthz")
    app.router.add_get("/readyz", handle_readyz, name="readyz")
    app.router.add_route("*", "/openapi/{tail:.*}", handle_forward, name="forward")
    return app


def _upstream_lifetime(
    clock: Callable[[], int],
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        settings = app[SETTINGS]
        session = create_session(settings)
        app[UPSTREAM] = UpstreamClient(session, timeout=settings.upstream_timeout, clock=clock)
        app[STATE].ready = True
        yield
        app[STATE].ready = False
        await session.close()

    return lifetime
