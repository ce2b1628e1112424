"""Gateway settings: ``.env`` < environment < CLI flags, merged once, cast and validated."""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from dotenv import dotenv_values

MIB: Final = 1024 * 1024
DEFAULT_ENV_FILE: Final = ".env"
FILE_SUFFIX: Final = "_FILE"
MASK_VISIBLE: Final = 8


class ConfigError(Exception):
    """Configuration that cannot be served; one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class Secret:
    """A string whose ``repr`` and ``str`` never show the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        """The real value; only signing and the sandbox's verifier call this."""
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__


def mask_key(key: str) -> str:
    """A key as it may be shown: first 8 characters + ``***`` (8 or fewer: unchanged)."""
    return key if len(key) <= MASK_VISIBLE else key[:MASK_VISIBLE] + "***"


@dataclass(frozen=True, slots=True)
class SettingSpec:
    """One documented setting: its variable, default text and meaning."""

    name: str
    default: str
    help: str


# The settings table: the README's reference is checked against it by a test.
SETTINGS_TABLE: Final[tuple[SettingSpec, ...]] = (
    SettingSpec("HOST", "0.0.0.0", "address the gateway listens on"),
    SettingSpec("PORT", "8001", "port the gateway listens on"),
    SettingSpec("ENV_FILE", ".env", "dotenv file read at start and on reload (missing is fine)"),
    SettingSpec("TENANTS_FILE", "", "tenants JSON file; reloaded on change and on SIGHUP"),
    SettingSpec("MAX_BODY_BYTES", "10485760", "largest signed (non-multipart) body; 413 beyond"),
    SettingSpec("MAX_UPLOAD_BYTES", "104857600", "largest streamed multipart body; 413 beyond"),
    SettingSpec("UPSTREAM_CONNECT_TIMEOUT", "5", "seconds to connect to nxlink"),
    SettingSpec("UPSTREAM_TIMEOUT", "60", "seconds until nxlink's response headers; 504 beyond"),
    SettingSpec(
        "UPSTREAM_MAX_CONNECTIONS",
        "256",
        "upstream connections in use at once, all tenants together",
    ),
    SettingSpec("RATE_LIMIT_RPS", "", "per-tenant requests per second (off when empty)"),
    SettingSpec(
        "RATE_LIMIT_BURST", "", "per-tenant burst size (default: the rate rounded up, at least 1)"
    ),
    SettingSpec("MAX_INFLIGHT_PER_TENANT", "", "per-tenant concurrent requests (off when empty)"),
    SettingSpec("APPEND_BATCH_SIZE", "100", "numbers per upstream call/append request"),
    SettingSpec("APPEND_CONCURRENCY", "4", "append batches in flight per request"),
    SettingSpec("APPEND_MAX_NUMBERS", "10000", "most numbers in one append-numbers request"),
    SettingSpec("IDEMPOTENCY_TTL", "86400", "seconds an Idempotency-Key answer is kept"),
    SettingSpec("OPENAPI_ACTIONS", "", "extra path=action pairs, comma-separated"),
    SettingSpec("PUBLIC_KEY_DIRECTORY", "true", "serve /api/openapi/keys and availableKeys on 403"),
    SettingSpec("CORS_ALLOW_ORIGINS", "", "comma-separated origins allowed by CORS"),
    SettingSpec("LOG_LEVEL", "info", "debug, info, warning or error"),
    SettingSpec("SHUTDOWN_GRACE", "30", "seconds SIGTERM lets in-flight requests finish"),
    SettingSpec("WORKERS", "1", "serving processes sharing the port (SO_REUSEPORT)"),
)

DEFAULTS: Final = {spec.name: spec.default for spec in SETTINGS_TABLE}
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
TRUE_WORDS: Final = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS: Final = frozenset({"0", "false", "no", "off"})
HOSTNAME: Final = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})")
# Only our own variables may be given as NAME_FILE (SSL_CERT_FILE and kin are not ours).
FILE_CAPABLE: Final = re.compile(r"(OPENAPI_|EXTERNAL_API_KEY_)\w+")


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the gateway reads from its environment, typed."""

    host: str = "0.0.0.0"
    port: int = 8001
    env_file: str = DEFAULT_ENV_FILE
    tenants_file: Path | None = None
    max_body_bytes: int = 10 * MIB
    max_upload_bytes: int = 100 * MIB
    upstream_connect_timeout: float = 5.0
    upstream_timeout: float = 60.0
    upstream_max_connections: int = 256
    rate_limit_rps: float | None = None
    rate_limit_burst: int | None = None
    max_inflight_per_tenant: int | None = None
    append_batch_size: int = 100
    append_concurrency: int = 4
    append_max_numbers: int = 10000
    idempotency_ttl: float = 86400.0
    extra_actions: tuple[tuple[str, str], ...] = ()
    public_key_directory: bool = True
    cors_allow_origins: tuple[str, ...] = ()
    log_level: str = "info"
    shutdown_grace: float = 30.0
    workers: int = 1


def read_environment(
    environ: Mapping[str, str], overrides: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Merge ``.env`` < environment < overrides, then resolve every ``NAME_FILE``."""
    merged, problems = _merge(environ, overrides)
    problems += _resolve_file_variables(merged)
    if problems:
        raise ConfigError(problems)
    return merged


