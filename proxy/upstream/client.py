"""The upstream client: one connection pool, per-attempt signing, retries, error mapping."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Final

from yarl import URL

from proxy.config import Settings
from proxy.errors import UpstreamTimeout, UpstreamUnavailable
from proxy.nxlink import now_ms
from proxy.signing import sign_headers
from proxy.tenants import Credentials
from proxy.upstream.faults import AnswerTimedOut, ConnectFailed, ResponseBroken, StaleConnection
from proxy.upstream.pool import Pool
from proxy.upstream.response import Response

logger = logging.getLogger(__name__)

MAX_ATTEMPTS: Final = 3
# Methods that mean the same sent twice: replayed after a kept-alive connection turned out
# closed by nxlink before any answer (RFC 9110 9.2.2, as aiohttp's client does).
IDEMPOTENT: Final = frozenset({"GET", "HEAD", "PUT", "DELETE"})
LARGE_BODY: Final = 1024 * 1024

StreamFactory = Callable[[], AsyncIterator[bytes]]


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    """One call to nxlink before signing: the body is either bytes (signed) or a stream factory."""

    method: str
    url: URL
    headers: list[tuple[str, str]]
    action: str
    credentials: Credentials
    body: bytes | None = None
    stream: StreamFactory | None = None
    tenant: str = ""  # the tenant's alias, as metrics label it
    # The pool key's tenant part (the tenant's stable id): connections are never shared across
    # it, so two tenants that happen to share an alias still never share a connection.
    tenant_id: str = ""


def create_pool(settings: Settings) -> Pool:
    """The app's one pool of keep-alive connections to every tenant's nxlink."""
    return Pool(
        limit=settings.upstream_max_connections,
        connect_timeout=settings.upstream_connect_timeout,
        read_timeout=settings.upstream_read_timeout,
    )


class UpstreamClient:
    """Sends signed requests to nxlink; ``ts``/``sign`` are fresh on every attempt."""

    def __init__(
        self,
        pool: Pool,
        *,
        timeout: float,
        clock: Callable[[], int] = now_ms,
        observe: Callable[[str, float], None] | None = None,
    ):
        self.pool = pool
        self.timeout = timeout
        self.clock = clock
        self.observe = observe

    def open(self, request: UpstreamRequest) -> Exchange:
        """``async with client.open(request) as response``: the response once its headers
        arrived, released on the way out.

        UPSTREAM_TIMEOUT bounds the wait for the headers; UPSTREAM_READ_TIMEOUT (the pool's)
        then bounds the silence between two pieces of the body."""
        return Exchange(self, request)

    async def send(self, request: UpstreamRequest) -> Response:
        """The response once its headers arrived; the caller must ``release()`` it."""
        started = time.perf_counter()
        deadline = asyncio.get_running_loop().time() + self.timeout
        response = await self._attempts(request, deadline)
        if self.observe is not None:
            try:
                self.observe(request.tenant, time.perf_counter() - started)
            except BaseException:
                response.release()
                raise
        return response

    async def _attempts(self, request: UpstreamRequest, deadline: float) -> Response:
        """Up to MAX_ATTEMPTS connects; one replay on a new connection after a stale one. The
        error says whether the request had been ``sent`` (nxlink may have acted on it)."""
        fresh = False
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                return await self._send_once(request, deadline, fresh)
            except TimeoutError as exc:
                message = f"Upstream did not answer within {self.timeout:g}s"
                raise UpstreamTimeout(message, sent=isinstance(exc, AnswerTimedOut)) from exc
            except ConnectFailed as exc:
                if attempt == MAX_ATTEMPTS:
                    message = f"Cannot connect to upstream {request.url.host}"
                    raise UpstreamUnavailable(message) from exc
                reason = "connect failed"
            except StaleConnection as exc:
                if fresh or not _replayable(request):
                    raise _unavailable(exc) from exc
                fresh, reason = True, "kept-alive connection closed"
            except ConnectionError as exc:
                raise _unavailable(exc) from exc
            logger.warning(
                "upstream %s, retrying",
                reason,
                extra={"host": request.url.host, "attempt": attempt},
            )
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _send_once(self, request: UpstreamRequest, deadline: float, fresh: bool) -> Response:
        multipart = request.stream is not None
        args = (request.credentials, request.action, request.body, self.clock())
        if request.body is not None and len(request.body) > LARGE_BODY:
            # Hashing 10 MiB takes ~17 ms: off the event loop, as every tenant shares it.
            signed = await asyncio.to_thread(sign_headers, *args, multipart=multipart)
        else:
            signed = sign_headers(*args, multipart=multipart)
        # The request's headers never hold the signed names (forwarding drops them).
        headers = itertools.chain(request.headers, signed.items())
        stream = request.stream() if request.stream is not None else None
        return await self.pool.request(
            request.method,
            request.url,
            headers,
            body=request.body,
            stream=stream,
            deadline=deadline,
            tenant=request.tenant_id,
            fresh=fresh,
        )


class Exchange:
    """One request's response as an async context manager (a class: it runs on every forward,
    and a generator-based one costs several calls more)."""

    __slots__ = ("client", "request", "response")

    def __init__(self, client: UpstreamClient, request: UpstreamRequest):
        self.client = client
        self.request = request
        self.response: Response | None = None

    async def __aenter__(self) -> Response:
        self.response = await self.client.send(self.request)
        return self.response

    async def __aexit__(self, *exc_info: object) -> None:
        if self.response is not None:
            self.response.release()


def _replayable(request: UpstreamRequest) -> bool:
    """Safe to send again: idempotent, and its body bytes are at hand (a stream is read once)."""
    return request.method in IDEMPOTENT and request.stream is None


def _unavailable(exc: ConnectionError) -> UpstreamUnavailable:
    message = f"Upstream connection failed ({exc.__class__.__name__})"
    return UpstreamUnavailable(message, sent=isinstance(exc, ResponseBroken))


def json_headers(request_id: str) -> list[tuple[str, str]]:
    """Headers for a gateway-built JSON call (append-numbers)."""
    return [
        ("Content-Type", "application/json"),
        ("Accept", "application/json"),
        ("X-Request-Id", request_id),
    ]
