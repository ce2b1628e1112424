"""The environment as the gateway sees it: ``.env`` < real environment < CLI flags, and
``NAME_FILE`` variables resolved to the files' text."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from dotenv import dotenv_values

from proxy.config import DEFAULT_ENV_FILE, ConfigError, Settings, parse_settings
from proxy.settings_table import DEFAULTS

FILE_SUFFIX: Final = "_FILE"
# Only our own variables may be given as NAME_FILE (SSL_CERT_FILE and kin are not ours).
FILE_CAPABLE: Final = re.compile(r"(OPENAPI_|EXTERNAL_API_KEY_)\w+")


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


def process_environ() -> Mapping[str, str]:
    """The real process environment (only the CLI calls this)."""
    return os.environ
