"""The upstream client: one pooled session, per-attempt signing, connect retries, error mapping."""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Final

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from proxy.config import Settings
from proxy.errors import GatewayError, UpstreamError, UpstreamTimeout, UpstreamUnavailable
from proxy.nxlink import now_ms
from proxy.signing import sign_headers
from proxy.tenants import Credentials

logger = logging.getLogger(__name__)

MAX_ATTEMPTS: Final = 3
LARGE_BODY: Final = 1024 * 1024
# Failures that happen before a single byte reached nxlink, so a retry cannot duplicate a call.
CONNECT_ERRORS: Final = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)
# Headers aiohttp would add on its own; a client that did not send them must not get them
# added (what a client did send is in the request's headers, which always win).
AUTO_HEADERS: Final = ("Accept-Encoding", "User-Agent", "Content-Type", "Accept")

StreamFactory = Callable[[], AsyncIterator[bytes]]


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    """One call to nxlink before signing: the body is either bytes (signed) or a stream factory."""

    method: str
    url: URL
    headers: CIMultiDict[str]
    action: str
    credentials: Credentials
    body: bytes | None = None
    stream: StreamFactory | None = None
    tenant: str = ""


def create_session(settings: Settings) -> aiohttp.ClientSession:
    """The app's one pooled session: no cookie jar shared across tenants, no proxy from env."""
    connector = aiohttp.TCPConnector(
        limit=settings.upstream_max_connections, limit_per_host=0, ttl_dns_cache=300
    )
    # No total (it would cut long streams) and no sock_read (an idle stream is not an error):
    # UPSTREAM_TIMEOUT bounds the wait for response headers in UpstreamClient.open.
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=settings.upstream_connect_timeout)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
        auto_decompress=False,
        skip_auto_headers=AUTO_HEADERS,
    )


class UpstreamClient:
    """Sends signed requests to nxlink; ``ts``/``sign`` are fresh on every attempt."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        timeout: float,
        clock: Callable[[], int] = now_ms,
        observe: Callable[[str, float], None] | None = None,
    ):
        self.session = session
        self.timeout = timeout
        self.clock = clock
        self.observe = observe

    @asynccontextmanager
    async def open(self, request: UpstreamRequest) -> AsyncIterator[aiohttp.ClientResponse]:
        """Send ``request`` and yield the response once its headers arrived."""
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout):
                response = await self._send_with_retries(request)
        except TimeoutError as exc:
            raise UpstreamTimeout(f"Upstream did not answer within {self.timeout:g}s") from exc
        try:
            if self.observe is not None:
                self.observe(request.tenant, time.perf_counter() - started)
            yield response
        finally:
            response.release()

    async def _send_with_retries(self, request: UpstreamRequest) -> aiohttp.ClientResponse:
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                return await self._send_once(request)
            except CONNECT_ERRORS as exc:
                if attempt == MAX_ATTEMPTS:
                    raise UpstreamUnavailable(
                        f"Cannot connect to upstream {request.url.host} ({exc.__class__.__name__})"
                    ) from exc
                logger.warning(
                    "upstream connect failed, retrying",
                    extra={"host": request.url.host, "attempt": attempt, "reason": str(exc)},
                )
            except aiohttp.ClientError as exc:
                if isinstance(exc.__cause__, GatewayError):
                    # The client's body stream refused the upload (413); aiohttp wrapped it.
                    raise exc.__cause__ from None
                raise _upstream_error(exc) from exc
        raise AssertionError("unreachable")

    async def _send_once(self, request: UpstreamRequest) -> aiohttp.ClientResponse:
        multipart = request.stream is not None
        args = (request.credentials, request.action, request.body, self.clock())
        if request.body is not None and len(request.body) > LARGE_BODY:
            # Hashing 10 MiB takes ~17 ms: off the event loop, as every tenant shares it.
            signed = await asyncio.to_thread(sign_headers, *args, multipart=multipart)
        else:
            signed = sign_headers(*args, multipart=multipart)
        headers = CIMultiDict(request.headers)
        headers.update(signed)
        data = request.stream() if request.stream is not None else _payload(request.body)
        return await self.session.request(
            request.method,
            request.url,
            headers=headers,
            data=data,
            allow_redirects=False,
        )


def _upstream_error(exc: aiohttp.ClientError) -> UpstreamError:
    """A read timeout is a timeout; any other failure after connecting: nxlink unavailable."""
    if isinstance(exc, aiohttp.ServerTimeoutError):
        return UpstreamTimeout(f"Upstream read timed out ({exc.__class__.__name__})")
    return UpstreamUnavailable(f"Upstream connection failed ({exc.__class__.__name__})")


def _payload(body: bytes | None) -> bytes | io.BytesIO | None:
    """Small bodies as bytes (cheapest); past aiohttp's 1 MiB mark as a fresh BytesIO,
    which aiohttp writes in parts instead of warning that raw bytes may block the loop."""
    if not body:
        return None
    return io.BytesIO(body) if len(body) > LARGE_BODY else body


def json_headers(extra: Mapping[str, str] | None = None) -> CIMultiDict[str]:
    """Headers for a gateway-built JSON call (append-numbers)."""
    headers = CIMultiDict({"Content-Type": "application/json", "Accept": "application/json"})
    headers.update(extra or {})
    return headers
