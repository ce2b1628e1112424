"""HTTPS for the client listener: the server context, its checks, and certificate reloads."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from proxy.config import ConfigError, Settings
from proxy.reload import file_stamp

logger = logging.getLogger(__name__)

POLL_SECONDS: Final = 2.0  # well inside the 10 s in which a new certificate must be served
# A changed pair is loaded once its files hold still this long (checked at most SETTLE_CHECKS
# times, so a file rewritten all the time is loaded anyway, still well inside the 10 s).
SETTLE_SECONDS: Final = 0.25
SETTLE_CHECKS: Final = 8
CERT: Final = "TLS_CERT_FILE"
KEY: Final = "TLS_KEY_FILE"


@dataclass(frozen=True, slots=True)
class CertificatePair:
    """The PEM certificate chain and private key files of the listener."""

    cert: Path
    key: Path

    @classmethod
    def of(cls, settings: Settings) -> CertificatePair | None:
        """The configured pair, or ``None`` to serve plain HTTP."""
        if settings.tls_cert_file is None or settings.tls_key_file is None:
            return None
        return cls(settings.tls_cert_file, settings.tls_key_file)


def _no_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key.
    return b""


def load_pair(context: ssl.SSLContext, pair: CertificatePair) -> None:
    """Load ``pair`` into ``context``; a ``ConfigError`` names the file and what is wrong."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=str(pair.cert))
    except OSError as exc:  # ssl.SSLError is an OSError too
        why = "no PEM certificate in it" if isinstance(exc, ssl.SSLError) else _unreadable(exc)
        raise ConfigError([f"{CERT}={pair.cert}: {why}; give the PEM certificate chain"]) from None
    try:
        context.load_cert_chain(pair.cert, pair.key, password=_no_password)
    except OSError as exc:
        raise ConfigError([f"{KEY}={pair.key}: {_key_problem(exc)}"]) from None


def _unreadable(exc: OSError) -> str:
    return f"cannot read the file ({exc.strerror})"


def _key_problem(exc: OSError) -> str:
    if not isinstance(exc, ssl.SSLError):
        return _unreadable(exc)
    if exc.reason == "KEY_VALUES_MISMATCH":
        return f"the key does not belong to the certificate in {CERT}; give that certificate's key"
    return "no unencrypted PEM private key in it; give the certificate's key, not encrypted"


def server_context(pair: CertificatePair) -> ssl.SSLContext:
    """A TLS 1.2+ server context holding ``pair``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    load_pair(context, pair)
    return context


class CertificateWatcher:
    """Reloads a changed pair into the SAME context: new handshakes use it, open
    connections keep theirs. A bad new pair is refused and the running one stays."""

    def __init__(
        self,
        context: ssl.SSLContext,
        pair: CertificatePair,
        *,
        interval: float = POLL_SECONDS,
        settle: float = SETTLE_SECONDS,
    ):
        self.context = context
        self.pair = pair
        self.interval = interval
        self.settle = settle
        self._stamps = self._current()

    def _current(self) -> tuple[object, object]:
        return file_stamp(self.pair.cert), file_stamp(self.pair.key)

    def reload(self) -> bool:
        """Check the files' pair on a scratch context first, then load it into the live one.

        Call it on the event loop's thread: the live context is changed in two steps
        (certificate, then key), and no handshake may run between them."""
        try:
            # A failed load can leave a context half-changed (a new certificate, no key).
            server_context(self.pair)
            load_pair(self.context, self.pair)
        except ConfigError as exc:
            logger.error(
                "TLS certificate reload refused; keeping the running one",
                extra={"problems": exc.problems},
            )
            return False
        logger.info("TLS certificate reloaded", extra={"cert": str(self.pair.cert)})
        return True

    async def watch(self) -> None:
        """Poll the two files' stamps (mtime, size, inode); reload on a change, once the files
        hold still."""
        while True:
            await asyncio.sleep(self.interval)
            current = self._current()
            if current != self._stamps:
                self._stamps = await self._settled(current)
                self.reload()  # a few milliseconds, on the loop: see reload()

    async def _settled(self, seen: tuple[object, object]) -> tuple[object, object]:
        """The stamps once neither file changed for ``settle`` seconds. A deploy replaces the
        key and the certificate one after the other: loaded between the two, the new key and
        the old certificate would be refused (an error logged on every such deploy, and the
        new pair served one poll later)."""
        for _ in range(SETTLE_CHECKS):
            await asyncio.sleep(self.settle)
            now = self._current()
            if now == seen:
                break
            seen = now
        return seen


@contextlib.asynccontextmanager
async def served_context(pair: CertificatePair | None) -> AsyncIterator[ssl.SSLContext | None]:
    """The listener's context (``None`` for plain HTTP), watched for new certificates."""
    if pair is None:
        yield None
        return
    watcher = CertificateWatcher(server_context(pair), pair)
    task = asyncio.create_task(watcher.watch(), name="tls-certificate-reload")
    try:
        yield watcher.context
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
