"""A hostile nxlink: every case runs against the gateway's upstream client and against aiohttp's
``ClientSession``, and the gateway's must be at least as safe (bounded time and memory, no
dirty connection reused, nothing crossing tenants, a refusal or a cut where the answer is
broken). The upstream is a scripted raw socket server (tests/hostile.py)."""

from __future__ import annotations

import asyncio
import io
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final, Protocol

import aiohttp
import pytest
from yarl import URL

from proxy.errors import UpstreamTimeout, UpstreamUnavailable
from proxy.upstream import Pool, UpstreamClient, UpstreamRequest
from tests.conftest import CREDS_A, CREDS_B
from tests.hostile import Peer, Script, answer_each, endless, raw_upstream

READ_TIMEOUT: Final = 0.5  # UPSTREAM_READ_TIMEOUT for these tests
HEAD_TIMEOUT: Final = 1.0  # UPSTREAM_TIMEOUT
LIMIT: Final = 10.0  # no case may take longer, whichever client
OK_5: Final = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
CREDENTIALS: Final = {"a": CREDS_A, "b": CREDS_B}


@dataclass(slots=True)
class Outcome:
    """What a client made of one exchange: ``ok`` (a complete answer), ``refused`` (no
    answer: a 502), ``timeout`` (no head in time: a 504) or ``cut`` (head, broken body)."""

    kind: str
    status: int = 0
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0


class Fetcher(Protocol):
    """One of the two clients under test."""

    name: str

    async def fetch(
        self, method: str, url: URL, *, tenant: str = "a", body: bytes | None = None
    ) -> Outcome: ...

    async def close(self) -> None: ...


class GatewayFetcher:
    """The gateway's own client: ``UpstreamClient`` over ``Pool``, timeouts as configured."""

    name = "gateway"

    def __init__(self, limit: int = 8) -> None:
        self.pool = Pool(limit=limit, connect_timeout=1.0, read_timeout=READ_TIMEOUT)
        self.client = UpstreamClient(self.pool, timeout=HEAD_TIMEOUT)

    async def fetch(
        self, method: str, url: URL, *, tenant: str = "a", body: bytes | None = None
    ) -> Outcome:
        headers = [("X-Tenant", tenant)]
        request = UpstreamRequest(
            method, url, headers, "test.call", CREDENTIALS[tenant], body, None, tenant, tenant
        )
        try:
            response = await self.client.send(request)
        except UpstreamTimeout:
            return Outcome("timeout")
        except UpstreamUnavailable:
            return Outcome("refused")
        try:
            data = await response.read()
        except ConnectionError:
            return Outcome("cut", response.status)
        finally:
            response.release()
        return Outcome("ok", response.status, data, list(response.raw_headers))

    async def close(self) -> None:
        await self.pool.close()


class SessionFetcher:
    """aiohttp's ``ClientSession`` with the same timeouts: connect, and silence on the socket."""

    name = "session"

    def __init__(self, limit: int = 8) -> None:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=1.0, sock_read=READ_TIMEOUT)
        connector = aiohttp.TCPConnector(limit=limit)
        self.session = aiohttp.ClientSession(
            timeout=timeout, connector=connector, auto_decompress=False
        )

    async def fetch(
        self, method: str, url: URL, *, tenant: str = "a", body: bytes | None = None
    ) -> Outcome:
        try:
            upload = io.BytesIO(body) if body is not None else None  # aiohttp warns on bytes
            async with self.session.request(
                method, url, data=upload, headers={"X-Tenant": tenant}
            ) as answer:
                try:
                    data = await answer.read()
                except (aiohttp.ClientError, TimeoutError):
                    return Outcome("cut", answer.status)
                return Outcome("ok", answer.status, data, list(_decoded(answer.raw_headers)))
        except TimeoutError:
            return Outcome("timeout")
        except aiohttp.ClientError:
            return Outcome("refused")

    async def close(self) -> None:
        await self.session.close()


def _decoded(raw: tuple[tuple[bytes, bytes], ...]) -> list[tuple[str, str]]:
    return [(n.decode("latin-1"), v.decode("latin-1")) for n, v in raw]


FETCHERS: Final[dict[str, Callable[[], Fetcher]]] = {
    "gateway": GatewayFetcher,
    "session": SessionFetcher,
}


