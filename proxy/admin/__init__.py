"""The admin listener: its own application, the tenants-file writer and the console."""

from __future__ import annotations

from proxy.admin.app import create_admin_app
from proxy.admin.context import AdminContext
from proxy.admin.store import TenantsFile

__all__ = ["AdminContext", "TenantsFile", "create_admin_app"]
