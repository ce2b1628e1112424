"""Slips in a configuration: variables that look like ours but are not (each named with the
closest one the gateway reads), and values still as the examples ship them."""

from __future__ import annotations

import difflib
import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Final

from proxy.config import ConfigError
from proxy.environment import FILE_CAPABLE, FILE_SUFFIX
from proxy.settings_table import DEFAULTS
from proxy.tenant_sources import ENV_KEY, ENV_SUFFIXES_ALL, GLOBAL_FALLBACKS, Entry

# A variable starting so is meant for the gateway, close to one of its names or not.
OUR_PREFIXES: Final = (
    "OPENAPI_",
    "EXTERNAL_",
    "RATE_LIMIT",
    "UPSTREAM_",
    "APPEND_",
    "IDEMPOTENCY_",
    "QUOTA_",
    "ADMIN_",
    "TLS_",
    "STATE_",
    "SHUTDOWN_",
    "MAX_INFLIGHT",
    "MAX_BODY",
    "MAX_UPLOAD",
    "CORS_",
    "PUBLIC_KEY",
    "TENANTS_",
)
# Any other variable this close to one of ours is a slip too (TENANT_FILE, LOGLEVEL); HOSTNAME,
# LANG, PATH and the rest of an ordinary environment stay well below it.
NEAR: Final = 0.86
# How close a prefixed variable must be for its suggestion to be worth making.
SUGGEST: Final = 0.75
TENANT_NUMBER: Final = re.compile(r"\d+")
# config/.env.example, config/tenants.example.json and deploy/ ship their values so.
PLACEHOLDER: Final = "replace-with-"
PLACEHOLDER_HINT: Final = (
    "replace each with the real value (a client key from '.venv/bin/nxlink-proxy keygen', the "
    "tenant's nxlink accessKey and accessSecret); to try the configuration first, "
    "'.venv/bin/nxlink-proxy serve --sandbox' serves it against the bundled sandbox"
)


@functools.cache
def plain_names() -> frozenset[str]:
    """Every variable the gateway reads, tenant variables written with ``N`` for the number."""
    return frozenset(
        set(DEFAULTS)
        | set(GLOBAL_FALLBACKS.values())
        | {"EXTERNAL_API_KEY_N" + suffix for suffix in ("", *ENV_SUFFIXES_ALL)}
    )


@functools.cache
def known_names() -> frozenset[str]:
    """The plain names and the ``NAME_FILE`` forms of those that may be given as a file."""
    plain = plain_names()
    files = {n + FILE_SUFFIX for n in plain if n in DEFAULTS or FILE_CAPABLE.fullmatch(n)}
    return plain | files


def unknown_variables(env: Mapping[str, str]) -> list[str]:
    """One line per variable of ``env`` that looks like ours but is not, with the closest name."""
    return [line for name in sorted(env) if (line := _slip(name)) is not None]


def _slip(name: str) -> str | None:
    # EXTERNAL_API_KEY_N_*: the tenant loader names unknown suffixes itself, as errors.
    if ENV_KEY.fullmatch(name):
        return None
    shape = TENANT_NUMBER.sub("N", name, count=1)
    if shape in known_names():
        return None
    prefixed = name.startswith(OUR_PREFIXES)
    cutoff = SUGGEST if prefixed else NEAR
    # A NAME_FILE form is suggested only for a variable that ends in _FILE itself.
    candidates = known_names() if name.endswith(FILE_SUFFIX) else plain_names()
    match = difflib.get_close_matches(shape, candidates, n=1, cutoff=cutoff)
    if match:
        number = TENANT_NUMBER.search(name)
        closest = match[0].replace("_N", "_" + number.group(), 1) if number else match[0]
        return f"{name}: not a variable the gateway reads; did you mean {closest}?"
    if prefixed:
        return f"{name}: not a variable the gateway reads; see the README's settings and tenants"
    return None


def placeholders(entries: Iterable[Entry], env: Mapping[str, str]) -> list[str]:
    """Where the tenants' keys or nxlink accounts still hold ``replace-with-...`` (no value)."""
    return [place for entry in entries for place in _entry_placeholders(entry, env)]


def _entry_placeholders(entry: Entry, env: Mapping[str, str]) -> list[str]:
    found = []
    listed = entry.fields.get("apiKeys")
    keys = [entry.fields.get("apiKey"), *(listed if isinstance(listed, list) else [])]
    plain = [k.get("apiKey") if isinstance(k, dict) else k for k in keys]
    if any(_is_placeholder(k) for k in plain):
        found.append(entry.names["apiKey"])
    for name, fallback in GLOBAL_FALLBACKS.items():
        own = entry.openapi.get(name)
        if _is_placeholder(own) or (not own and _is_placeholder(env.get(fallback))):
            found.append(entry.names[name] if own else fallback)
    return found


def _is_placeholder(value: object) -> bool:
    return isinstance(value, str) and value.strip().startswith(PLACEHOLDER)


def placeholder_problems(places: Sequence[str]) -> list[str]:
    """One line per place still holding an example's placeholder, then the hint (or nothing)."""
    if not places:
        return []
    lines = [f"{place}: still the example's placeholder ({PLACEHOLDER}...)" for place in places]
    return [*lines, PLACEHOLDER_HINT]


def refuse_placeholders(places: Sequence[str]) -> None:
    """Raise ``ConfigError`` naming every place whose value is still an example's placeholder."""
    if places:
        raise ConfigError(placeholder_problems(places))
