"""Tenants: the model, its checks, and the ``Registry`` that looks a tenant up by key hash."""

from __future__ import annotations

import hashlib
import math
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from proxy.config import ConfigError, Quotas, Secret, Settings, mask_key
from proxy.nxlink import ALGORITHMS, DEFAULT_BASE_URL, DEFAULT_BIZ_TYPE
from proxy.settings_table import QUOTA_FIELDS
from proxy.tenant_sources import (
    GLOBAL_FALLBACKS,
    NO_DOCUMENT,
    Entry,
    entries_from_document,
    entries_from_env,
    read_document,
)
from proxy.typos import placeholders
from proxy.urls import is_http_url

HASH_PREFIX: Final = "sha256:"
TENANT_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
KEY_FIELDS: Final = frozenset({"apiKey", "apiKeyHash", "notAfter"})


@dataclass(frozen=True, slots=True)
class Credentials:
    """One nxlink account: what signing needs."""

    access_key: str
    access_secret: Secret
    biz_type: str = DEFAULT_BIZ_TYPE
    algorithm: str = "md5"


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One accepted client key, kept only as its SHA-256 digest."""

    digest: bytes = field(repr=False)
    hint: str
    not_after: datetime | None = None

    def expired(self, now: datetime) -> bool:
        """True once ``now`` is past ``notAfter``."""
        return self.not_after is not None and now > self.not_after

    @property
    def id(self) -> str:
        """A stable id that names the key without revealing it (derived from its digest)."""
        return "k-" + self.digest.hex()[:12]


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-tenant overrides of the global limits (``None``: use the global setting)."""

    rate_limit_rps: float | None = None
    rate_limit_burst: int | None = None
    max_inflight: int | None = None
    append_batch_size: int | None = None


@dataclass(frozen=True, slots=True)
class Tenant:
    """An external platform: its keys, nxlink account and base URL."""

    alias: str
    description: str
    base_url: str
    biz_type: str
    credentials: Credentials | None
    keys: tuple[ApiKey, ...]
    source: str
    limits: Limits = Limits()
    id: str = ""  # stable: the file's "id", env-N, demo-N; derived from the alias when absent
    quotas: Quotas = Quotas()  # the tenant's own; Settings.quota_defaults fill the rest

    def __post_init__(self) -> None:
        if not self.id:
            object.__setattr__(self, "id", derived_id(self.alias))


def derived_id(alias: str) -> str:
    """The id of a tenant that has none written down: the same for the same alias, so usage and
    limits stay with the tenant until the admin API writes the id into the file."""
    return "t-" + hashlib.sha256(alias.encode("utf-8", "surrogatepass")).hexdigest()[:10]


@dataclass(frozen=True, slots=True)
class Match:
    """A successful key lookup."""

    tenant: Tenant
    key: ApiKey


class Registry:
    """The configured tenants, looked up by the SHA-256 of the presented key."""

    def __init__(
        self,
        tenants: Sequence[Tenant],
        warnings: Sequence[str] = (),
        placeholders: Sequence[str] = (),
    ):
        self.tenants: tuple[Tenant, ...] = tuple(tenants)
        self.warnings: tuple[str, ...] = tuple(warnings)
        # Where a value is still an example's placeholder (fine against the sandbox only).
        self.placeholders: tuple[str, ...] = tuple(placeholders)
        self._by_digest = {key.digest: Match(t, key) for t in self.tenants for key in t.keys}

    def lookup(self, presented: str) -> Match | None:
        """The tenant owning ``presented``.

        Only SHA-256 digests are compared: how long a lookup takes depends on the digest, which
        a client cannot steer towards a real key, so timing tells nothing about the keys."""
        return self._by_digest.get(hash_key(presented))

    def __len__(self) -> int:
        return len(self.tenants)


def generate_key() -> str:
    """A new random client key (``keygen`` and the admin API make them alike)."""
    return "nxk_" + secrets.token_urlsafe(32)


def hash_key(key: str) -> bytes:
    """SHA-256 digest of a client key."""
    # A header may carry undecodable bytes (surrogate escapes): hash them, never raise.
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def load_registry(
    env: Mapping[str, str], settings: Settings, *, document: Any = NO_DOCUMENT
) -> Registry:
    """Every tenant from the environment and the tenants file; one ``ConfigError`` for all.

    ``document``: the tenants file's content as parsed JSON, checked instead of the file's
    (the admin API validates a write with the very checks start-up makes)."""
    problems: list[str] = []
    entries = list(entries_from_env(env, problems))
    path = settings.tenants_file
    if path is not None:
        if document is NO_DOCUMENT:
            document = read_document(path, problems)
        entries += entries_from_document(document, path, problems)
    tenants = [t for t in (_build_tenant(e, env, problems) for e in entries) if t is not None]
    _check_duplicates(tenants, problems)
    if problems:
        raise ConfigError(problems)
    return Registry(tenants, _warnings(tenants), placeholders(entries, env))


