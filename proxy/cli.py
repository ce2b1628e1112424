"""The command line: serve, check, sign, sandbox, keygen, usage."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

from proxy import __version__
from proxy.config import ConfigError, Secret, Settings, mask_key
from proxy.environment import process_environ, read_environment
from proxy.limits import TenantPolicy
from proxy.nxlink import now_ms
from proxy.serve import load_config, run_gateway, run_sandbox
from proxy.signing import sign_headers, string_to_sign
from proxy.state import REACHABLE, state_report
from proxy.tenants import (
    Credentials,
    Registry,
    Tenant,
    accounts_of,
    generate_key,
    hash_key,
)
from proxy.typos import placeholder_problems, refuse_placeholders, unknown_variables
from proxy.usage import MAX_DAYS, parse_days, read_reports, report_lines

logger = logging.getLogger(__name__)

NO_TENANTS: Final = (
    "no tenant is configured: set EXTERNAL_API_KEY_1 and EXTERNAL_API_KEY_1_OPENAPI_* (or a "
    "TENANTS_FILE), see config/.env.example; or run 'make run' (.venv/bin/nxlink-proxy serve "
    "--demo) to try the gateway against the bundled sandbox"
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command and its help."""
    parser = argparse.ArgumentParser(
        prog="nxlink-proxy",
        description="Multi-tenant API-key gateway for the nxlink OpenAPI.",
        epilog="Settings come from the environment and .env; a flag beats its variable.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    _add_serve(commands.add_parser("serve", help="run the gateway (default)"))
    _config_flags(commands.add_parser("check", help="validate configuration, list the tenants"))
    _add_sign(commands.add_parser("sign", help="print the signed upstream headers as JSON"))
    _add_sandbox(commands.add_parser("sandbox", help="run the nxlink emulator alone"))
    commands.add_parser("keygen", help="print a new random API key and its sha256: hash")
    _add_usage(commands.add_parser("usage", help="print each tenant's quotas and daily usage"))
    return parser


def _add_serve(serve: argparse.ArgumentParser) -> None:
    _config_flags(serve)
    serve.add_argument("--host", help="listen address (HOST, default 0.0.0.0)")
    serve.add_argument("--port", help="listen port (PORT, default 8001)")
    serve.add_argument("--workers", help="processes sharing the port (WORKERS, default 1)")
    serve.add_argument(
        "--demo",
        action="store_true",
        help="with no tenant configured, serve the two demo tenants against an in-process sandbox",
    )
    serve.add_argument(
        "--sandbox",
        action="store_true",
        help="serve the configured tenants, each against an in-process sandbox that accepts "
        "their credentials (an integration dry run: nothing is sent to nxlink)",
    )


def _add_sign(sign: argparse.ArgumentParser) -> None:
    _config_flags(sign)
    sign.add_argument("--action", required=True, help="nxlink action, e.g. callAppend")
    body = sign.add_mutually_exclusive_group()
    body.add_argument("--body", default="", help="request body exactly as it will be sent")
    body.add_argument("--body-file", type=Path, help="file holding the exact request body")
    sign.add_argument(
        "--multipart",
        action="store_true",
        help="the body is multipart/form-data (left out of the signature)",
    )
    who = sign.add_mutually_exclusive_group()
    who.add_argument("--api-key", help="take the credentials of the tenant with this key")
    who.add_argument("--alias", help="take the credentials of the tenant with this alias")
    sign.add_argument("--access-key", help="nxlink accessKey (instead of a tenant)")
    sign.add_argument("--access-secret", help="nxlink accessSecret (instead of a tenant)")
    sign.add_argument("--biz-type", default="8", help="nxlink bizType (default 8)")
    sign.add_argument("--algorithm", choices=("md5", "sha256"), help="default: tenant's or md5")
    sign.add_argument("--ts", type=int, help="epoch milliseconds (default: now)")
    sign.add_argument(
        "--show-string",
        action="store_true",
        help="also print the string to sign, secret hidden, on stderr",
    )


def _add_sandbox(sandbox: argparse.ArgumentParser) -> None:
    _config_flags(sandbox)
    sandbox.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    sandbox.add_argument("--port", type=int, default=8002, help="listen port (default 8002)")


def _add_usage(usage: argparse.ArgumentParser) -> None:
    _config_flags(usage)
    usage.add_argument("--tenant", help="alias of one tenant (default: every tenant)")
    usage.add_argument("--days", default="7", help=f"days to show, 1 to {MAX_DAYS} (default 7)")
    usage.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--env-file", help="dotenv file to read (ENV_FILE, default .env)")
    parser.add_argument("--tenants", help="tenants JSON file (TENANTS_FILE)")


def _overrides(args: argparse.Namespace) -> dict[str, str]:
    """CLI flags written under their variable names, so they win the one merge."""
    flags = {
        "ENV_FILE": "env_file",
        "TENANTS_FILE": "tenants",
        "HOST": "host",
        "PORT": "port",
        "WORKERS": "workers",
    }
    return {
        name: str(getattr(args, attr))
        for name, attr in flags.items()
        if getattr(args, attr, None) is not None
    }


def _load(args: argparse.Namespace, environ: Mapping[str, str]) -> tuple[Settings, Registry]:
    return load_config(environ, _overrides(args))


def cmd_serve(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """Run the gateway until SIGTERM/SIGINT."""
    settings, registry = _load(args, environ)
    if len(registry) == 0 and not args.demo:
        raise ConfigError([NO_TENANTS])
    if not args.sandbox:
        refuse_placeholders(registry.placeholders)
    if args.demo and len(registry) > 0:
        print("tenants are configured, so --demo is ignored", file=sys.stderr)
    return run_gateway(
        settings,
        registry,
        source=(dict(environ), _overrides(args)),
        demo=args.demo and len(registry) == 0,
        sandbox=args.sandbox and len(registry) > 0,
    )


def cmd_check(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """Validate the configuration and print the tenant table, secrets masked."""
    settings, registry = _load(args, environ)
    if len(registry) == 0:
        raise ConfigError([NO_TENANTS])
    slips = unknown_variables(read_environment(environ, _overrides(args)))
    slips += placeholder_problems(registry.placeholders)
    if slips:
        raise ConfigError(slips)
    print(f"{len(registry)} tenant(s) configured; settings OK")
    print(describe_check_state(settings))
    for tenant in registry.tenants:
        print("\n".join(describe_tenant(tenant, settings)))
    for warning in registry.warnings:
        print(f"warning: {warning}")
    return 0


def describe_check_state(settings: Settings) -> str:
    """The state backend's line in ``check``, and whether it answers now."""
    if not settings.state_url and settings.workers > 1:
        return "state: a private SQLite file shared by the workers, removed when the gateway stops"
    line, reach = asyncio.run(state_report(settings.state_url))
    return f"{line}; {reach}" if reach == REACHABLE else f"{line}\nwarning: state backend {reach}"


def describe_tenant(tenant: Tenant, settings: Settings) -> list[str]:
    """A tenant's lines in ``check``: keys as hints, no secret, the limits in force."""
    creds = tenant.credentials
    policy = TenantPolicy.of(tenant, settings)
    rate = f"{policy.rate:g} rps, burst {policy.burst}" if policy.rate else "off"
    batch = tenant.limits.append_batch_size or settings.append_batch_size
    openapi = (
        "MISSING accessKey/accessSecret"
        if creds is None
        else f"accessKey {mask_key(creds.access_key)}, accessSecret <hidden>, "
        f"algorithm {creds.algorithm}"
    )
    return [
        f"- {tenant.alias} [{tenant.source}]",
        f"    keys:      {', '.join(k.hint for k in tenant.keys)}",
        f"    baseUrl:   {tenant.base_url}  bizType: {tenant.biz_type}",
        f"    openapi:   {openapi}",
        f"    limits:    rate {rate}, in-flight {policy.max_inflight or 'off'}, "
        f"append batch {batch}",
    ]


def cmd_sign(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """Print the six upstream headers for one request as JSON."""
    creds = _sign_credentials(args, environ)
    body = args.body_file.read_bytes() if args.body_file else args.body.encode()
    ts = args.ts if args.ts is not None else now_ms()
    headers = sign_headers(creds, args.action, body, ts, multipart=args.multipart)
    print(json.dumps(headers, indent=2))
    if args.show_string:
        hidden = Credentials(creds.access_key, Secret("<accessSecret>"), creds.biz_type)
        shown = string_to_sign(hidden, args.action, ts, body, multipart=args.multipart)
        print(shown.decode("utf-8", "replace"), file=sys.stderr)
    return 0


def _sign_credentials(args: argparse.Namespace, environ: Mapping[str, str]) -> Credentials:
    if args.access_key or args.access_secret:
        if not (args.access_key and args.access_secret):
            raise ConfigError(["sign: give both --access-key and --access-secret"])
        return Credentials(
            args.access_key, Secret(args.access_secret), args.biz_type, args.algorithm or "md5"
        )
    if not (args.api_key or args.alias):
        raise ConfigError(
            [
                "sign: give --api-key or --alias of a configured tenant, or "
                "--access-key and --access-secret"
            ]
        )
    _, registry = _load(args, environ)
    if args.api_key:
        match = registry.lookup(args.api_key)
        tenant = match.tenant if match else None
    else:
        tenant = next((t for t in registry.tenants if t.alias == args.alias), None)
    if tenant is None or tenant.credentials is None:
        who = mask_key(args.api_key) if args.api_key else args.alias
        raise ConfigError([f"sign: no configured tenant {who} with accessKey/accessSecret"])
    creds = tenant.credentials
    if args.algorithm:
        creds = Credentials(creds.access_key, creds.access_secret, creds.biz_type, args.algorithm)
    return creds


def cmd_sandbox(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """Run the nxlink emulator with the configured tenants' accounts (demo ones if none)."""
    _, registry = _load(args, environ)
    run_sandbox(args.host, args.port, accounts_of(registry))
    return 0


def cmd_keygen(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """Print a new random key and the ``sha256:`` hash to configure instead of it."""
    key = generate_key()
    print(json.dumps({"apiKey": key, "apiKeyHash": "sha256:" + hash_key(key).hex()}, indent=2))
    return 0


def cmd_usage(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """Print the quotas and daily usage of every tenant (or one) from ``STATE_URL``."""
    settings, registry = _load(args, environ)
    if not settings.state_url or settings.state_url.startswith("memory:"):
        raise ConfigError(
            [
                f"usage: STATE_URL is {settings.state_url or 'not set (memory://)'}: that state "
                "lives inside each gateway process (with WORKERS > 1 and no STATE_URL, in a "
                "private file) and cannot be read from here",
                "set STATE_URL=sqlite:///path/state.db (one host) or redis://host:6379/0 for the "
                "gateway and for this command",
            ]
        )
    tenants = [t for t in registry.tenants if args.tenant in (None, t.alias)]
    if not tenants:
        aliases = ", ".join(t.alias for t in registry.tenants) or "none"
        raise ConfigError([f"usage: no tenant with alias {args.tenant!r}; configured: {aliases}"])
    try:
        days = parse_days(args.days)
    except ValueError as exc:
        raise ConfigError([f"usage: --days {args.days}: {exc}"]) from None
    reports = asyncio.run(read_reports(settings, tenants, days))
    if args.json:
        print(json.dumps(reports, ensure_ascii=False, indent=2))
        return 0
    for report in reports:
        print("\n".join(report_lines(report)))
    return 0


COMMANDS: Final = {
    "serve": cmd_serve,
    "check": cmd_check,
    "sign": cmd_sign,
    "sandbox": cmd_sandbox,
    "keygen": cmd_keygen,
    "usage": cmd_usage,
}


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Parse ``argv``, run the sub-command and return its exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if (
        not args_list
        or args_list[0].startswith("-")
        and args_list[0] not in ("-h", "--help", "--version")
    ):
        args_list.insert(0, "serve")
    args = parser.parse_args(args_list)
    try:
        return COMMANDS[args.command](args, process_environ() if environ is None else environ)
    except ConfigError as exc:
        print("configuration error:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # the CLI's last resort: one line, no traceback for a user
        print(f"error: {exc.__class__.__name__}: {exc}", file=sys.stderr)
        return 1
