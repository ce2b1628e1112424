"""Admin request bodies turned into edits of the tenants file's entries.

Only the shape of a body is checked here (fields known, types the file format cannot tell);
what a tenant's fields mean is checked by ``proxy.tenants``, on the whole file, after the edit."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from proxy.admin.store import Edit, EditResult, invalid
from proxy.admin.views import LIMIT_FIELDS
from proxy.errors import NotFound, RequestError
from proxy.tenants import HASH_PREFIX, ApiKey, generate_key, hash_key, parse_key

Item = dict[str, Any]
CREATE_FIELDS: Final = frozenset({"alias", "description", "openapi", "limits", "quotas", "apiKey"})
PATCH_FIELDS: Final = CREATE_FIELDS - {"apiKey"}
MIN_KEY_LENGTH: Final = 16
MAX_TEXT: Final = {"alias": 200, "description": 2000}
MAX_GRACE: Final = 90 * 86400


def check_body(body: Any, allowed: frozenset[str], *, create: bool) -> Item:
    """``body`` as a tenant's fields, or 400 ``INVALID_TENANT`` naming every bad field."""
    if not isinstance(body, dict):
        raise invalid(["the body must be a JSON object"])
    problems = [f"{name}: unknown field" for name in sorted(set(body) - allowed)]
    if create and not body.get("alias"):
        problems.append("alias: required (a non-empty string)")
    for name, longest in MAX_TEXT.items():
        value = body.get(name)
        if name in body and not (isinstance(value, str) and len(value) <= longest):
            problems.append(f"{name}: must be a string of at most {longest} characters")
    for name in ("openapi", "limits", "quotas"):
        if name in body and not isinstance(body[name], dict):
            problems.append(f"{name}: must be an object")
    if isinstance(body.get("limits"), dict):
        problems += [
            f"limits.{k}: unknown limit" for k in sorted(set(body["limits"]) - set(LIMIT_FIELDS))
        ]
    if "apiKey" in body:
        problems += _key_problems(body["apiKey"])
    if problems:
        raise invalid(problems)
    return body


def _key_problems(key: Any) -> list[str]:
    if not isinstance(key, str) or len(key) < MIN_KEY_LENGTH:
        return [f"apiKey: must be a string of at least {MIN_KEY_LENGTH} characters"]
    if any(c.isspace() for c in key) or key.startswith(HASH_PREFIX):
        return ["apiKey: must hold no white space and not start with sha256:"]
    return []


def check_grace(body: Any) -> int:
    """``graceSeconds`` of a rotation (0 when absent)."""
    if not isinstance(body, dict) or set(body) - {"graceSeconds"}:
        raise _bad_request('the body must be {} or {"graceSeconds": n}; no other field')
    grace = body.get("graceSeconds", 0)
    if isinstance(grace, bool) or not isinstance(grace, int) or not 0 <= grace <= MAX_GRACE:
        raise _bad_request(f"graceSeconds: must be a whole number from 0 to {MAX_GRACE}")
    return grace


def _bad_request(problem: str) -> RequestError:
    return RequestError(problem, error="INVALID_REQUEST", errors=[problem])


def create_edit(body: Item) -> Edit:
    """Append a new tenant with a new id; its key (given or generated) is kept as a hash."""
    plain = body.get("apiKey") or generate_key()
    tenant_id = "t-" + secrets.token_hex(5)
    item: Item = {
        "id": tenant_id,
        "alias": body["alias"],
        "description": body.get("description", ""),
    }
    item["apiKeys"] = [{"apiKeyHash": _hash_text(plain)}]
    _merge(item, body)

    def edit(items: list[Item]) -> EditResult:
        items.append(item)
        return EditResult(tenant_id, plain, ApiKey(hash_key(plain), "").id)

    return edit


def patch_edit(tenant_id: str, body: Item) -> Edit:
    """Change the fields given; an omitted field (the accessSecret too) is kept, null drops it."""
    return _on_tenant(tenant_id, lambda item: _merge(item, body))