def secret_files(
    environ: Mapping[str, str], overrides: Mapping[str, str] | None = None
) -> list[Path]:
    """The files ``NAME_FILE`` variables point at (watched for reload, like mounted secrets)."""
    merged, _problems = _merge(environ, overrides)
    return [Path(path) for key, path in merged.items() if _is_file_variable(key)]


def _merge(
    environ: Mapping[str, str], overrides: Mapping[str, str] | None
) -> tuple[dict[str, str], list[str]]:
    """``.env`` < environment < overrides, ``NAME_FILE`` still unresolved; and what went wrong."""
    overrides = dict(overrides or {})
    env_file = overrides.get("ENV_FILE") or environ.get("ENV_FILE") or DEFAULT_ENV_FILE
    dotenv: dict[str, str] = {}
    problems: list[str] = []
    if Path(env_file).exists():
        try:
            # No ${VAR} expansion: python-dotenv would take it from the real os.environ (not
            # the environment handed in), and a secret with a "$" in it would change.
            values = dotenv_values(env_file, interpolate=False)
            dotenv = {k: v for k, v in values.items() if v is not None}
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(f"ENV_FILE={env_file}: cannot be read ({exc}); fix or remove it")
    elif "ENV_FILE" in overrides or "ENV_FILE" in environ:
        problems.append(f"ENV_FILE={env_file}: no such file; create it or drop the setting")
    merged: dict[str, str] = {}
    for layer in (dotenv, environ, overrides):
        # A higher layer's NAME (or NAME_FILE) replaces a lower layer's NAME_FILE (or NAME).
        for other in filter(None, map(_counterpart, layer)):
            merged.pop(other, None)
        merged.update(layer)
    merged["ENV_FILE"] = env_file
    return merged, problems


def _resolve_file_variables(env: dict[str, str]) -> list[str]:
    """Replace each ``NAME_FILE`` by ``NAME`` = the file's text, one trailing newline dropped."""
    problems = []
    for key in [k for k in env if _is_file_variable(k)]:
        name, path = key[: -len(FILE_SUFFIX)], env.pop(key)
        if name in env:
            problems.append(f"{key}={path}: {name} is also set; keep only one of them")
            continue
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(
                f"{key}={path}: cannot read the file ({exc.__class__.__name__}); "
                "check the path and its permissions"
            )
            continue
        env[name] = text[:-1] if text.endswith("\n") else text
    return problems


def _counterpart(key: str) -> str | None:
    """``NAME`` for ``NAME_FILE`` and ``NAME_FILE`` for ``NAME``; ``None`` for other variables."""
    if _is_file_variable(key):
        return key[: -len(FILE_SUFFIX)]
    return key + FILE_SUFFIX if _is_file_variable(key + FILE_SUFFIX) else None


def _is_file_variable(key: str) -> bool:
    if not key.endswith(FILE_SUFFIX) or key in DEFAULTS:
        return False
    name = key[: -len(FILE_SUFFIX)]
    return name in DEFAULTS or FILE_CAPABLE.fullmatch(name) is not None


def load_settings(
    environ: Mapping[str, str], overrides: Mapping[str, str] | None = None
) -> Settings:
    """Build the one ``Settings`` from the environment (and ``.env``) and CLI overrides."""
    env = read_environment(environ, overrides)
    return parse_settings(env)


