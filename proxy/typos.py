"""Variables that look like ours but are not: near-misses of a setting or a tenant variable,
each named with the closest variable the gateway does read."""

from __future__ import annotations

import difflib
import functools
import re
from collections.abc import Mapping
from typing import Final

from proxy.environment import FILE_CAPABLE, FILE_SUFFIX
from proxy.settings_table import DEFAULTS
from proxy.tenant_sources import ENV_KEY, ENV_SUFFIXES_ALL, GLOBAL_FALLBACKS

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
