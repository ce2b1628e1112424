"""URL checks shared by settings and tenants: http(s) base URLs and state backend URLs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit, urlunsplit

STATE_SCHEMES: Final = ("memory", "sqlite", "redis", "rediss", "unix")
STATE_URL_HINT: Final = "use memory://, sqlite:///path/state.db or redis://host:6379/0"


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


def mask_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (e.g. a Redis URL in a log line)."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "<hidden: not a URL>"
    if "@" in url and "@" not in parts.netloc:
        # A password with an unescaped "#", "/" or "?" ends up in the path or fragment.
        return "<hidden: a URL with unescaped characters>"
    query = "&".join(
        f"{name}=***" if name.lower() in ("password", "username") else item
        for item in parts.query.split("&")
        if item
        for name in [item.partition("=")[0]]
    )
    if password is None and query == parts.query:
        return url
    if password is not None:
        user = parts.username or ""
        parts = parts._replace(netloc=f"{user}:***@{parts.netloc.rpartition('@')[2]}")
    return urlunsplit(parts._replace(query=query))


def state_url_problem(url: str) -> str | None:
    """What is wrong with a ``STATE_URL`` (None when it is well formed), with the fix."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        return f"not a URL; {STATE_URL_HINT}"
    if parts.scheme not in STATE_SCHEMES:
        return f"unknown scheme {parts.scheme!r}; {STATE_URL_HINT}"
    if parts.scheme == "memory":
        return None if url.rstrip("/") == "memory:" else "memory:// takes no path; use memory://"
    if parts.scheme == "sqlite":
        return _sqlite_problem(url)
    if parts.scheme == "unix":
        if not parts.path.startswith("/") or parts.netloc:
            return "unix:// needs an absolute socket path; use unix:///run/redis.sock?db=0"
        return None
    if not parts.hostname:
        return f"no host; {STATE_URL_HINT}"
    if parts.path.strip("/") and not parts.path.strip("/").isdigit():
        return "the path must be a database number; use e.g. redis://host:6379/0"
    return None


def sqlite_path(url: str) -> Path:
    """The file of a ``sqlite:///relative`` or ``sqlite:////absolute`` URL."""
    return Path(url[len("sqlite:///") :])


def _sqlite_problem(url: str) -> str | None:
    if not url.startswith("sqlite:///") or len(url) == len("sqlite:///"):
        return (
            "not a SQLite file URL; use sqlite:///state.db (relative) "
            "or sqlite:////var/lib/nxlink-proxy/state.db (absolute)"
        )
    path = sqlite_path(url)
    folder = path.parent if str(path.parent) else Path(".")
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        return "the file cannot be read and written; fix its permissions or choose another"
    if not path.exists() and not (folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)):
        return f"cannot create a file in {folder}; create the folder or make it writable"
    return None
