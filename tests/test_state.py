"""``open_state`` and what each backend does beyond the conformance suite: the start-up line,
reachability, errors as ``StateUnavailable``, durability, expiry, and no password shown."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from proxy.state import MemoryState, StateBackend, check_state, describe_state, open_state
from proxy.state import sqlite as sqlite_backend
from proxy.state.base import ClaimStatus, QuotaCharge, StateUnavailable
from proxy.state.redis import RedisState
from proxy.state.sqlite import SqliteState
from tests.hostile import Peer, raw_upstream
from tests.processes import free_port
from tests.redis_server import RedisServer, RedisServerError

NOW = time.time()


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("", MemoryState),
        ("memory://", MemoryState),
        ("sqlite:///state.db", SqliteState),
        ("redis://127.0.0.1:6379/0", RedisState),
        ("rediss://cache.example:6380/1", RedisState),
        ("unix:///run/redis.sock?db=2", RedisState),
    ],
)
async def test_open_state_picks_the_backend_by_scheme(url: str, kind: type) -> None:
    backend = open_state(url)
    assert isinstance(backend, kind)
    if not isinstance(backend, SqliteState):  # never opened: nothing to close for SQLite
        await backend.close()


def test_an_unknown_scheme_has_no_backend() -> None:
    with pytest.raises(ValueError, match="ftp"):
        open_state("ftp://host/x")


async def test_the_start_up_line_names_the_backend_and_whether_it_is_kept(
    tmp_path: Path,
) -> None:
    sqlite_url = f"sqlite:///{tmp_path}/s.db"
    redis_state = open_state("redis://app:pa55word@127.0.0.1:6379/0")
    assert describe_state(MemoryState()) == (
        "state memory://: shared by this process only, lost on restart"
    )
    assert describe_state(open_state(sqlite_url)) == (
        f"state {sqlite_url}: shared by processes on this host, kept across restarts"
    )
    line = describe_state(redis_state)
    assert line == (
        "state redis://app:***@127.0.0.1:6379/0: shared by every replica using this Redis, "
        "kept across restarts"
    )
    await redis_state.close()


async def test_check_says_whether_the_backend_answers(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    reachable = [
        MemoryState(),
        open_state(f"sqlite:///{tmp_path}/s.db"),
        open_state(redis_server.url),
    ]
    assert [await check_state(b) for b in reachable] == ["reachable"] * 3
    missing = open_state(f"sqlite:///{tmp_path}/no/such/folder/s.db")
    assert (await check_state(missing)).startswith("unreachable (sqlite ")
    for backend in [*reachable, missing]:
        await backend.close()


async def test_an_unreachable_redis_fails_fast_without_showing_the_password() -> None:
    backend = open_state(f"redis://app:pa55word@127.0.0.1:{free_port()}/0")
    started = time.monotonic()
    with pytest.raises(StateUnavailable) as caught:
        await backend.take_token("t", 1.0, 1, NOW)
    assert time.monotonic() - started < 5
    assert "pa55word" not in str(caught.value) and "app:***@" in str(caught.value)
    assert "pa55word" not in (await check_state(backend))
    await backend.close()


async def test_redis_comes_back_after_a_restart(own_redis: RedisServer) -> None:
    backend = open_state(own_redis.url)

    async def take_ten() -> list[bool]:  # ten at once: ten pooled connections
        calls = (backend.take_token("t", 1.0, 20, NOW) for _ in range(10))
        return [d.allowed for d in await asyncio.gather(*calls)]

    assert await take_ten() == [True] * 10
    own_redis.stop()
    with pytest.raises(StateUnavailable):
        await backend.take_token("t", 1.0, 20, NOW)
    own_redis.start()  # an empty server: the scripts are loaded again on first use
    assert await take_ten() == [True] * 10  # the dead pooled connections were replaced
    assert (await backend.take_token("t", 1.0, 20, NOW)).remaining == 9
    await backend.close()


async def test_redis_keys_are_namespaced_and_none_is_kept_for_ever(
    redis_server: RedisServer,
) -> None:
    redis_server.flush()
    backend = open_state(redis_server.url)
    await backend.take_token("t", 1.0, 2, NOW)
    await backend.acquire_slot("k", "h", 2, 30, NOW)
    await backend.claim("idem", "fp", "A", 15, 3600, NOW)
    await backend.record_intent("idem", "A", 0, b"intent", NOW)
    await backend.reserve([QuotaCharge("q", 10, 1, time.time() + 600)])
    await backend.add_usage({("t", "2026-12-01"): {"requests": 1}}, 86_400, source="p", seq=1)
    await backend.append_audit(b"entry", 10)
    with redis.Redis(host="127.0.0.1", port=redis_server.port) as client:
        keys = sorted(key.decode() for key in client.keys("*"))
        ttls = {key: client.ttl(key) for key in keys}
    assert all(key.startswith("nxp:") for key in keys) and len(keys) == 8
    assert all(ttl > 0 for key, ttl in ttls.items() if key != "nxp:audit")  # audit: bounded
    assert 590 <= ttls["nxp:quota:q"] <= 601
    await backend.close()


async def test_sqlite_keeps_its_state_across_a_reopen(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    first = open_state(url)
    await first.reserve([QuotaCharge("q", 10, 4, NOW + 600)])
    await first.close()
    second = open_state(url)
    assert await second.quota_used(["q"]) == [4]
    await second.close()
    with sqlite3.connect(tmp_path / "s.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


async def test_sqlite_errors_become_state_unavailable(tmp_path: Path) -> None:
    (tmp_path / "not-a-db").write_bytes(b"this is not a SQLite file" * 100)
    backend = open_state(f"sqlite:///{tmp_path}/not-a-db")
    with pytest.raises(StateUnavailable, match="not-a-db"):
        await backend.take_token("t", 1.0, 1, NOW)
    await backend.close()
    with pytest.raises(StateUnavailable, match="closed"):
        await backend.ping()


async def test_sqlite_sweeps_expired_rows_now_and_then(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_backend, "SWEEP_EVERY", 3)
    backend = open_state(f"sqlite:///{tmp_path}/s.db")
    await backend.claim("old", "fp", "A", 15, 60, NOW)
    await backend.record_intent("old", "A", 0, b"intent", NOW)
    await backend.acquire_slot("k", "gone", 1, 10, NOW)
    # Usage kept a millisecond, with its source's batch number (a process that is gone).
    await backend.add_usage({("t", "2026-12-01"): {"requests": 1}}, 0.001, source="p", seq=1)
    await asyncio.sleep(0.01)
    await backend.claim("live", "fp", "A", 15, 3600, NOW + 100)  # the third: sweeps at NOW+100
    with sqlite3.connect(tmp_path / "s.db") as db:
        tables = ["runs", "journal", "slots", "buckets", "usage", "usage_sources"]
        counts = [db.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in tables]
    assert counts == [1, 0, 0, 0, 0, 0]
    await backend.close()


def test_a_missing_redis_server_is_a_clear_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RedisServerError, match="not installed"):
        RedisServer(tmp_path).start()


def test_a_redis_server_that_cannot_start_is_a_clear_failure(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    taken = RedisServer(tmp_path, port=redis_server.port)  # the port is in use
    with pytest.raises(RedisServerError, match="exited with"):
        taken.start()


async def test_redis_with_a_password_and_a_unix_socket(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    server = RedisServer(tmp_path_factory.mktemp("rds"), password="s3cret-pw", unix_socket=True)
    server.start()
    try:
        for url in (server.url, server.unix_url):
            backend = open_state(url)
            assert (await backend.take_token(url, 1.0, 2, NOW)).remaining == 1
            assert "s3cret-pw" not in backend.url
            await backend.close()
        wrong = open_state(server.url.replace("s3cret-pw", "wrong-pw"))
        with pytest.raises(StateUnavailable) as caught:
            await wrong.ping()
        assert "wrong-pw" not in str(caught.value) and "s3cret-pw" not in str(caught.value)
        await wrong.close()
    finally:
        server.stop()


async def test_a_redis_claim_sent_twice_by_its_owner_stays_its_own(
    redis_server: RedisServer,
) -> None:
    """A reply lost on the way back makes the backend send the claim again: the owner must find
    its own claim (with its journal), not a run of someone else's to wait for."""
    redis_server.flush()
    backend = open_state(redis_server.url)
    try:
        first = await backend.claim("k-own", "fp", "owner-1", 15, 600, 1000.0)
        assert first.status is ClaimStatus.NEW
        assert await backend.record_intent("k-own", "owner-1", 0, b"intent", 1000.5)
        again = await backend.claim("k-own", "fp", "owner-1", 15, 600, 1001.0)
        assert again.status is ClaimStatus.TAKEN_OVER
        assert again.journal[0].intent == b"intent"
        other = await backend.claim("k-own", "fp", "owner-2", 15, 600, 1002.0)
        assert other.status is ClaimStatus.RUNNING
    finally:
        await backend.close()


