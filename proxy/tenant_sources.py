"""Where tenants come from: ``EXTERNAL_API_KEY_N_*`` variables and the tenants JSON file, read
into raw entries that name their source (checked and built in ``proxy.tenants``)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from proxy.settings_table import QUOTA_FIELDS

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
# Tenant variables beyond the nxlink account: suffix → the tenants-file field they stand for.
ENV_LIMITS: Final = {
    "_RATE_LIMIT_RPS": "rateLimitRps",
    "_RATE_LIMIT_BURST": "rateLimitBurst",
    "_MAX_INFLIGHT": "maxInflight",
}
ENV_QUOTAS: Final = {f"_QUOTA_{suffix}": name for name, suffix in QUOTA_FIELDS.items()}
ENV_PREVIOUS: Final = ("_PREVIOUS", "_PREVIOUS_NOT_AFTER")
ENV_SUFFIXES: Final = frozenset(ENV_FIELDS) | frozenset(ENV_LIMITS) | frozenset(ENV_QUOTAS)
ENV_SUFFIXES_ALL: Final = ENV_SUFFIXES | frozenset(ENV_PREVIOUS)
GLOBAL_FALLBACKS: Final = {
    "accessKey": "OPENAPI_ACCESS_KEY",
    "accessSecret": "OPENAPI_ACCESS_SECRET",
    "bizType": "OPENAPI_BIZ_TYPE",
    "baseUrl": "OPENAPI_BASE_URL",
    "algorithm": "OPENAPI_ALGORITHM",
}
ENTRY_FIELDS: Final = frozenset(
    {"id", "apiKey", "apiKeyHash", "apiKeys", "alias", "description", "openapi", "quotas"}
    | {"rateLimitRps", "rateLimitBurst", "maxInflight", "appendBatchSize"}
)
OPENAPI_FIELDS: Final = frozenset(GLOBAL_FALLBACKS)
NO_DOCUMENT: Final = object()  # the tenants file could not be read or parsed


@dataclass(slots=True)
class Entry:
    """One tenant's raw fields and where they came from."""

    source: str
    fields: dict[str, Any] = field(repr=False)  # holds the plain key
    openapi: dict[str, Any] = field(repr=False)  # holds the accessSecret
    names: dict[str, str] = field(repr=False)
    where: str = ""  # the source as problems name it (a file entry's alias added)

    @property
    def place(self) -> str:
        return self.where or self.source


def entries_from_env(env: Mapping[str, str], problems: list[str]) -> Iterable[Entry]:
    """One entry per ``EXTERNAL_API_KEY_N``, in numeric order; unknown suffixes are problems."""
    # Keyed by the digits as written: EXTERNAL_API_KEY_03 and _3 are two variables.
    groups: dict[str, dict[str, str]] = {}
    for name, value in env.items():
        found = ENV_KEY.fullmatch(name)
        if found is None:
            continue
        suffix = found.group(2) or ""
        if suffix and suffix not in ENV_SUFFIXES_ALL:
            known = ", ".join(f"EXTERNAL_API_KEY_N{s}" for s in (*ENV_FIELDS, *ENV_PREVIOUS))
            problems.append(
                f"{name}: unknown tenant variable; known ones are {known}, "
                "..._RATE_LIMIT_RPS, ..._RATE_LIMIT_BURST, ..._MAX_INFLIGHT, ..._QUOTA_*"
            )
            continue
        groups.setdefault(found.group(1), {})[suffix] = value
    for number in sorted(groups, key=lambda digits: (int(digits), digits)):
        yield from _env_entry(number, groups[number], problems)


def _env_entry(number: str, group: dict[str, str], problems: list[str]) -> Iterable[Entry]:
    prefix = f"EXTERNAL_API_KEY_{number}"
    if not group.get("", "").strip():
        problems.append(
            f"{prefix}: missing or empty, but {prefix}_* variables are set; "
            f"set {prefix} to the tenant's API key or remove the others"
        )
        return
    named = {**ENV_FIELDS, **ENV_LIMITS, **ENV_QUOTAS}
    names = {field: prefix + s for s, field in named.items()} | {"apiKey": prefix}
    fields: dict[str, Any] = {"id": f"env-{number}", "alias": group.get("_ALIAS")}
    fields["description"] = group.get("_DESC")
    fields["apiKeys"] = _env_keys(prefix, group, problems)
    fields |= {ENV_LIMITS[s]: _env_number(v) for s, v in group.items() if s in ENV_LIMITS}
    quotas = {ENV_QUOTAS[s]: _env_number(v) for s, v in group.items() if s in ENV_QUOTAS}
    if quotas:
        fields["quotas"] = quotas
    openapi = {ENV_FIELDS[s]: v for s, v in group.items() if s.startswith("_OPENAPI_")}
    yield Entry(prefix, fields, openapi, names)


def _env_keys(prefix: str, group: dict[str, str], problems: list[str]) -> list[dict[str, str]]:
    """The tenant's key, and ``_PREVIOUS`` (an older key still accepted, maybe until a time)."""
    keys = [{"apiKey": group[""].strip()}]
    previous, until = group.get("_PREVIOUS", "").strip(), group.get("_PREVIOUS_NOT_AFTER")
    if previous:
        keys.append({"apiKey": previous} | ({"notAfter": until.strip()} if until else {}))
    elif until is not None:
        problems.append(
            f"{prefix}_PREVIOUS_NOT_AFTER={until}: there is no {prefix}_PREVIOUS; "
            "set the old key there or remove this variable"
        )
    return keys


def _env_number(text: str) -> object:
    """A variable's text as the JSON number a tenants file would hold (else the text, which
    the field's check then refuses)."""
    for cast in (int, float):
        try:
            return cast(text.strip())
        except ValueError:
            continue
    return text


def read_document(path: Path, problems: list[str]) -> Any:
    """The tenants file's parsed JSON, or ``NO_DOCUMENT`` (a problem said why)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(
            f"TENANTS_FILE={path}: cannot read the file ({exc.__class__.__name__}); "
            "check the path and its permissions"
        )
    except json.JSONDecodeError as exc:
        problems.append(
            f"TENANTS_FILE={path}: invalid JSON at line {exc.lineno} column "
            f"{exc.colno} ({exc.msg}); fix the syntax"
        )
    return NO_DOCUMENT


def document_items(data: Any) -> list[Any] | None:
    """The tenant list of a tenants document (a list, or ``{"keys": [...]}``); None otherwise."""
    items = data.get("keys") if isinstance(data, dict) else data
    return items if isinstance(items, list) else None


def entries_from_document(data: Any, path: Path, problems: list[str]) -> Iterable[Entry]:
    """One entry per object of a tenants document, read from ``path`` or about to be written
    there (the admin API validates a write before making it)."""
    if data is NO_DOCUMENT:
        return
    items = document_items(data)
    if items is None:
        problems.append(f'TENANTS_FILE={path}: expected a list of tenants or {{"keys": [...]}}')
        return
    for index, item in enumerate(items, 1):
        source = where = f"{path} entry #{index}"
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
        names = {k: f"{where} {k}" for k in ENTRY_FIELDS | OPENAPI_FIELDS | set(QUOTA_FIELDS)}
        yield Entry(source, dict(item), dict(openapi), names, where)
