"""The application factory: routes, public routes, middleware order and lifetimes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Final

import aiohttp_cors
from aiohttp import web

from proxy.append import handle_append
from proxy.appkeys import (
    ACTIONS,
    APPEND_RUNS,
    BACKEND,
    LIMITER,
    METRICS,
    QUOTAS,
    RELOADER,
    SETTINGS,
    STATE,
    UPSTREAM,
    USAGE,
    GatewayState,
)
from proxy.config import Settings
from proxy.forwarding import action_table, handle_forward
from proxy.handlers import (
    handle_healthz,
    handle_keys,
    handle_metrics,
    handle_readyz,
    handle_spec,
    handle_status,
    handle_usage,
)
from proxy.limits import Limiter
from proxy.metrics import Metrics
from proxy.middleware import (
    auth_middleware,
    error_middleware,
    limits_middleware,
    metrics_middleware,
    request_id_middleware,
)
from proxy.nxlink import now_ms
from proxy.quotas import QuotaBook
from proxy.reload import Loader, Reloader
from proxy.state import StateBackend, open_state
from proxy.state.fallback import ResilientState
from proxy.tenants import Registry
from proxy.upstream import UpstreamClient, create_pool
from proxy.usage import UsageLedger

# Routes answered without an API key.
PUBLIC_ROUTES: Final = frozenset({"keys", "spec", "healthz", "readyz", "metrics"})
# Routes that count against a tenant's requests quotas.
COUNTED_ROUTES: Final = frozenset({"forward", "append"})
# Methods forwarded under /openapi/ (OPTIONS stays free for CORS preflights).
FORWARD_METHODS: Final = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def create_app(
    settings: Settings,
    registry: Registry,
    *,
    clock: Callable[[], int] = now_ms,
    reload: Loader | None = None,
    watch: Sequence[Path] = (),
    open_backend: Callable[[str], StateBackend] = open_state,
) -> web.Application:
    """The gateway as an aiohttp application; the only way to build one."""
    app = web.Application(
        middlewares=[
            request_id_middleware,
            metrics_middleware,
            error_middleware,
            auth_middleware(public_routes=PUBLIC_ROUTES),
            limits_middleware(counted_routes=COUNTED_ROUTES),
        ],
        client_max_size=settings.max_body_bytes,
    )
    app[SETTINGS] = settings
    app[STATE] = GatewayState(registry)
    app[ACTIONS] = action_table(settings.extra_actions)
    app[METRICS] = Metrics()
    app[APPEND_RUNS] = set()
    app.cleanup_ctx.append(_state_lifetime(open_backend))
    app.cleanup_ctx.append(_upstream_lifetime(clock))
    if reload is not None:
        sources = (settings.tenants_file, Path(settings.env_file), *watch)
        watched = [p for p in sources if p is not None]
        app[RELOADER] = Reloader(app[STATE], reload, watched, app[METRICS])
        app.cleanup_ctx.append(_reload_lifetime)
    _add_routes(app)
    if settings.cors_allow_origins:
        _enable_cors(app, settings.cors_allow_origins)
    return app


def _add_routes(app: web.Application) -> None:
    app.router.add_get("/api/openapi/status", handle_status, name="status")
    app.router.add_get("/api/openapi/keys", handle_keys, name="keys")
    app.router.add_post("/api/openapi/append-numbers", handle_append, name="append")
    app.router.add_get("/api/openapi/usage", handle_usage, name="usage")
    app.router.add_get("/api/openapi/spec.json", handle_spec, name="spec")
    app.router.add_get("/healthz", handle_healthz, name="healthz")
    app.router.add_get("/readyz", handle_readyz, name="readyz")
    app.router.add_get("/metrics", handle_metrics, name="metrics")
    forward = app.router.add_resource("/openapi/{tail:.*}", name="forward")
    for method in FORWARD_METHODS:
        forward.add_route(method, handle_forward)


def _enable_cors(app: web.Application, origins: tuple[str, ...]) -> None:
    options = aiohttp_cors.ResourceOptions(  # type: ignore[no-untyped-call]  # untyped library
        allow_credentials=False, expose_headers="*", allow_headers="*", allow_methods="*"
    )
    cors = aiohttp_cors.setup(app, defaults={origin: options for origin in origins})
    for route in list(app.router.routes()):
        cors.add(route)


def _upstream_lifetime(
    clock: Callable[[], int],
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        settings = app[SETTINGS]
        pool = create_pool(settings)
        app[UPSTREAM] = UpstreamClient(
            pool,
            timeout=settings.upstream_timeout,
            clock=clock,
            observe=app[METRICS].observe_upstream,
        )
        app[STATE].ready = True
        yield
        app[STATE].ready = False
        await _finish_runs(app)  # before the pool closes: they still send batches
        await pool.close()

    return lifetime


def _state_lifetime(
    open_backend: Callable[[str], StateBackend],
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        settings = app[SETTINGS]
        backend = open_backend(settings.state_url)
        state = app[BACKEND] = ResilientState(backend, on_error=app[METRICS].state_errors.inc)
        limiter = app[LIMITER] = Limiter(settings, state)
        book = app[QUOTAS] = QuotaBook(settings, state, observe=app[METRICS].observe_quotas)
        usage = app[USAGE] = UsageLedger(state, book.zone)
        tasks = [
            asyncio.create_task(limiter.keep_slots(), name="renew-slots"),
            asyncio.create_task(usage.keep_flushing(), name="flush-usage"),
        ]
        yield
        await _stop(tasks)
        await usage.flush()
        await state.close()

    return lifetime


async def _finish_runs(app: web.Application) -> None:
    """Let append runs whose clients left finish their batches, up to ``SHUTDOWN_GRACE``."""
    runs = app[APPEND_RUNS]
    if runs:
        await asyncio.wait(list(runs), timeout=app[SETTINGS].shutdown_grace)


async def _stop(tasks: Sequence[asyncio.Task[None]]) -> None:
    """Cancel background tasks and wait for them to end."""
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _reload_lifetime(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(app[RELOADER].watch(), name="config-reload")
    yield
    await _stop([task])
