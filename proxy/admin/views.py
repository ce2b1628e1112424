"""Tenants as the admin API shows them: keys masked, secrets reduced to ``hasSecret``."""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Any

from proxy.config import Quotas, mask_key
from proxy.settings_table import QUOTA_FIELDS
from proxy.tenants import ApiKey, Limits, Tenant

JSON = dict[str, Any]
LIMIT_FIELDS = {
    "rateLimitRps": "rate_limit_rps",
    "rateLimitBurst": "rate_limit_burst",
    "maxInflight": "max_inflight",
    "appendBatchSize": "append_batch_size",
}


def source_kind(tenant: Tenant) -> str:
    """Where a tenant is configured: ``file``, ``env`` or ``demo``."""
    if tenant.source.startswith("EXTERNAL_API_KEY_"):
        return "env"
    if tenant.source.startswith("demo tenant"):
        return "demo"
    return "file"


def tenant_view(tenant: Tenant, now: datetime) -> JSON:
    """One tenant, with nothing secret in it."""
    creds = tenant.credentials
    return {
        "id": tenant.id,
        "alias": tenant.alias,
        "description": tenant.description,
        "source": source_kind(tenant),
        "editable": source_kind(tenant) == "file",
        "keys": [key_view(key, now) for key in tenant.keys],
        "openapi": {
            "accessKey": mask_key(creds.access_key) if creds else None,
            "hasSecret": creds is not None,
            "bizType": tenant.biz_type,
            "baseUrl": tenant.base_url,
            "algorithm": creds.algorithm if creds else None,
        },
        "limits": limits_view(tenant.limits),
        "quotas": quotas_view(tenant.quotas),
    }


def key_view(key: ApiKey, now: datetime) -> JSON:
    """One key: its id, masked form and expiry."""
    not_after = key.not_after.isoformat().replace("+00:00", "Z") if key.not_after else None
    return {"id": key.id, "masked": key.hint, "notAfter": not_after, "expired": key.expired(now)}


def limits_view(limits: Limits) -> JSON:
    """The tenant's own limits, by their tenants-file names (unset ones left out)."""
    values = {name: getattr(limits, attr) for name, attr in LIMIT_FIELDS.items()}
    return {name: value for name, value in values.items() if value is not None}


def quotas_view(quotas: Quotas) -> JSON:
    """The tenant's own quotas, by their tenants-file names (unset ones left out)."""
    # Quotas' fields are declared in QUOTA_FIELDS' order.
    values = zip(QUOTA_FIELDS, dataclasses.astuple(quotas), strict=True)
    return {name: value for name, value in values if value is not None}
