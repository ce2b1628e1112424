"""Tenants from ``EXTERNAL_API_KEY_N_*`` and the tenants JSON file, looked up by key hash."""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

from proxy.config import ConfigError, Secret, Settings, mask_key
from proxy.nxlink import ALGORITHMS, DEFAULT_BASE_URL, DEFAULT_BIZ_TYPE
from proxy.urls import is_http_url

HASH_PREFIX: Final = "sha256:"
ENV_KEY: Final = re.compile(r"EXTERNAL_API_KEY_(\d+)(_[A-Z0-9_]+)?")
ENV_FIELDS: Final = {
    "_ALIAS": "alias",
    "_DESC": "description",
    "_OPENAPI_ACCESS_KEY": "accessKey",
    "_OPENAPI_ACCESS_SECRET": "accessSecret",
    "_OPENAPI_BIZ_TYPE": "bizType",
    "_OPENAPI_BASE_URL": "baseUrl",
    "_OPENAPI_ALGORITHM": "algorithm",
}
GLOBAL_FALLBACKS: Final = {
    "accessKey": "OPENAPI_ACCESS_KEY",
    "accessSecret": "OPENAPI_ACCESS_SECRET",
    "bizType": "OPENAPI_BIZ_TYPE",
    "baseUrl": "OPENAPI_BASE_URL",
    "algorithm": "OPENAPI_ALGORITHM",
}
ENTRY_FIELDS: Final = frozenset(
    {"apiKey", "apiKeyHash", "apiKeys", "alias", "description", "openapi"}
    | {"rateLimitRps", "rateLimitBurst", "maxInflight", "appendBatchSize"}
)
OPENAPI_FIELDS: Final = frozenset(GLOBAL_FALLBACKS)
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


@dataclass(frozen=True, slots=True)
class Match:
    """A successful key lookup."""

    tenant: Tenant
    key: ApiKey


class Registry:
    """The configured tenants, looked up by the SHA-256 of the presented key."""

    def __init__(self, tenants: Sequence[Tenant], warnings: Sequence[str] = ()):
        self.tenants: tuple[Tenant, ...] = tuple(tenants)
        self.warnings: tuple[str, ...] = tuple(warnings)
        self._by_digest = {key.digest: Match(t, key) for t in self.tenants for key in t.keys}

    def lookup(self, presented: str) -> Match | None:
        """The tenant owning ``presented``.

        Only SHA-256 digests are compared: how long a lookup takes depends on the digest, which
        a client cannot steer towards a real key, so timing tells nothing about the keys."""
        return self._by_digest.get(hash_key(presented))

    def __len__(self) -> int:
        return len(self.tenants)


def hash_key(key: str) -> bytes:
    """SHA-256 digest of a client key."""
    # A header may carry undecodable bytes (surrogate escapes): hash them, never raise.
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def load_registry(env: Mapping[str, str], settings: Settings) -> Registry:
    """Every tenant from the environment and the tenants file; one ``ConfigError`` for all."""
    problems: list[str] = []
    entries = list(_entries_from_env(env, problems))
    if settings.tenants_file is not None:
        entries += _entries_from_file(settings.tenants_file, problems)
    tenants = [t for t in (_build_tenant(e, env, problems) for e in entries) if t is not None]
    _check_duplicates(tenants, problems)
    if problems:
        raise ConfigError(problems)
    return Registry(tenants, _warnings(tenants))


@dataclass(slots=True)
class _Entry:
    """One tenant's raw fields and where they came from."""

    source: str
    fields: dict[str, Any] = field(repr=False)  # holds the plain key
    openapi: dict[str, Any] = field(repr=False)  # holds the accessSecret
    names: dict[str, str] = field(repr=False)


def _entries_from_env(env: Mapping[str, str], problems: list[str]) -> Iterable[_Entry]:
    # Keyed by the digits as written: EXTERNAL_API_KEY_03 and _3 are two variables.
    groups: dict[str, dict[str, str]] = {}
    for name, value in env.items():
        found = ENV_KEY.fullmatch(name)
        if found is None:
            continue
        suffix = found.group(2) or ""
        if suffix and suffix not in ENV_FIELDS:
            known = ", ".join(f"EXTERNAL_API_KEY_N{s}" for s in ENV_FIELDS)
            problems.append(f"{name}: unknown tenant variable; known ones are {known}")
            continue
        groups.setdefault(found.group(1), {})[suffix] = value
    for number in sorted(groups, key=lambda digits: (int(digits), digits)):
        yield from _env_entry(number, groups[number], problems)