def delete_edit(tenant_id: str) -> Edit:
    """Remove the tenant: its keys stop working."""

    def edit(items: list[Item]) -> EditResult:
        items.pop(_index(items, tenant_id))
        return EditResult(tenant_id)

    return edit


def rotate_edit(tenant_id: str, grace: int, now: datetime) -> Edit:
    """Add a new key; the others end at ``now + grace`` at the latest."""
    plain = generate_key()
    cutoff = now + timedelta(seconds=grace)

    def edit(items: list[Item]) -> EditResult:
        item = items[_index(items, tenant_id)]
        keys = _hashed_keys(item)
        for key in keys:
            ends = _ends(key)
            if ends is None or ends > cutoff:
                key["notAfter"] = _iso(cutoff)
        item["apiKeys"] = [*keys, {"apiKeyHash": _hash_text(plain)}]
        return EditResult(tenant_id, plain, ApiKey(hash_key(plain), "").id)

    return edit


def revoke_edit(tenant_id: str, key_id: str) -> Edit:
    """Remove one key now."""

    def edit(items: list[Item]) -> EditResult:
        item = items[_index(items, tenant_id)]
        keys = _hashed_keys(item)
        kept = [k for k in keys if _key_id(k) != key_id]
        if len(kept) == len(keys):
            raise NotFound(f"Tenant {tenant_id} has no key {key_id}", error="KEY_NOT_FOUND")
        item["apiKeys"] = kept
        return EditResult(tenant_id, key_id=key_id)

    return edit


def _on_tenant(tenant_id: str, change: Callable[[Item], None]) -> Edit:
    def edit(items: list[Item]) -> EditResult:
        change(items[_index(items, tenant_id)])
        return EditResult(tenant_id)

    return edit


def _index(items: list[Item], tenant_id: str) -> int:
    for index, item in enumerate(items):
        if isinstance(item, dict) and item.get("id") == tenant_id:
            return index
    raise NotFound(f"No tenant with id {tenant_id} in the tenants file", error="TENANT_NOT_FOUND")


def _merge(item: Item, body: Item) -> None:
    """Body fields into a file entry: limits flat, openapi and quotas merged field by field."""
    for name in ("alias", "description"):
        if name in body:
            item[name] = body[name]
    _merge_into(item, body.get("limits") or {})
    for name in ("openapi", "quotas"):
        if name in body:
            section = item[name] if isinstance(item.get(name), dict) else {}
            _merge_into(section, body[name])
            item.pop(name, None)
            if section:
                item[name] = section


def _merge_into(target: Item, changes: Item) -> None:
    for name, value in changes.items():
        if value is None:
            target.pop(name, None)
        else:
            target[name] = value


def _hashed_keys(item: Item) -> list[Item]:
    """The entry's keys as ``{"apiKeyHash", "notAfter"?}`` objects (plain keys leave the file)."""
    raw: list[Any] = [{n: item.pop(n)} for n in ("apiKey", "apiKeyHash") if item.get(n) is not None]
    listed = item.pop("apiKeys", [])
    raw += listed if isinstance(listed, list) else [listed]
    return [_hashed(key) for key in raw]


def _hashed(raw: Any) -> Any:
    try:
        key = parse_key(raw)
    except ValueError:
        return raw  # left as it is: the file's checks name it
    hashed: Item = {"apiKeyHash": HASH_PREFIX + key.digest.hex()}
    if key.not_after is not None:
        hashed["notAfter"] = _iso(key.not_after)
    return hashed


def _key_id(raw: Any) -> str | None:
    try:
        return parse_key(raw).id
    except ValueError:
        return None


def _ends(raw: Any) -> datetime | None:
    try:
        return parse_key(raw).not_after
    except ValueError:
        return None


def _hash_text(plain: str) -> str:
    return HASH_PREFIX + hash_key(plain).hex()


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