def _build_tenant(entry: Entry, env: Mapping[str, str], problems: list[str]) -> Tenant | None:
    before = len(problems)
    keys = _parse_keys(entry, problems)
    openapi = {k: _field(entry, env, k, problems) for k in GLOBAL_FALLBACKS}
    base_url = (openapi["baseUrl"] or DEFAULT_BASE_URL).rstrip("/")
    if not is_http_url(base_url):
        problems.append(
            f"{_place(entry, env, 'baseUrl')}={base_url}: not an http(s) URL; "
            "use e.g. https://api-westus.nxlink.ai"
        )
    algorithm = (openapi["algorithm"] or "md5").lower()
    if algorithm not in ALGORITHMS:
        problems.append(
            f"{_place(entry, env, 'algorithm')}={algorithm}: unknown algorithm; use md5 or sha256"
        )
    biz_type = openapi["bizType"] or DEFAULT_BIZ_TYPE
    credentials = None
    if openapi["accessKey"] and openapi["accessSecret"]:
        credentials = Credentials(
            openapi["accessKey"], Secret(openapi["accessSecret"]), biz_type, algorithm
        )
    limits, quotas = _parse_limits(entry, problems), _parse_quotas(entry, problems)
    tenant_id = entry.fields.get("id")
    if tenant_id is not None and not (
        isinstance(tenant_id, str) and TENANT_ID.fullmatch(tenant_id)
    ):
        problems.append(f"{entry.place}: id must be 1-64 letters, digits, '.', '_' or '-'")
    if len(problems) > before:
        return None
    alias = str(entry.fields.get("alias") or entry.source)
    description = str(entry.fields.get("description") or "")
    return Tenant(
        alias,
        description,
        base_url,
        biz_type,
        credentials,
        keys,
        entry.source,
        limits,
        tenant_id or "",
        quotas,
    )


def _field(entry: Entry, env: Mapping[str, str], name: str, problems: list[str]) -> str:
    value = entry.openapi.get(name)
    if value is None or value == "":
        value = env.get(GLOBAL_FALLBACKS[name], "")
    if isinstance(value, bool) or not isinstance(value, str | int):
        problems.append(f"{entry.names[name]}: must be a string")
        return ""
    return str(value).strip()


def _place(entry: Entry, env: Mapping[str, str], name: str) -> str:
    """Where a field's value came from: the tenant's own setting or the global fallback."""
    return entry.names[name] if entry.openapi.get(name) else GLOBAL_FALLBACKS[name]


def _parse_keys(entry: Entry, problems: list[str]) -> tuple[ApiKey, ...]:
    raw: list[Any] = []
    for name in ("apiKey", "apiKeyHash"):
        if entry.fields.get(name) is not None:
            raw.append({name: entry.fields[name]})
    listed = entry.fields.get("apiKeys", [])
    if not isinstance(listed, list):
        problems.append(f"{entry.place}: apiKeys must be a list of keys")
        return ()
    raw += listed
    if not raw:
        problems.append(f"{entry.place}: no API key; add apiKey, apiKeyHash or apiKeys")
    keys = []
    for item in raw:
        try:
            keys.append(parse_key(item))
        except ValueError as exc:
            problems.append(f"{entry.place}: {exc}")
    return tuple(keys)


def parse_key(item: Any) -> ApiKey:
    """One key from ``"plain"``, ``"sha256:<hex>"`` or an object with key/hash and ``notAfter``."""
    if isinstance(item, str):
        item = {"apiKeyHash" if item.startswith(HASH_PREFIX) else "apiKey": item}
    if not isinstance(item, dict):
        raise ValueError("an API key must be a string or an object with apiKey/apiKeyHash")
    unknown = sorted(set(item) - KEY_FIELDS)
    if unknown:
        # A misspelt notAfter would otherwise leave a key valid forever.
        raise ValueError(f"unknown field(s) {', '.join(unknown)} in apiKeys; check the spelling")
    not_after = _parse_time(item.get("notAfter"))
    if isinstance(item.get("apiKey"), str) and item["apiKey"].strip():
        plain = item["apiKey"].strip()
        if any(c.isspace() for c in plain):
            raise ValueError(f"API key {mask_key(plain)} contains white space; remove it")
        return ApiKey(hash_key(plain), mask_key(plain), not_after)
    hashed = item.get("apiKeyHash")
    if isinstance(hashed, str) and re.fullmatch(r"sha256:[0-9a-fA-F]{64}", hashed.strip()):
        hex_digest = hashed.strip()[len(HASH_PREFIX) :].lower()
        return ApiKey(bytes.fromhex(hex_digest), f"sha256:{hex_digest[:8]}***", not_after)
    raise ValueError(
        'apiKey must be a non-empty string, or apiKeyHash "sha256:" + 64 hex '
        "digits (make one with: .venv/bin/nxlink-proxy keygen)"
    )


