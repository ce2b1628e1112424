"""Every setting the gateway reads: its variable, default and meaning, in one table.

The README's settings reference is checked against this table by a test."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True, slots=True)
class SettingSpec:
    """One documented setting: its variable, default text and meaning."""

    name: str
    default: str
    help: str


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
        "UPSTREAM_READ_TIMEOUT",
        "30",
        "longest silence in seconds between two pieces of an answer's body; the stream is cut",
    ),
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
    SettingSpec(
        "IDEMPOTENCY_LEASE", "15", "seconds an append run's claim lasts unless its owner renews it"
    ),
    SettingSpec(
        "IDEMPOTENCY_WAIT",
        "60",
        "seconds a repeat waits for the first run, then 409 IDEMPOTENCY_IN_PROGRESS",
    ),
    SettingSpec(
        "STATE_URL",
        "",
        "state backend: memory://, sqlite:///file.db or redis://host:6379/0 "
        "(default memory://; a private SQLite file with WORKERS > 1)",
    ),
    SettingSpec("QUOTA_TIMEZONE", "UTC", "IANA time zone of quota and usage days and months"),
    SettingSpec("QUOTA_NUMBERS_PER_DAY", "", "default numbers a tenant may append per day"),
    SettingSpec("QUOTA_NUMBERS_PER_MONTH", "", "default numbers a tenant may append per month"),
    SettingSpec("QUOTA_REQUESTS_PER_DAY", "", "default requests a tenant may make per day"),
    SettingSpec("QUOTA_REQUESTS_PER_MONTH", "", "default requests a tenant may make per month"),
    SettingSpec("OPENAPI_ACTIONS", "", "extra path=action pairs, comma-separated"),
    SettingSpec("PUBLIC_KEY_DIRECTORY", "true", "serve /api/openapi/keys and availableKeys on 403"),
    SettingSpec("CORS_ALLOW_ORIGINS", "", "comma-separated origins allowed by CORS"),
    SettingSpec("LOG_LEVEL", "info", "debug, info, warning or error"),
    SettingSpec("SHUTDOWN_GRACE", "30", "seconds SIGTERM lets in-flight requests finish"),
    SettingSpec(
        "SHUTDOWN_DELAY",
        "0",
        "seconds after SIGTERM with /readyz at 503 and new connections still served",
    ),
    SettingSpec("WORKERS", "1", "serving processes sharing the port (SO_REUSEPORT)"),
    SettingSpec("TLS_CERT_FILE", "", "PEM certificate chain: serve HTTPS (with TLS_KEY_FILE)"),
    SettingSpec("TLS_KEY_FILE", "", "PEM private key of TLS_CERT_FILE"),
    SettingSpec("ADMIN_HOST", "127.0.0.1", "address the admin listener binds"),
    SettingSpec("ADMIN_PORT", "", "port of the admin API and console (off when empty)"),
    SettingSpec("ADMIN_TOKEN", "", "admin bearer token, at least 32 characters"),
    SettingSpec("ADMIN_TOKEN_HASH", "", "sha256:<hex> of the admin token, instead of ADMIN_TOKEN"),
)
SECRET_SETTINGS: Final = frozenset({"ADMIN_TOKEN"})
QUOTA_FIELDS: Final = {
    "numbersPerDay": "NUMBERS_PER_DAY",
    "numbersPerMonth": "NUMBERS_PER_MONTH",
    "requestsPerDay": "REQUESTS_PER_DAY",
    "requestsPerMonth": "REQUESTS_PER_MONTH",
}
MIN_ADMIN_TOKEN: Final = 32

DEFAULTS: Final = {spec.name: spec.default for spec in SETTINGS_TABLE}