@pytest.fixture(params=sorted(FETCHERS))
async def fetcher(request: pytest.FixtureRequest) -> AsyncIterator[Fetcher]:
    """Each test runs once with each client."""
    client: Fetcher = FETCHERS[request.param]()
    try:
        yield client
    finally:
        await client.close()


async def timed(call: Awaitable[Outcome], limit: float = LIMIT) -> Outcome:
    """``call``'s outcome with its duration, or ``hang`` once ``limit`` passed."""
    started = time.monotonic()
    try:
        async with asyncio.timeout(limit):
            outcome = await call
    except TimeoutError:
        outcome = Outcome("hang")
    outcome.seconds = time.monotonic() - started
    return outcome


# One exchange per case: the script, then what each client makes of it.


def answer_then_hold(data: bytes) -> Script:
    """Answer the first request with ``data``, then send nothing more."""

    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.send(data)
        await peer.hold()

    return script


def answer_then_close(data: bytes) -> Script:
    """Answer the first request with ``data`` and close the connection."""

    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.send(data)

    return script


def endless_after(prefix: bytes, piece: bytes, limit: int = 16 * 1024 * 1024) -> Script:
    """Send ``prefix`` then ``piece`` over and over (an endless line) while the client reads."""

    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.send(prefix)
        await endless(peer, piece, limit)
        await peer.hold()

    return script


def reset_after(data: bytes) -> Script:
    """Send ``data`` then reset the connection."""

    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.send(data)
        peer.reset()

    return script


def trickle(data: bytes, pause: float) -> Script:
    """Send ``data`` one byte at a time, ``pause`` seconds apart."""

    async def script(peer: Peer) -> None:
        await peer.request()
        for byte in data:
            await peer.send(bytes([byte]))
            await asyncio.sleep(pause)  # the hostile pacing itself, not a synchronisation
        await peer.hold()

    return script


A_KB: Final = b"a" * 1024
CHUNKED: Final = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


@dataclass(frozen=True, slots=True)
class Case:
    """A hostile answer and the outcome kind each client ends with (``gateway`` is the
    required one; ``session`` is what aiohttp does, pinned so the comparison stays true)."""

    script: Script
    gateway: str
    session: str
    seconds: float = 3.0  # the longest the gateway may take
    limit: float = LIMIT  # past it a client "hangs"
    valid: bool = False  # a well-formed answer (only "ok" is right), else a broken one


