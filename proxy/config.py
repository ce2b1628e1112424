"""Gateway settings: the typed `Settings`, cast and validated from the merged environment."""

from __future__ import annotations

import hashlib
import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from proxy.settings_table import DEFAULTS, MIN_ADMIN_TOKEN, QUOTA_FIELDS, SECRET_SETTINGS
from proxy.urls import is_http_url, mask_url, state_url_problem

MIB: Final = 1024 * 1024
DEFAULT_ENV_FILE: Final = ".env"
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


LOG_LEVELS: Final = ("debug", "info", "warning", "error")
TRUE_WORDS: Final = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS: Final = frozenset({"0", "false", "no", "off"})
HOSTNAME: Final = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})")


@dataclass(frozen=True, slots=True)
class Quotas:
    """Budgets per calendar day and month (``None``: no such budget)."""

    numbers_per_day: int | None = None
    numbers_per_month: int | None = None
    requests_per_day: int | None = None
    requests_per_month: int | None = None

    def over(self, defaults: Quotas) -> Quotas:
        """These quotas, each one not set taken from ``defaults``."""
        return Quotas(
            *(
                mine if mine is not None else theirs
                for mine, theirs in zip(_quota_values(self), _quota_values(defaults), strict=True)
            )
        )

    def items(self) -> list[tuple[str, int]]:
        """The budgets in force as ``(name, limit)``, e.g. ``("numbersPerDay", 5000)``."""
        values = zip(QUOTA_FIELDS, _quota_values(self), strict=True)
        return [(name, value) for name, value in values if value is not None]


def _quota_values(quotas: Quotas) -> tuple[int | None, ...]:
    return (
        quotas.numbers_per_day,
        quotas.numbers_per_month,
        quotas.requests_per_day,
        quotas.requests_per_month,
    )


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
    upstream_read_timeout: float = 30.0
    upstream_max_connections: int = 256
    rate_limit_rps: float | None = None
    rate_limit_burst: int | None = None
    max_inflight_per_tenant: int | None = None
    append_batch_size: int = 100
    append_concurrency: int = 4
    append_max_numbers: int = 10000
    idempotency_ttl: float = 86400.0
    idempotency_lease: float = 15.0
    idempotency_wait: float = 60.0
    state_url: str = ""  # empty: memory://, or a private SQLite file with WORKERS > 1
    quota_timezone: str = "UTC"
    quota_defaults: Quotas = Quotas()
    extra_actions: tuple[tuple[str, str], ...] = ()
    public_key_directory: bool = True
    cors_allow_origins: tuple[str, ...] = ()
    log_level: str = "info"
    shutdown_grace: float = 30.0
    shutdown_delay: float = 0.0
    workers: int = 1
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    admin_host: str = "127.0.0.1"
    admin_port: int | None = None
    # SHA-256 of the admin token (from ADMIN_TOKEN or ADMIN_TOKEN_HASH): the token itself is
    # never kept.
    admin_token_digest: bytes | None = field(default=None, repr=False)


