"""An nxlink OpenAPI emulator: the same header and signature checks, in-memory state."""

from proxy.sandbox.app import create_sandbox_app
from proxy.sandbox.verify import NxlinkCode, verify_request

__all__ = ["NxlinkCode", "create_sandbox_app", "verify_request"]