CASES: Final = {
    "endless-header-line": Case(
        endless_after(b"HTTP/1.1 200 OK\r\nX-Endless: ", A_KB * 64), "refused", "refused", 1.0
    ),
    "endless-status-line": Case(
        endless_after(b"HTTP/1.1 200 ", A_KB * 64), "refused", "refused", 1.0
    ),
    "endless-trailer-line": Case(
        endless_after(CHUNKED + b"5\r\nhello\r\n0\r\nX-Endless: ", A_KB * 64),
        "cut",
        "refused",
        1.0,
    ),
    "endless-headers": Case(
        endless_after(b"HTTP/1.1 200 OK\r\n", b"X-Many: v\r\n" * 4096), "refused", "refused", 1.0
    ),
    "ten-thousand-headers": Case(
        answer_then_hold(
            b"HTTP/1.1 200 OK\r\n" + b"X-H: v\r\n" * 10_000 + b"Content-Length: 0\r\n\r\n"
        ),
        "refused",
        "refused",
    ),
    "1xx-storm": Case(
        endless_after(b"", b"HTTP/1.1 100 Continue\r\n\r\n" * 2048), "refused", "hang", 1.0, 1.0
    ),
    "101-switching-protocols": Case(
        answer_then_hold(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\nxyz"),
        "refused",
        "ok",
    ),
    "stalled-body": Case(
        answer_then_hold(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhel"), "cut", "cut"
    ),
    "stalled-head": Case(answer_then_hold(b"HTTP/1.1 200 OK\r\n"), "timeout", "timeout"),
    "status-099": Case(
        answer_then_hold(b"HTTP/1.1 099 Odd\r\nContent-Length: 0\r\n\r\n"), "refused", "ok"
    ),
    "status-999": Case(
        answer_then_hold(b"HTTP/1.1 999 Odd\r\nContent-Length: 0\r\n\r\n"), "refused", "ok"
    ),
    "malformed-chunk-with-head": Case(
        answer_then_hold(CHUNKED + b"5\r\nhello\r\nzz\r\nmore\r\n"), "cut", "refused"
    ),
    "negative-chunk-size": Case(answer_then_hold(CHUNKED + b"-5\r\nhello\r\n"), "cut", "refused"),
    "overflowing-chunk-size": Case(
        answer_then_hold(CHUNKED + b"f" * 40 + b"\r\nhello\r\n"), "cut", "refused"
    ),
    "chunk-size-with-0x": Case(answer_then_hold(CHUNKED + b"0x5\r\nhello\r\n"), "cut", "refused"),
    "content-length-and-chunked": Case(
        answer_then_hold(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\n\r\n"
        ),
        "refused",
        "refused",
    ),
    "duplicate-content-length": Case(
        answer_then_hold(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello!!"
        ),
        "refused",
        "refused",
    ),
    "obs-fold": Case(
        answer_then_hold(b"HTTP/1.1 200 OK\r\nX-Fold: a\r\n b\r\nContent-Length: 0\r\n\r\n"),
        "refused",
        "ok",
    ),
    "nul-in-header-value": Case(
        answer_then_hold(b"HTTP/1.1 200 OK\r\nX-Nul: a\x00b\r\nContent-Length: 0\r\n\r\n"),
        "refused",
        "refused",
    ),
    "bare-cr-in-header-value": Case(
        answer_then_hold(b"HTTP/1.1 200 OK\r\nX-Cr: a\rb\r\nContent-Length: 0\r\n\r\n"),
        "refused",
        "refused",
    ),
    "bare-lf-in-header-value": Case(
        answer_then_hold(b"HTTP/1.1 200 OK\r\nX-Lf: a\nb\r\nContent-Length: 0\r\n\r\n"),
        "refused",
        "refused",
    ),
    "reset-mid-body": Case(
        reset_after(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhello"), "cut", "cut"
    ),
    "closed-mid-body": Case(
        answer_then_close(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhello"), "cut", "cut"
    ),
    "http-1.0-close-delimited": Case(
        answer_then_close(b"HTTP/1.0 200 OK\r\n\r\nuntil the end"), "ok", "ok", valid=True
    ),
    "slow-trickle-body": Case(
        trickle(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\ntrickled", 0.01),
        "ok",
        "ok",
        valid=True,
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
async def test_hostile_answer(fetcher: Fetcher, name: str) -> None:
    case = CASES[name]
    async with raw_upstream(case.script) as upstream:
        outcome = await timed(fetcher.fetch("GET", upstream.url()), case.limit)
    assert outcome.kind == getattr(case, fetcher.name), outcome
    if fetcher.name == "gateway":
        assert outcome.seconds < case.seconds
    for _name, value in outcome.headers:
        assert not set(value) & set("\x00\r\n")

    if case.valid:
        assert outcome.body in (b"until the end", b"trickled")


def safe(case: Case, kind: str) -> bool:
    """A valid answer must arrive whole; a broken one must end as a 502/504 or a cut."""
    return kind == "ok" if case.valid else kind in ("refused", "timeout", "cut")


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_gateway_is_at_least_as_safe_as_the_session(name: str) -> None:
    case = CASES[name]
    assert safe(case, case.gateway)
    assert safe(case, case.gateway) >= safe(case, case.session)


@pytest.mark.parametrize(
    "prefix",
    [b"HTTP/1.1 200 OK\r\nX-Endless: ", CHUNKED + b"0\r\nX-T: "],
    ids=["header", "trailer"],
)
async def test_an_endless_line_keeps_memory_flat(fetcher: Fetcher, prefix: bytes) -> None:
    async with raw_upstream(endless_after(prefix, A_KB * 64)) as upstream:
        tracemalloc.start()
        try:
            outcome = await timed(fetcher.fetch("GET", upstream.url()))
            _current, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert outcome.kind in ("refused", "cut")
    assert peak < 2 * 1024 * 1024  # the upstream sends up to 16 MiB


async def test_an_upload_answered_early_does_not_delay_the_next_request(
    fetcher: Fetcher,
) -> None:
    """nxlink answers an 8 MiB POST at once and reads its body a second later: the next
    request must not queue behind that body on the same connection."""
    late = asyncio.Event()

    async def script(peer: Peer) -> None:
        head = await peer.reader.readuntil(b"\r\n\r\n")
        peer.heads.append(head)
        await peer.send(OK_5)
        if b"POST" in head:
            await asyncio.wait_for(late.wait(), 1.0)  # reads the upload later (or never)
        await answer_each(peer, OK_5)

    async with raw_upstream(script) as upstream:
        first = await timed(fetcher.fetch("POST", upstream.url(), body=b"x" * 8 * 1024 * 1024))
        second = await timed(fetcher.fetch("GET", upstream.url()))
        late.set()
    assert first.kind == second.kind == "ok"
    assert second.seconds < 0.5
    assert len(upstream.peers) == 2  # the dirty connection was not reused


def close_second_request() -> Script:
    """The first connection answers one request, then closes when the next arrives;
    the others answer every request (a HEAD without the body)."""

    async def script(peer: Peer) -> None:
        if peer.number == 0:
            await peer.request()
            await peer.send(OK_5)
            await peer.request()
            return  # closed without a byte of an answer
        while head := await peer.request():
            await peer.send(OK_5[: -len(b"hello")] if head.startswith(b"HEAD") else OK_5)

    return script


REPLAYED: Final = {  # the methods each client sends again on a new connection
    "gateway": {"GET", "HEAD", "PUT", "DELETE"},
    "session": {"GET", "HEAD", "PUT", "DELETE"},
}


@pytest.mark.parametrize("method", ["GET", "HEAD", "PUT", "DELETE", "POST"])
async def test_a_kept_alive_connection_closed_by_the_upstream(
    fetcher: Fetcher, method: str
) -> None:
    async with raw_upstream(close_second_request()) as upstream:
        first = await timed(fetcher.fetch("GET", upstream.url()))
        second = await timed(fetcher.fetch(method, upstream.url(), body=b"{}"))
    assert first.kind == "ok"
    if method in REPLAYED[fetcher.name]:
        assert (second.kind, second.status) == ("ok", 200)
        assert len(upstream.peers) == 2
    else:  # not idempotent: never sent twice
        assert second.kind == "refused"
        assert len(upstream.peers) == 1


STRAY: Final = b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nA-PRIVATE"


async def test_stray_bytes_never_reach_another_tenant(fetcher: Fetcher) -> None:
    """The upstream leaves an answer meant for tenant A on A's connection; tenant B's next
    request must not read it. ClientSession has no tenants: one session shares them all."""

    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.send(OK_5)
        await answer_each(peer, STRAY)

    async with raw_upstream(script) as upstream:
        first = await timed(fetcher.fetch("GET", upstream.url(), tenant="a"))
        second = await timed(fetcher.fetch("GET", upstream.url(), tenant="b"))
    assert first.body == b"hello"
    if fetcher.name == "gateway":
        assert second.body == b"hello"
        assert all(len(tenants) == 1 for tenants in upstream.tenants_per_connection())
    else:
        assert second.body == b"A-PRIVATE"  # what a shared pool does


NO_BODY_CASES: Final = {
    "204-with-body": ("GET", b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nhello"),
    "304-with-body": ("GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\nhello"),
    "head-with-body": ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"),
}


@pytest.mark.parametrize("name", sorted(NO_BODY_CASES))
async def test_a_body_after_a_bodiless_answer_is_never_read_as_the_next_answer(
    fetcher: Fetcher, name: str
) -> None:
    method, hostile = NO_BODY_CASES[name]
    answered = 0

    async def script(peer: Peer) -> None:
        nonlocal answered
        while await peer.request():
            answered += 1
            await peer.send(
                hostile if answered == 1 else b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext"
            )

    async with raw_upstream(script) as upstream:
        first = await timed(fetcher.fetch(method, upstream.url()))
        second = await timed(fetcher.fetch("GET", upstream.url()))
    # Either refusing the broken answer or taking it without a body is safe; what matters
    # is that its stray body is not the next request's answer.
    assert (first.kind, first.body) in (("ok", b""), ("refused", b""))
    assert (second.kind, second.status, second.body) == ("ok", 200, b"next")


async def test_a_stalled_body_frees_its_connection_slot() -> None:
    async def script(peer: Peer) -> None:
        if peer.number == 0:
            await answer_then_hold(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhel")(peer)
        await answer_each(peer, OK_5)

    for client in (GatewayFetcher(limit=1), SessionFetcher(limit=1)):
        try:
            async with raw_upstream(script) as upstream:
                stalled = await timed(client.fetch("GET", upstream.url()))
                after = await timed(client.fetch("GET", upstream.url()))
                await asyncio.wait_for(upstream.peers[0].ended.wait(), 1.0)
        finally:
            await client.close()
        assert stalled.kind == "cut"
        assert after.kind == "ok"