def _parse_time(value: Any) -> datetime | None:
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError as exc:
        raise ValueError(
            f"notAfter={value}: not an ISO-8601 time; use 2026-12-31T00:00:00Z"
        ) from exc
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _parse_limits(entry: Entry, problems: list[str]) -> Limits:
    values: dict[str, Any] = {}
    for name, attr, cast in (
        ("rateLimitRps", "rate_limit_rps", float),
        ("rateLimitBurst", "rate_limit_burst", int),
        ("maxInflight", "max_inflight", int),
        ("appendBatchSize", "append_batch_size", int),
    ):
        raw = entry.fields.get(name)
        if raw is None:
            continue
        if not _is_positive(raw, whole=cast is int):
            kind = "whole number" if cast is int else "number"
            problems.append(f"{_label(entry, name)}={raw!r} must be a positive {kind}")
            continue
        values[attr] = cast(raw)
    return Limits(**values)


def _parse_quotas(entry: Entry, problems: list[str]) -> Quotas:
    raw = entry.fields.get("quotas")
    if raw is None:
        return Quotas()
    if not isinstance(raw, dict):
        problems.append(
            f'{entry.place}: quotas must be an object such as {{"numbersPerDay": 5000}}'
        )
        return Quotas()
    unknown = sorted(set(raw) - set(QUOTA_FIELDS))
    if unknown:
        known = ", ".join(QUOTA_FIELDS)
        problems.append(f"{entry.place}: unknown quota(s) {', '.join(unknown)}; use {known}")
    values = []
    for name in QUOTA_FIELDS:
        value = raw.get(name)
        if value is not None and not _is_positive(value, whole=True):
            problems.append(f"{_label(entry, name)}={value!r} must be a positive whole number")
            value = None
        values.append(value)
    return Quotas(*values)


def _label(entry: Entry, name: str) -> str:
    """How a problem names a field: its variable for an environment tenant, else entry + field."""
    return f"{entry.place}: {name}" if entry.where else entry.names[name]


def _is_positive(raw: Any, *, whole: bool) -> bool:
    """A finite JSON number above zero (an integer when ``whole``); JSON booleans are not."""
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        return False
    return 0 < raw < math.inf and (isinstance(raw, int) or not whole)


def _check_duplicates(tenants: Sequence[Tenant], problems: list[str]) -> None:
    ids: dict[str, str] = {}
    for tenant in tenants:
        if tenant.id in ids:
            problems.append(
                f"tenant id {tenant.id} ({tenant.alias}) is used twice: in {ids[tenant.id]} and "
                f"in {tenant.source}; give each tenant its own id and alias"
            )
        ids.setdefault(tenant.id, tenant.source)
    seen: dict[bytes, str] = {}
    for tenant in tenants:
        for key in tenant.keys:
            if key.digest in seen:
                problems.append(
                    f"API key {key.hint} is configured twice: in {seen[key.digest]} "
                    f"and in {tenant.source}; give each tenant its own key"
                )
            seen.setdefault(key.digest, tenant.source)


def _warnings(tenants: Sequence[Tenant]) -> list[str]:
    warnings = []
    soon = datetime.now(UTC) + timedelta(days=7)
    for t in tenants:
        if t.credentials is None:
            warnings.append(
                f"{t.source} ({t.alias}): no accessKey/accessSecret; its requests "
                "get 500 OPENAPI_CONFIG_INCOMPLETE"
            )
        for key in t.keys:
            if key.not_after is not None and key.not_after <= soon:
                state = "expired" if key.expired(datetime.now(UTC)) else "expires"
                warnings.append(
                    f"{t.source} ({t.alias}): key {key.hint} {state} at {key.not_after.isoformat()}"
                )
    return warnings


DEMO_TENANTS: Final = (
    ("电商平台A", "电商平台A的API密钥", "ecommerce-platform-key-abc123", "demo-ecommerce-ak"),
    ("金融平台B", "金融平台B的API密钥", "finance-platform-key-xyz789", "demo-finance-ak"),
)


def accounts_of(registry: Registry) -> list[Credentials]:
    """The nxlink accounts of the tenants that have one (what a sandbox must accept)."""
    return [t.credentials for t in registry.tenants if t.credentials is not None]


def pointed_at(registry: Registry, base_url: str) -> Registry:
    """The same tenants and warnings, every one of them sent to ``base_url`` (a sandbox)."""
    tenants = [replace(t, base_url=base_url) for t in registry.tenants]
    return Registry(tenants, registry.warnings, registry.placeholders)


def demo_registry(base_url: str) -> Registry:
    """The seed's two example tenants, pointed at a sandbox at ``base_url``."""
    tenants = [
        Tenant(
            alias,
            desc,
            base_url,
            DEFAULT_BIZ_TYPE,
            Credentials(ak, Secret(f"{ak}-secret"), DEFAULT_BIZ_TYPE, "md5"),
            (ApiKey(hash_key(key), mask_key(key)),),
            f"demo tenant {alias}",
            id=f"demo-{number}",
        )
        for number, (alias, desc, key, ak) in enumerate(DEMO_TENANTS, 1)
    ]
    return Registry(tenants)