def parse_settings(env: Mapping[str, str]) -> Settings:
    """Cast and validate every setting, gathering all problems into one ``ConfigError``."""
    reader = _Reader(env)
    tenants_file = reader.text("TENANTS_FILE")
    rps = reader.number("RATE_LIMIT_RPS", float, low=0.001, optional=True)
    tls_cert, tls_key = reader.tls_files()
    admin_port = reader.number("ADMIN_PORT", int, low=0, high=65535, optional=True)
    settings = Settings(
        host=reader.host("HOST"),
        port=reader.number("PORT", int, low=0, high=65535),
        env_file=reader.text("ENV_FILE") or DEFAULT_ENV_FILE,
        tenants_file=Path(tenants_file) if tenants_file else None,
        max_body_bytes=reader.number("MAX_BODY_BYTES", int, low=1),
        max_upload_bytes=reader.number("MAX_UPLOAD_BYTES", int, low=1),
        upstream_connect_timeout=reader.number("UPSTREAM_CONNECT_TIMEOUT", float, low=0.001),
        upstream_timeout=reader.number("UPSTREAM_TIMEOUT", float, low=0.001),
        upstream_read_timeout=reader.number("UPSTREAM_READ_TIMEOUT", float, low=0.001),
        upstream_max_connections=reader.number("UPSTREAM_MAX_CONNECTIONS", int, low=1),
        rate_limit_rps=rps,
        rate_limit_burst=reader.number("RATE_LIMIT_BURST", int, low=1, optional=True),
        max_inflight_per_tenant=reader.number("MAX_INFLIGHT_PER_TENANT", int, low=1, optional=True),
        append_batch_size=reader.number("APPEND_BATCH_SIZE", int, low=1, high=10000),
        append_concurrency=reader.number("APPEND_CONCURRENCY", int, low=1, high=256),
        append_max_numbers=reader.number("APPEND_MAX_NUMBERS", int, low=1),
        # At least a minute: a record must outlive the leases of the run it protects.
        idempotency_ttl=reader.number("IDEMPOTENCY_TTL", float, low=60),
        idempotency_lease=reader.number("IDEMPOTENCY_LEASE", float, low=1, high=3600),
        idempotency_wait=reader.number("IDEMPOTENCY_WAIT", float, low=0, high=3600),
        state_url=reader.state_url("STATE_URL"),
        quota_timezone=reader.timezone("QUOTA_TIMEZONE"),
        quota_defaults=reader.quotas("QUOTA_"),
        extra_actions=reader.actions("OPENAPI_ACTIONS"),
        public_key_directory=reader.flag("PUBLIC_KEY_DIRECTORY"),
        cors_allow_origins=reader.origins("CORS_ALLOW_ORIGINS"),
        log_level=reader.choice("LOG_LEVEL", LOG_LEVELS),
        shutdown_grace=reader.number("SHUTDOWN_GRACE", float, low=0),
        shutdown_delay=reader.number("SHUTDOWN_DELAY", float, low=0, high=3600),
        workers=reader.number("WORKERS", int, low=1, high=64),
        tls_cert_file=tls_cert,
        tls_key_file=tls_key,
        admin_host=reader.host("ADMIN_HOST"),
        admin_port=admin_port,
        admin_token_digest=reader.admin_token(admin_port is not None),
    )
    if settings.workers > 1 and settings.state_url.startswith("memory:"):
        # Each worker would keep its own limits, quotas and Idempotency-Key records.
        reader.fail(
            "STATE_URL",
            "memory:// is one process's state; with WORKERS > 1 leave STATE_URL empty "
            "(the workers share a private SQLite file) or use sqlite:/// or redis://",
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
        shown = self.env.get(name, "")
        if name in SECRET_SETTINGS:
            shown = "<hidden>"
        elif name == "STATE_URL":
            shown = mask_url(shown)
        self.problems.append(f"{name}={shown}: {why}")

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

    def quotas(self, prefix: str) -> Quotas:
        """``<prefix>NUMBERS_PER_DAY`` and its three kin, each a positive whole number."""
        values = []
        for suffix in QUOTA_FIELDS.values():
            name = prefix + suffix
            raw = self.env.get(name, "").strip()
            if raw and not (raw.isascii() and raw.isdigit() and int(raw) > 0):
                self.fail(name, "not a positive whole number; use e.g. 5000, or leave it empty")
                raw = ""
            values.append(int(raw) if raw else None)
        return Quotas(*values)

    def timezone(self, name: str) -> str:
        raw = self.text(name)
        try:
            ZoneInfo(raw)
        except (ZoneInfoNotFoundError, ValueError):
            self.fail(name, "unknown time zone; use an IANA name such as UTC or Asia/Shanghai")
            return DEFAULTS[name]
        return raw

    def state_url(self, name: str) -> str:
        raw = self.text(name)
        if raw:
            why = state_url_problem(raw)
            if why is not None:
                self.fail(name, why)
        return raw

    def tls_files(self) -> tuple[Path | None, Path | None]:
        cert, key = self.text("TLS_CERT_FILE"), self.text("TLS_KEY_FILE")
        if bool(cert) != bool(key):
            missing = "TLS_KEY_FILE" if cert else "TLS_CERT_FILE"
            given = "TLS_CERT_FILE" if cert else "TLS_KEY_FILE"
            self.fail(given, f"{missing} is not set; set both for HTTPS, or neither for HTTP")
            return None, None
        for name, path in (("TLS_CERT_FILE", cert), ("TLS_KEY_FILE", key)):
            if path and not os.access(path, os.R_OK):
                self.fail(name, "cannot read the file; check the path and its permissions")
        return (Path(cert), Path(key)) if cert else (None, None)

    def admin_token(self, required: bool) -> bytes | None:
        """The admin token's SHA-256, from ADMIN_TOKEN or ADMIN_TOKEN_HASH."""
        token, hashed = self.env.get("ADMIN_TOKEN", ""), self.text("ADMIN_TOKEN_HASH")
        if token and hashed:
            self.fail("ADMIN_TOKEN_HASH", "ADMIN_TOKEN is set too; keep only one of them")
            return None
        if token:
            if len(token) < MIN_ADMIN_TOKEN or token != token.strip():
                self.fail(
                    "ADMIN_TOKEN",
                    f"shorter than {MIN_ADMIN_TOKEN} characters or padded with spaces; "
                    "make one with: .venv/bin/nxlink-proxy keygen",
                )
            return hashlib.sha256(token.encode()).digest()
        if hashed:
            if not re.fullmatch(r"sha256:[0-9a-fA-F]{64}", hashed):
                self.fail("ADMIN_TOKEN_HASH", 'not "sha256:" + 64 hex digits; use keygen\'s hash')
                return None
            return bytes.fromhex(hashed[len("sha256:") :])
        if required:
            self.fail(
                "ADMIN_PORT",
                "the admin listener needs ADMIN_TOKEN (or ADMIN_TOKEN_FILE, ADMIN_TOKEN_HASH); "
                "make one with: .venv/bin/nxlink-proxy keygen",
            )
        return None

    def raise_problems(self) -> None:
        if self.problems:
            raise ConfigError(self.problems)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return False
    return True