def parse_settings(env: Mapping[str, str]) -> Settings:
    """Cast and validate every setting, gathering all problems into one ``ConfigError``."""
    reader = _Reader(env)
    tenants_file = reader.text("TENANTS_FILE")
    rps = reader.number("RATE_LIMIT_RPS", float, low=0.001, optional=True)
    settings = Settings(
        host=reader.host("HOST"),
        port=reader.number("PORT", int, low=0, high=65535),
        env_file=reader.text("ENV_FILE") or DEFAULT_ENV_FILE,
        tenants_file=Path(tenants_file) if tenants_file else None,
        max_body_bytes=reader.number("MAX_BODY_BYTES", int, low=1),
        max_upload_bytes=reader.number("MAX_UPLOAD_BYTES", int, low=1),
        upstream_connect_timeout=reader.number("UPSTREAM_CONNECT_TIMEOUT", float, low=0.001),
        upstream_timeout=reader.number("UPSTREAM_TIMEOUT", float, low=0.001),
        upstream_max_connections=reader.number("UPSTREAM_MAX_CONNECTIONS", int, low=1),
        rate_limit_rps=rps,
        rate_limit_burst=reader.number("RATE_LIMIT_BURST", int, low=1, optional=True),
        max_inflight_per_tenant=reader.number("MAX_INFLIGHT_PER_TENANT", int, low=1, optional=True),
        append_batch_size=reader.number("APPEND_BATCH_SIZE", int, low=1, high=10000),
        append_concurrency=reader.number("APPEND_CONCURRENCY", int, low=1, high=256),
        append_max_numbers=reader.number("APPEND_MAX_NUMBERS", int, low=1),
        idempotency_ttl=reader.number("IDEMPOTENCY_TTL", float, low=0),
        extra_actions=reader.actions("OPENAPI_ACTIONS"),
        public_key_directory=reader.flag("PUBLIC_KEY_DIRECTORY"),
        cors_allow_origins=reader.origins("CORS_ALLOW_ORIGINS"),
        log_level=reader.choice("LOG_LEVEL", LOG_LEVELS),
        shutdown_grace=reader.number("SHUTDOWN_GRACE", float, low=0),
        workers=reader.number("WORKERS", int, low=1, high=64),
    )
    reader.raise_problems()
    return settings


class _Reader:
    """Reads one setting at a time, noting a problem instead of stopping at the first."""

    def __init__(self, env: Mapping[str, str]):
        self.env = env
        self.problems: list[str] = []

    def text(self, name: str) -> str:
        return self.env.get(name, DEFAULTS[name]).strip()

    def fail(self, name: str, why: str) -> None:
        self.problems.append(f"{name}={self.env.get(name, '')}: {why}")

    def number(
        self,
        name: str,
        cast: Callable[[str], Any],
        *,
        low: float | None = None,
        high: float | None = None,
        optional: bool = False,
    ) -> Any:
        raw = self.text(name)
        if optional and raw == "":
            return None
        kind = "a whole number" if cast is int else "a number"
        try:
            value = cast(raw)
        except ValueError:
            self.fail(name, f"not {kind}; set it to {kind} such as {DEFAULTS[name] or 10}")
            return cast(DEFAULTS[name] or "1")
        if not math.isfinite(value):
            self.fail(name, f"not a finite number; set it to {kind} such as {DEFAULTS[name] or 10}")
        elif (low is not None and value < low) or (high is not None and value > high):
            bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
            self.fail(name, f"out of range; use a value {bounds}")
        return value

    def flag(self, name: str) -> bool:
        raw = self.text(name).lower()
        if raw not in TRUE_WORDS | FALSE_WORDS:
            self.fail(name, "not a boolean; use true or false")
            return DEFAULTS[name] == "true"
        return raw in TRUE_WORDS

    def choice(self, name: str, allowed: tuple[str, ...]) -> str:
        raw = self.text(name).lower()
        if raw not in allowed:
            self.fail(name, f"unknown value; use one of {', '.join(allowed)}")
            return DEFAULTS[name]
        return raw

    def host(self, name: str) -> str:
        raw = self.text(name)
        if not (_is_ip(raw) or HOSTNAME.fullmatch(raw)):
            self.fail(name, "not a host name or IP address; use e.g. 0.0.0.0 or 127.0.0.1")
        return raw

    def origins(self, name: str) -> tuple[str, ...]:
        items = tuple(o.strip().rstrip("/") for o in self.text(name).split(",") if o.strip())
        for origin in items:
            if origin != "*" and not (is_http_url(origin) and not urlsplit(origin).path):
                self.fail(name, f"{origin!r} is not an origin; use e.g. https://app.example.com")
        return items

    def actions(self, name: str) -> tuple[tuple[str, str], ...]:
        pairs = []
        for item in (i.strip() for i in self.text(name).split(",") if i.strip()):
            path, _, action = item.partition("=")
            if not path.startswith("/openapi/") or not action.strip():
                self.fail(name, f"{item!r} is not path=action; use e.g. /openapi/x/y=doSomething")
                continue
            pairs.append((path.strip().rstrip("/"), action.strip()))
        return tuple(pairs)

    def raise_problems(self) -> None:
        if self.problems:
            raise ConfigError(self.problems)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return False
    return True


def is_http_url(url: str) -> bool:
    """True for an absolute http(s) URL with a host and no query, fragment or credentials."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        return False
    return (
        parts.scheme in ("http", "https")
        and bool(parts.hostname)
        and not parts.query
        and not parts.fragment
        and parts.username is None
    )


def process_environ() -> Mapping[str, str]:
    """The real process environment (only the CLI calls this)."""
    return os.environ