async def test_a_failed_sqlite_commit_is_rolled_back_and_the_backend_works_again(
    tmp_path: Path,
) -> None:
    """SQLite keeps a transaction open when its COMMIT fails (as on SQLITE_BUSY); here the
    COMMIT is refused by an authorizer on the backend's own connection, then allowed again."""
    path = tmp_path / "state.db"
    backend = SqliteState(f"sqlite:///{path}")
    await backend.ping()  # opens the file
    connection = backend._db
    assert connection is not None

    def refuse_commit(action: int, arg: str | None, *_rest: str | None) -> int:
        commit = action == sqlite3.SQLITE_TRANSACTION and arg == "COMMIT"
        return sqlite3.SQLITE_DENY if commit else sqlite3.SQLITE_OK

    connection.set_authorizer(refuse_commit)
    with pytest.raises(StateUnavailable, match="not authorized"):
        await backend.take_token("t", 1.0, 5, NOW)
    connection.set_authorizer(None)
    with contextlib.closing(sqlite3.connect(path, timeout=0.1)) as other:
        other.execute("BEGIN IMMEDIATE")  # no write lock was left behind
        other.rollback()
    assert (await backend.take_token("t", 1.0, 5, NOW)).remaining == 4  # the first rolled back
    await backend.close()


@dataclass
class ReplyCutter:
    """A relay to Redis: armed with a command name, it passes the next command that has it on
    to Redis (where it runs) and cuts the client's connection instead of relaying the reply."""

    redis_port: int
    armed: bytes | None = None

    async def relay(self, peer: Peer) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.redis_port)
        cut = asyncio.Event()

        async def commands() -> None:
            while data := await peer.reader.read(65536):
                if self.armed is not None and self.armed in data:
                    self.armed = None
                    cut.set()
                writer.write(data)
                await writer.drain()

        async def replies() -> None:
            while (data := await reader.read(65536)) and not cut.is_set():
                await peer.send(data)

        pumps = [asyncio.create_task(commands()), asyncio.create_task(replies())]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            writer.transport.abort()


