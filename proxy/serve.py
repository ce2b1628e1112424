"""Process lifetime: event loop, listening sites, signals, demo sandbox."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Iterable, Mapping
from typing import Any, Final

from aiohttp import web

from proxy.app import create_app
from proxy.appkeys import RELOADER, STATE
from proxy.config import ConfigError, Settings, parse_settings
from proxy.environment import read_environment, secret_files
from proxy.logs import AccessLogger, setup_logging
from proxy.reload import Loader
from proxy.sandbox import create_sandbox_app
from proxy.tenants import DEMO_TENANTS, Credentials, Registry, demo_registry, load_registry

logger = logging.getLogger(__name__)

ConfigSource = tuple[Mapping[str, str], Mapping[str, str]]
LOOPBACK: Final = "127.0.0.1"


def run(main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` on uvloop when installed, else on asyncio's own loop."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux and macOS
        pass
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main)


def load_config(
    environ: Mapping[str, str], overrides: Mapping[str, str]
) -> tuple[Settings, Registry]:
    """Settings and tenants, the problems of both gathered into one ``ConfigError``."""
    env = read_environment(environ, overrides)
    problems: list[str] = []
    try:
        settings = parse_settings(env)
    except ConfigError as exc:
        problems += exc.problems
        # Still load the tenants, so that one run lists every problem.
        settings = parse_settings({"TENANTS_FILE": env.get("TENANTS_FILE", "")})
    try:
        registry = load_registry(env, settings)
    except ConfigError as exc:
        raise ConfigError(problems + exc.problems) from None
    if problems:
        raise ConfigError(problems)
    return settings, registry


def config_loader(source: ConfigSource) -> Loader:
    """Re-reads ``.env``, the environment and the tenants file into a new registry (reload)."""

    def load() -> Registry:
        _settings, registry = load_config(*source)
        if len(registry) == 0:
            raise ConfigError(["the new configuration has no tenant; refusing to drop them all"])
        return registry

    return load


def run_gateway(settings: Settings, registry: Registry, *, source: ConfigSource, demo: bool) -> int:
    """Serve until SIGTERM/SIGINT, then drain for up to ``SHUTDOWN_GRACE`` seconds."""
    setup_logging(settings.log_level)
    reloadable = None if demo else source
    if settings.workers > 1 and not demo:
        return _supervise(settings, registry, reloadable)
    if settings.workers > 1:
        logger.warning("demo mode runs one worker: the sandbox keeps its state in memory")
    run(_serve(settings, registry, demo=demo, source=reloadable))
    return 0


def _supervise(settings: Settings, registry: Registry, source: ConfigSource | None) -> int:
    """Fork WORKERS processes sharing the port (SO_REUSEPORT); relay signals; wait for all."""
    context = multiprocessing.get_context("fork")
    workers = [
        context.Process(target=_worker, args=(settings, registry, source), name=f"worker-{n}")
        for n in range(settings.workers)
    ]
    for worker in workers:
        worker.start()

    def relay(signum: int, _frame: object) -> None:
        # No liveness check here: it would reap a child under join()'s feet. A worker that is
        # already gone is skipped; letting the error out would leave the others unsignalled
        # while multiprocessing's exit hook waits for them forever.
        for worker in workers:
            if worker.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, relay)
    for worker in workers:
        worker.join()
    return max(_exit_status(w.exitcode) for w in workers)


def _exit_status(code: int | None) -> int:
    """A worker's exit code; killed by a signal other than a stop request counts as failure."""
    if code is None or code >= 0:
        return code or 0
    return 0 if -code in (signal.SIGTERM, signal.SIGINT) else 128 - code


def _worker(settings: Settings, registry: Registry, source: ConfigSource | None) -> None:
    run(_serve(settings, registry, demo=False, source=source, reuse_port=True))


def run_sandbox(host: str, port: int, accounts: Iterable[Credentials]) -> None:
    """Serve the nxlink emulator alone (demo accounts when none are given)."""
    setup_logging("info")
    run(_serve_sandbox(host, port, list(accounts)))


