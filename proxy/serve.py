"""Process lifetime: event loop, listening sites, signals, demo sandbox."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import multiprocessing
import os
import signal
import ssl
import sys
import tempfile
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping
from dataclasses import replace
from typing import Any, Final

from aiohttp import web

from proxy.admin import AdminContext, TenantsFile, create_admin_app
from proxy.app import create_app
from proxy.appkeys import BACKEND, RELOADER, STATE, UPSTREAM
from proxy.config import ConfigError, Settings, mask_key, parse_settings
from proxy.environment import read_environment, secret_files
from proxy.logs import AccessLogger, setup_logging
from proxy.reload import Loader
from proxy.sandbox import create_sandbox_app
from proxy.state import REACHABLE, state_report
from proxy.tenants import (
    DEMO_TENANTS,
    Credentials,
    Registry,
    accounts_of,
    demo_registry,
    load_registry,
    pointed_at,
)
from proxy.tls import CertificatePair, served_context, server_context
from proxy.typos import refuse_placeholders, unknown_variables

logger = logging.getLogger(__name__)

ConfigSource = tuple[Mapping[str, str], Mapping[str, str]]
LOOPBACK: Final = "127.0.0.1"
LISTEN_ERRORS: Final = {
    errno.EADDRINUSE: "the address is already in use (another process listens there)",
    errno.EACCES: "permission denied (ports below 1024 need privileges)",
}


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
        refuse_placeholders(registry.placeholders)
        return registry

    return load


def run_gateway(
    settings: Settings,
    registry: Registry,
    *,
    source: ConfigSource,
    demo: bool,
    sandbox: bool = False,
) -> int:
    """Serve until SIGTERM/SIGINT, then drain for up to ``SHUTDOWN_GRACE`` seconds.

    ``demo``: the demo tenants, ``sandbox``: the configured ones, against an in-process sandbox
    (no reload there: a reloaded tenant would go to its real base URL)."""
    pair = CertificatePair.of(settings)
    if pair is not None:  # bad PEM: one clear line before any worker starts (each loads its own)
        server_context(pair)
    setup_logging(settings.log_level)
    for slip in unknown_variables(read_environment(*source)):
        logger.warning("%s", slip)
    emulated = demo or sandbox
    reloadable = None if emulated else source
    if settings.workers > 1 and not emulated:
        return _supervise(settings, registry, reloadable)
    if settings.workers > 1:
        logger.warning("demo and sandbox modes run one worker: the sandbox keeps state in memory")
    run(_announce_state(settings.state_url))
    run(_serve(settings, registry, demo=demo, sandbox=sandbox, source=reloadable))
    return 0


async def _announce_state(url: str, private: bool = False) -> None:
    """Log the state backend (password masked); an unreachable one is a warning, not fatal."""
    line, reach = await state_report(url)
    if private:
        line = f"state {url}: shared by this gateway's workers, removed when it stops"
    logger.info("%s", line)
    if reach != REACHABLE:
        logger.warning(
            "state backend %s: serving on, with limits per process until it answers", reach
        )


@contextlib.contextmanager
def _private_state(settings: Settings) -> Iterator[Settings]:
    """Without ``STATE_URL``, the workers share a SQLite file in a folder only this process
    can read (mode 0700), removed when it exits."""
    if settings.state_url:
        run(_announce_state(settings.state_url))
        yield settings
        return
    with tempfile.TemporaryDirectory(prefix="nxlink-proxy-state-") as folder:
        url = f"sqlite:///{folder}/state.db"
        run(_announce_state(url, private=True))
        yield replace(settings, state_url=url)


def _supervise(settings: Settings, registry: Registry, source: ConfigSource | None) -> int:
    """Fork WORKERS processes sharing the port (SO_REUSEPORT); relay signals; wait for all."""
    with _private_state(settings) as shared:
        return _fork_workers(shared, registry, source)


def _fork_workers(settings: Settings, registry: Registry, source: ConfigSource | None) -> int:
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
    try:
        run(_serve(settings, registry, demo=False, source=source, reuse_port=True))
    except ConfigError as exc:  # a forked worker has no CLI around it: one line, exit 1
        print("\n".join(exc.problems), file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def run_sandbox(host: str, port: int, accounts: Iterable[Credentials]) -> None:
    """Serve the nxlink emulator alone (demo accounts when none are given)."""
    setup_logging("info")
    run(_serve_sandbox(host, port, list(accounts)))


async def start_site(
    app: web.Application,
    host: str,
    port: int,
    *,
    reuse_port: bool = False,
    grace: float = 0,
    ssl_context: ssl.SSLContext | None = None,
) -> web.AppRunner:
    """Set up ``app`` and listen on ``host:port`` (HTTPS with ``ssl_context``)."""
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
    site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None, ssl_context=ssl_context)
    try:
        await site.start()
    except BaseException as exc:  # e.g. the port is taken: close what setup opened, then fail
        await runner.cleanup()
        if isinstance(exc, OSError) and exc.errno in LISTEN_ERRORS:
            raise ConfigError([listen_problem(host, port, exc.errno)]) from None
        raise
    return runner


def listen_problem(host: str, port: int, code: int) -> str:
    """One line for a port that cannot be had: which one, why, and how to choose another."""
    other = port + 1 if port < 65535 else port - 1
    return (
        f"cannot listen on {host}:{port}: {LISTEN_ERRORS[code]}; stop what holds it, or choose "
        f"another port with PORT={other} or --port {other}"
    )


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
    sandbox: bool = False,
) -> None:
    stop = _stop_event()
    async with contextlib.AsyncExitStack() as started:
        if demo or sandbox:
            accounts = _demo_accounts() if demo else accounts_of(registry)
            emulator = await start_site(create_sandbox_app(accounts), LOOPBACK, 0)
            started.push_async_callback(emulator.cleanup)
            url = f"http://{LOOPBACK}:{bound_port(emulator)}"
            registry = demo_registry(url) if demo else pointed_at(registry, url)
            if sandbox:
                _sandbox_banner(registry, url)
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
    app = _gateway_app(settings, registry, source)
    async with served_context(CertificatePair.of(settings)) as ssl_context:
        runner = await start_site(
            app,
            settings.host,
            settings.port,
            reuse_port=reuse_port,
            grace=settings.shutdown_grace,
            ssl_context=ssl_context,
        )
        admin = await _start_admin(app, settings, source, reuse_port=reuse_port)
        # Start-up objects (modules, app, registry) live for good: keep them out of GC passes.
        gc.freeze()
        port = bound_port(runner)
        https = ssl_context is not None
        logger.info(
            "gateway listening",
            extra={
                "host": settings.host,
                "port": port,
                "https": https,
                "tenants": len(registry),
                "demo": demo,
            },
        )
        if demo:
            _demo_banner(settings.host, port, https)
        await stop.wait()
        await _shut_down(stop, app, runner, settings)
        if admin is not None:
            await admin.cleanup()


def _gateway_app(
    settings: Settings, registry: Registry, source: ConfigSource | None
) -> web.Application:
    if source is None:  # demo mode: nothing to reload
        return create_app(settings, registry)
    # Mounted secrets (NAME_FILE) are watched too: a rotated secret file reloads itself.
    watch = secret_files(*source)
    app = create_app(settings, registry, reload=config_loader(source), watch=watch)
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, app[RELOADER].request)
    return app


async def _shut_down(
    stop: asyncio.Event, app: web.Application, runner: web.AppRunner, settings: Settings
) -> None:
    """Not ready at once; keep serving new connections SHUTDOWN_DELAY seconds (so load
    balancers take the gateway out first), then close the listener and drain."""
    delay, grace = settings.shutdown_delay, settings.shutdown_grace
    logger.info("shutting down", extra={"delay_s": delay, "grace_s": grace})
    app[STATE].draining = True
    if delay > 0:
        stop.clear()  # a second SIGTERM/SIGINT cuts the delay short
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
        logger.info("closing the listener", extra={"grace_s": grace})
    await runner.cleanup()


async def _start_admin(
    app: web.Application, settings: Settings, source: ConfigSource | None, *, reuse_port: bool
) -> web.AppRunner | None:
    """The admin listener (when ADMIN_PORT is set), sharing the gateway's live registry and
    upstream client."""
    if settings.admin_port is None:
        return None
    validate = None if source is None else tenants_validator(settings, source)
    context = AdminContext(
        settings,
        app[STATE],
        app[BACKEND].shared,  # the gateway's own backend: its usage, one audit log
        lambda: app[UPSTREAM],
        TenantsFile(settings.tenants_file, validate),
    )
    admin_app = create_admin_app(context)
    runner = await start_site(
        admin_app, settings.admin_host, settings.admin_port, reuse_port=reuse_port
    )
    logger.info("admin listening", extra={"host": settings.admin_host, "port": bound_port(runner)})
    return runner


def tenants_validator(settings: Settings, source: ConfigSource) -> Callable[[Any], Registry]:
    """Checks a tenants document as start-up would, with the environment as it is now."""

    def validate(document: Any) -> Registry:
        registry = load_registry(read_environment(*source), settings, document=document)
        # As a reload would refuse it: a file every process then refuses must not be written.
        refuse_placeholders(registry.placeholders)
        return registry

    return validate


async def _serve_sandbox(host: str, port: int, accounts: list[Credentials]) -> None:
    stop = _stop_event()
    accounts = accounts or _demo_accounts()
    runner = await start_site(create_sandbox_app(accounts), host, port)
    logger.info(
        "sandbox listening",
        extra={
            "host": host,
            "port": bound_port(runner),
            "accounts": len(accounts),
            # Masked: enough to see whether the gateway's tenants and this sandbox agree.
            "access_keys": [f"{mask_key(a.access_key)} (bizType {a.biz_type})" for a in accounts],
        },
    )
    await stop.wait()
    await runner.cleanup()


def _demo_accounts() -> list[Credentials]:
    return accounts_of(demo_registry("http://demo"))


def _sandbox_banner(registry: Registry, url: str) -> None:
    lines = [
        "=" * 72,
        f"SANDBOX MODE: the {len(registry)} configured tenant(s) are served against the bundled",
        f"nxlink sandbox at {url} (an in-memory emulator): nothing is sent to nxlink.",
        "",
        *(
            f"  {t.alias}: accessKey {mask_key(t.credentials.access_key) if t.credentials else '-'}"
            for t in registry.tenants
        ),
        "",
        "Drop --sandbox to send the same tenants' calls to their real base URLs.",
        "=" * 72,
    ]
    print("\n".join(lines), file=sys.stderr, flush=True)


def _demo_banner(host: str, port: int, https: bool = False) -> None:
    shown = LOOPBACK if host in ("0.0.0.0", "::") else host
    scheme = "https" if https else "http"
    lines = [
        "=" * 72,
        "DEMO MODE: no tenant is configured, so the gateway serves two demo tenants",
        "against the bundled nxlink sandbox (an in-memory emulator, not the real nxlink).",
        "",
        *(f"  {alias}: x-api-key: {key}" for alias, _desc, key, _ak in DEMO_TENANTS),
        "",
        f"  try: curl -H 'x-api-key: {DEMO_TENANTS[0][2]}' {scheme}://{shown}:{port}/api/openapi/status",
        "Configure real tenants in .env or a tenants file (see config/) to leave demo mode.",
        "=" * 72,
    ]
    print("\n".join(lines), file=sys.stderr, flush=True)
