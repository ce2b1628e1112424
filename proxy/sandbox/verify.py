"""nxlink's checks on the common headers and the signature, codes 1001-1005."""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

from proxy.nxlink import ALGORITHMS
from proxy.signing import compute_sign
from proxy.tenants import Credentials

MAX_SKEW_MS: Final = 60_000
REQUIRED: Final = ("accessKey", "ts", "bizType", "action", "sign")


class NxlinkCode(IntEnum):
    """nxlink's answer codes."""

    SUCCESS = 0
    MISSING_PARAMETERS = 1001
    PARAMETER_ERROR = 1002
    INVALID_SIGNATURE = 1003
    TIMESTAMP_EXPIRED = 1004
    INSUFFICIENT_PERMISSIONS = 1005


MESSAGES: Final = {
    NxlinkCode.SUCCESS: "success",
    NxlinkCode.MISSING_PARAMETERS: "Missing common parameters",
    NxlinkCode.PARAMETER_ERROR: "Parameter error",
    NxlinkCode.INVALID_SIGNATURE: "Invalid signature",
    NxlinkCode.TIMESTAMP_EXPIRED: "Timestamp has expired",
    NxlinkCode.INSUFFICIENT_PERMISSIONS: "Insufficient permissions",
}


@dataclass(frozen=True, slots=True)
class Rejection(Exception):
    """A request nxlink would refuse, with its code and a detail for the integrator."""

    code: NxlinkCode
    detail: str = ""


def verify_request(
    headers: Mapping[str, str],
    body: bytes,
    *,
    accounts: Mapping[str, Credentials],
    expected_action: str,
    now_ms: int,
    multipart: bool,
) -> Credentials:
    """The caller's account if the headers and signature are right; else raise ``Rejection``."""
    missing = [name for name in REQUIRED if not headers.get(name, "").strip()]
    if missing:
        raise Rejection(NxlinkCode.MISSING_PARAMETERS, f"missing header(s): {', '.join(missing)}")
    algorithm = headers.get("algorithm", "md5").strip().lower() or "md5"
    ts_text = headers["ts"].strip()
    # isascii: int() would also take other scripts' digits, which nxlink does not.
    if algorithm not in ALGORITHMS or not (ts_text.isascii() and ts_text.isdigit()):
        raise Rejection(
            NxlinkCode.PARAMETER_ERROR,
            "ts must be epoch milliseconds; algorithm must be md5 or sha256",
        )
    if abs(int(ts_text) - now_ms) > MAX_SKEW_MS:
        raise Rejection(NxlinkCode.TIMESTAMP_EXPIRED, f"ts is {int(ts_text) - now_ms} ms off")
    account = accounts.get(headers["accessKey"].strip())
    if account is None or account.biz_type != headers["bizType"].strip():
        raise Rejection(NxlinkCode.INSUFFICIENT_PERMISSIONS, "unknown accessKey or bizType")
    claimed = Credentials(account.access_key, account.access_secret, account.biz_type, algorithm)
    expected = compute_sign(claimed, headers["action"], int(ts_text), body, multipart=multipart)
    if not hmac.compare_digest(expected, headers["sign"].strip().lower()):
        raise Rejection(NxlinkCode.INVALID_SIGNATURE)
    if headers["action"] != expected_action:
        raise Rejection(NxlinkCode.PARAMETER_ERROR, f"action for this path is {expected_action}")
    return account
