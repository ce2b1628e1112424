"""The tenants-file writer: read-modify-write under an inter-process lock, validated with the
start-up checks, written atomically, versioned by the SHA-256 of the file's bytes (the ETag)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from proxy.config import ConfigError
from proxy.errors import GatewayError, RequestError
from proxy.tenant_sources import document_items
from proxy.tenants import Registry, derived_id

LOCK_WAIT: Final = 10.0  # seconds a write waits for another process's write to finish
Validator = Callable[[Any], Registry]  # a tenants document → the registry it makes, or ConfigError


@dataclass(frozen=True, slots=True)
class EditResult:
    """What an edit did: the tenant it touched and anything to show once (a new key)."""

    tenant_id: str
    api_key: str = ""
    key_id: str = ""


Edit = Callable[[list[dict[str, Any]]], EditResult]  # changes the tenant list in place


@dataclass(frozen=True, slots=True)
class Written:
    """A write that happened: the edit's result, the new registry and the file's new version."""

    result: EditResult
    registry: Registry
    etag: str


def invalid(problems: list[str]) -> RequestError:
    """400 ``INVALID_TENANT`` listing every problem, one line each."""
    message = "The tenant is not valid: " + "; ".join(problems[:3])
    return RequestError(message, error="INVALID_TENANT", errors=problems)


def read_only(reason: str) -> GatewayError:
    """409 ``READ_ONLY_CONFIG``: no write is possible, and why."""
    return RequestError(reason, error="READ_ONLY_CONFIG", status=409)


def etag_of(data: bytes) -> str:
    """The ETag of a file's bytes."""
    return '"' + hashlib.sha256(data).hexdigest() + '"'


class TenantsFile:
    """``TENANTS_FILE`` as the admin API reads and writes it (``path`` None: none configured)."""

    def __init__(self, path: Path | None, validate: Validator | None):
        self.path = path
        self.validate = validate

    def read_only_reason(self) -> str | None:
        """Why writes are impossible, or None when they are possible."""
        if self.path is None or self.validate is None:
            return "TENANTS_FILE is not set: tenants come from the environment; set TENANTS_FILE"
        folder = self.path.parent
        if not os.access(self.path, os.W_OK):
            return f"TENANTS_FILE={self.path} cannot be written; check its permissions"
        if not os.access(folder, os.W_OK | os.X_OK):
            return f"the folder of TENANTS_FILE={self.path} cannot be written (writes go there)"
        return None

    def etag(self) -> str | None:
        """The file's current version, None when there is no readable file."""
        if self.path is None:
            return None
        try:
            return etag_of(self.path.read_bytes())
        except OSError:
            return None

    def snapshot(self) -> tuple[str | None, Registry | None]:
        """The file's version and the registry it gives (None when it cannot be read or
        checked); blocking (run it in a thread)."""
        if self.path is None:
            return None, None
        try:
            data = self.path.read_bytes()
        except OSError:
            return None, None
        if self.validate is None:
            return etag_of(data), None
        try:
            return etag_of(data), self.validate(json.loads(data))
        except (ValueError, ConfigError):
            return etag_of(data), None

    def change(self, edit: Edit, if_match: str | None = None) -> Written:
        """Apply ``edit`` to the file's tenants under the lock; blocking (run it in a thread)."""
        reason = self.read_only_reason()
        if reason is not None:
            raise read_only(reason)
        assert self.path is not None and self.validate is not None
        with _locked(self.path):
            data = self.path.read_bytes()
            if if_match is not None and if_match.strip() not in (etag_of(data), "*"):
                raise RequestError(
                    "The tenants file changed since you read it (stale If-Match); "
                    "reload and try again",
                    error="CONFLICT",
                    status=412,
                )
            document, items = _parse(data, self.path)
            _give_ids(items, self.path)
            result = edit(items)
            registry = self._check(document, result)
            new = (json.dumps(document, indent=2, ensure_ascii=False) + "\n").encode()
            write_atomic(self.path, new)
        return Written(result, registry, etag_of(new))

    def _check(self, document: Any, result: EditResult) -> Registry:
        assert self.validate is not None
        try:
            registry = self.validate(document)
        except ConfigError as exc:
            raise invalid(exc.problems) from None
        if len(registry) == 0:
            raise invalid(["the gateway would have no tenant left; add another one first"])
        _check_alias(registry, result.tenant_id)
        return registry


def _parse(data: bytes, path: Path) -> tuple[Any, list[dict[str, Any]]]:
    try:
        document = json.loads(data)
    except ValueError as exc:
        raise read_only(f"TENANTS_FILE={path} is not valid JSON; fix it by hand first") from exc
    items = document_items(document)
    if items is None:
        raise read_only(f'TENANTS_FILE={path} is not a list of tenants or {{"keys": [...]}}')
    return document, items


def _give_ids(items: list[dict[str, Any]], path: Path) -> None:
    """Write down the id each entry already has in the running gateway (derived when absent)."""
    for index, item in enumerate(items):
        if isinstance(item, dict) and "id" not in item:
            alias = item.get("alias") or f"{path} entry #{index + 1}"
            items[index] = {"id": derived_id(str(alias)), **item}


def _check_alias(registry: Registry, tenant_id: str) -> None:
    mine = next((t for t in registry.tenants if t.id == tenant_id), None)
    if mine is None:
        return
    for other in registry.tenants:
        if other.id != tenant_id and other.alias == mine.alias:
            raise invalid(
                [f"alias {mine.alias} is already used by tenant {other.id}; pick another"]
            )


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on a lock file next to ``path``, shared by every process."""
    lock_path = path.with_name(f".{path.name}.lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise read_only(f"another process holds {lock_path}; try again") from None
                time.sleep(0.01)  # a write takes milliseconds; this is a thread, not the loop
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` so that a reader sees the old file or the new, never a part:
    a temporary file in the same folder, fsynced, renamed over it, then the folder fsynced."""
    mode = stat.S_IMODE(os.stat(path).st_mode)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fchmod(file.fileno(), mode)
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