async def start_site(
    app: web.Application, host: str, port: int, *, reuse_port: bool = False, grace: float = 0
) -> web.AppRunner:
    """Set up ``app`` and listen on ``host:port``."""
    # handler_cancellation: a client that goes away cancels its handler, which closes its
    # upstream exchange and frees the connection slot at once (not at the next write).
    runner = web.AppRunner(
        app,
        access_log_class=AccessLogger,
        handle_signals=False,
        shutdown_timeout=grace,
        handler_cancellation=True,
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, reuse_port=reuse_port or None).start()
    except BaseException:  # e.g. the port is taken: close what setup opened, then fail
        await runner.cleanup()
        raise
    return runner


def bound_port(runner: web.AppRunner) -> int:
    """The port the runner's first site listens on (useful after binding port 0)."""
    return int(runner.addresses[0][1])


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def _serve(
    settings: Settings,
    registry: Registry,
    *,
    demo: bool,
    source: ConfigSource | None,
    reuse_port: bool = False,
) -> None:
    stop = _stop_event()
    async with contextlib.AsyncExitStack() as started:
        if demo:
            sandbox = await start_site(create_sandbox_app(_demo_accounts()), LOOPBACK, 0)
            started.push_async_callback(sandbox.cleanup)
            registry = demo_registry(f"http://{LOOPBACK}:{bound_port(sandbox)}")
        await _serve_until(
            stop, settings, registry, demo=demo, source=source, reuse_port=reuse_port
        )


async def _serve_until(
    stop: asyncio.Event,
    settings: Settings,
    registry: Registry,
    *,
    demo: bool,
    source: ConfigSource | None,
    reuse_port: bool,
) -> None:
    if source is None:  # demo mode: nothing to reload
        app = create_app(settings, registry)
    else:
        # Mounted secrets (NAME_FILE) are watched too: a rotated secret file reloads itself.
        watch = secret_files(*source)
        app = create_app(settings, registry, reload=config_loader(source), watch=watch)
    if RELOADER in app:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, app[RELOADER].request)
    runner = await start_site(
        app, settings.host, settings.port, reuse_port=reuse_port, grace=settings.shutdown_grace
    )
    # Start-up objects (modules, app, registry) live for good: keep them out of GC passes.
    gc.freeze()
    logger.info(
        "gateway listening",
        extra={
            "host": settings.host,
            "port": bound_port(runner),
            "tenants": len(registry),
            "demo": demo,
        },
    )
    if demo:
        _demo_banner(settings.host, bound_port(runner))
    await stop.wait()
    logger.info("shutting down", extra={"grace_s": settings.shutdown_grace})
    app[STATE].draining = True
    await runner.cleanup()


async def _serve_sandbox(host: str, port: int, accounts: list[Credentials]) -> None:
    stop = _stop_event()
    runner = await start_site(create_sandbox_app(accounts or _demo_accounts()), host, port)
    logger.info(
        "sandbox listening",
        extra={
            "host": host,
            "port": bound_port(runner),
            "accounts": len(accounts) or len(DEMO_TENANTS),
        },
    )
    await stop.wait()
    await runner.cleanup()


def _demo_accounts() -> list[Credentials]:
    return [t.credentials for t in demo_registry("http://demo").tenants if t.credentials]


def _demo_banner(host: str, port: int) -> None:
    shown = LOOPBACK if host in ("0.0.0.0", "::") else host
    lines = [
        "=" * 72,
        "DEMO MODE: no tenant is configured, so the gateway serves two demo tenants",
        "against the bundled nxlink sandbox (an in-memory emulator, not the real nxlink).",
        "",
        *(f"  {alias}: x-api-key: {key}" for alias, _desc, key, _ak in DEMO_TENANTS),
        "",
        f"  try: curl -H 'x-api-key: {DEMO_TENANTS[0][2]}' http://{shown}:{port}/api/openapi/status",
        "Configure real tenants in .env or a tenants file (see config/) to leave demo mode.",
        "=" * 72,
    ]
    print("\n".join(lines), file=sys.stderr, flush=True)
