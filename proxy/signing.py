"""The nxlink request signature: pure functions, no clock and no I/O."""

from __future__ import annotations

import hashlib
from typing import Final

from proxy.tenants import Credentials

# Direct constructors: hashlib.new() looks the name up through a Python wrapper every call.
CONSTRUCTORS: Final = {"md5": hashlib.md5, "sha256": hashlib.sha256}


def _parts(
    creds: Credentials, action: str, ts_ms: int, body: bytes | None, multipart: bool
) -> tuple[bytes, ...]:
    head = f"accessKey={creds.access_key}&action={action}&bizType={creds.biz_type}&ts={ts_ms}"
    tail = "&accessSecret=" + creds.access_secret.reveal()
    if body and not multipart:
        return head.encode(), b"&body=", body, tail.encode()
    return head.encode(), tail.encode()


def string_to_sign(
    creds: Credentials, action: str, ts_ms: int, body: bytes | None, *, multipart: bool = False
) -> bytes:
    """The exact UTF-8 bytes nxlink hashes; the body goes in verbatim unless empty or multipart."""
    return b"".join(_parts(creds, action, ts_ms, body, multipart))


def compute_sign(
    creds: Credentials, action: str, ts_ms: int, body: bytes | None, *, multipart: bool = False
) -> str:
    """Lowercase hex digest of the string to sign, with the tenant's algorithm."""
    new = CONSTRUCTORS.get(creds.algorithm)
    digest = new() if new is not None else hashlib.new(creds.algorithm)
    # Hashed part by part so a large body is never copied into one string.
    for part in _parts(creds, action, ts_ms, body, multipart):
        digest.update(part)
    return digest.hexdigest()


def sign_headers(
    creds: Credentials, action: str, body: bytes | None, ts_ms: int, *, multipart: bool = False
) -> dict[str, str]:
    """The six headers every upstream request carries."""
    return {
        "accessKey": creds.access_key,
        "ts": str(ts_ms),
        "bizType": creds.biz_type,
        "action": action,
        "sign": compute_sign(creds, action, ts_ms, body, multipart=multipart),
        "algorithm": creds.algorithm,
    }