@contextlib.asynccontextmanager
async def cut_replies(server: RedisServer) -> AsyncIterator[tuple[ReplyCutter, StateBackend]]:
    """A backend that reaches ``server`` through a ``ReplyCutter``."""
    server.flush()
    cutter = ReplyCutter(server.port)
    async with raw_upstream(cutter.relay) as relay:
        backend = open_state(f"redis://127.0.0.1:{relay.port}/0")
        try:
            yield cutter, backend
        finally:
            await backend.close()


async def test_a_redis_reservation_whose_reply_was_lost_fails_and_is_not_sent_again(
    redis_server: RedisServer,
) -> None:
    async with cut_replies(redis_server) as (cutter, backend):
        await backend.reserve([QuotaCharge("warm", 10, 1, time.time() + 600)])  # loads it
        cutter.armed = b"EVALSHA"
        with pytest.raises(StateUnavailable):
            await backend.reserve([QuotaCharge("q", 10, 3, time.time() + 600)])
        assert await backend.quota_used(["q"]) == [3]  # it ran once on Redis


async def test_a_redis_usage_batch_whose_reply_was_lost_is_sent_again_and_added_once(
    redis_server: RedisServer,
) -> None:
    async with cut_replies(redis_server) as (cutter, backend):
        day = {("t", "2026-12-01"): {"requests": 2}}
        await backend.add_usage(day, 86_400, source="p1", seq=1)  # loads the script
        cutter.armed = b"EVALSHA"
        await backend.add_usage(day, 86_400, source="p1", seq=2)
        assert cutter.armed is None  # the first send's reply was cut
        assert await backend.read_usage("t", ["2026-12-01"]) == {"2026-12-01": {"requests": 4}}


async def test_a_redis_read_whose_reply_was_lost_is_sent_again(redis_server: RedisServer) -> None:
    async with cut_replies(redis_server) as (cutter, backend):
        await backend.reserve([QuotaCharge("q", 10, 4, time.time() + 600)])
        cutter.armed = b"MGET"
        assert await backend.quota_used(["q"]) == [4]
        assert cutter.armed is None  # the first MGET's reply was cut