def _env_entry(number: str, group: dict[str, str], problems: list[str]) -> Iterable[_Entry]:
    prefix = f"EXTERNAL_API_KEY_{number}"
    if not group.get("", "").strip():
        problems.append(
            f"{prefix}: missing or empty, but {prefix}_* variables are set; "
            f"set {prefix} to the tenant's API key or remove the others"
        )
        return
    names = {ENV_FIELDS[s]: prefix + s for s in ENV_FIELDS} | {"apiKey": prefix}
    fields: dict[str, Any] = {"apiKey": group[""].strip(), "alias": group.get("_ALIAS")}
    fields["description"] = group.get("_DESC")
    openapi = {ENV_FIELDS[s]: v for s, v in group.items() if s.startswith("_OPENAPI_")}
    yield _Entry(prefix, fields, openapi, names)


def _entries_from_file(path: Path, problems: list[str]) -> Iterable[_Entry]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(
            f"TENANTS_FILE={path}: cannot read the file ({exc.__class__.__name__}); "
            "check the path and its permissions"
        )
        return
    except json.JSONDecodeError as exc:
        problems.append(
            f"TENANTS_FILE={path}: invalid JSON at line {exc.lineno} column "
            f"{exc.colno} ({exc.msg}); fix the syntax"
        )
        return
    items = data.get("keys") if isinstance(data, dict) else data
    if not isinstance(items, list):
        problems.append(f'TENANTS_FILE={path}: expected a list of tenants or {{"keys": [...]}}')
        return
    for index, item in enumerate(items, 1):
        where = f"{path} entry #{index}"
        if not isinstance(item, dict):
            problems.append(f"{where}: expected an object with apiKey and openapi fields")
            continue
        if isinstance(item.get("alias"), str):
            where += f" ({item['alias']})"
        unknown = sorted(set(item) - ENTRY_FIELDS)
        openapi = item.get("openapi") or {}
        if not isinstance(openapi, dict):
            problems.append(f"{where}: openapi must be an object with accessKey, accessSecret, ...")
            openapi = {}
        unknown += [f"openapi.{k}" for k in sorted(set(openapi) - OPENAPI_FIELDS)]
        if unknown:
            problems.append(f"{where}: unknown field(s) {', '.join(unknown)}; check the spelling")
        names = {k: f"{where} {k}" for k in ENTRY_FIELDS | OPENAPI_FIELDS}
        yield _Entry(where, dict(item), dict(openapi), names)


def _build_tenant(entry: _Entry, env: Mapping[str, str], problems: list[str]) -> Tenant | None:
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
    limits = _parse_limits(entry, problems)
    if len(problems) > before:
        return None
    alias = str(entry.fields.get("alias") or entry.source)
    description = str(entry.fields.get("description") or "")
    return Tenant(alias, description, base_url, biz_type, credentials, keys, entry.source, limits)


def _field(entry: _Entry, env: Mapping[str, str], name: str, problems: list[str]) -> str:
    value = entry.openapi.get(name)
    if value is None or value == "":
        value = env.get(GLOBAL_FALLBACKS[name], "")
    if isinstance(value, bool) or not isinstance(value, str | int):
        problems.append(f"{entry.names[name]}: must be a string")
        return ""
    return str(value).strip()


def _place(entry: _Entry, env: Mapping[str, str], name: str) -> str:
    """Where a field's value came from: the tenant's own setting or the global fallback."""
    return entry.names[name] if entry.openapi.get(name) else GLOBAL_FALLBACKS[name]


def _parse_keys(entry: _Entry, problems: list[str]) -> tuple[ApiKey, ...]:
    raw: list[Any] = []
    for name in ("apiKey", "apiKeyHash"):
        if entry.fields.get(name) is not None:
            raw.append({name: entry.fields[name]})
    listed = entry.fields.get("apiKeys", [])
    if not isinstance(listed, list):
        problems.append(f"{entry.source}: apiKeys must be a list of keys")
        return ()
    raw += listed
    if not raw:
        problems.append(f"{entry.source}: no API key; add apiKey, apiKeyHash or apiKeys")
    keys = []
    for item in raw:
        try:
            keys.append(_parse_key(item))
        except ValueError as exc:
            problems.append(f"{entry.source}: {exc}")
    return tuple(keys)


def _parse_key(item: Any) -> ApiKey:
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
        "digits (make one with: python -m proxy keygen)"
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


def _parse_limits(entry: _Entry, problems: list[str]) -> Limits:
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
            problems.append(f"{entry.source}: {name}={raw!r} must be a positive {kind}")
            continue
        values[attr] = cast(raw)
    return Limits(**values)


def _is_positive(raw: Any, *, whole: bool) -> bool:
    """A finite JSON number above zero (an integer when ``whole``); JSON booleans are not."""
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        return False
    return 0 < raw < math.inf and (isinstance(raw, int) or not whole)


def _check_duplicates(tenants: Sequence[Tenant], problems: list[str]) -> None:
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
        )
        for alias, desc, key, ak in DEMO_TENANTS
    ]
    return Registry(tenants)
