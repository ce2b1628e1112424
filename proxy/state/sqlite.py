"""``sqlite:///path``: state in one SQLite file that every process on this host can share.

The standard ``sqlite3`` module runs in one worker thread per backend, off the event loop. Each
operation is one transaction; decisions take ``BEGIN IMMEDIATE`` (the write lock first), so that
processes sharing the file (workers, a restarted gateway, the CLI) decide one after another.
WAL mode lets readers go on while one process writes; ``busy_timeout`` makes the others wait.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Final, TypeVar

from proxy.state.base import (
    Claim,
    ClaimStatus,
    JournalEntry,
    QuotaCharge,
    QuotaResult,
    RateDecision,
    StateUnavailable,
    UsageCounts,
)
from proxy.state.memory import token_decision, tokens_granted
from proxy.urls import sqlite_path

T = TypeVar("T")
BUSY_TIMEOUT_MS: Final = 5000
OPEN_ATTEMPTS: Final = 50
OPEN_RETRY_SECONDS: Final = 0.1
SWEEP_EVERY: Final = 1000  # decisions between two sweeps of expired rows
DECIDE: Final = "BEGIN IMMEDIATE"  # read-modify-write: take the write lock first
READ: Final = "BEGIN"  # a consistent snapshot, no lock held

SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS buckets (
    key TEXT PRIMARY KEY, tokens REAL NOT NULL, updated REAL NOT NULL, full_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS slots (
    key TEXT NOT NULL, holder TEXT NOT NULL, until REAL NOT NULL, PRIMARY KEY (key, holder));
CREATE TABLE IF NOT EXISTS runs (
    key TEXT PRIMARY KEY, fingerprint TEXT NOT NULL, owner TEXT NOT NULL,
    lease_until REAL NOT NULL, expires REAL NOT NULL, answer BLOB);
CREATE TABLE IF NOT EXISTS journal (
    key TEXT NOT NULL, batch INTEGER NOT NULL, intent BLOB NOT NULL, outcome BLOB,
    PRIMARY KEY (key, batch));
CREATE TABLE IF NOT EXISTS quotas (key TEXT PRIMARY KEY, used INTEGER NOT NULL,
    expires REAL NOT NULL);
CREATE TABLE IF NOT EXISTS usage (
    tenant TEXT NOT NULL, day TEXT NOT NULL, name TEXT NOT NULL, n INTEGER NOT NULL,
    expires REAL NOT NULL, PRIMARY KEY (tenant, day, name));
CREATE TABLE IF NOT EXISTS usage_sources (
    source TEXT PRIMARY KEY, seq INTEGER NOT NULL, expires REAL NOT NULL);
CREATE TABLE IF NOT EXISTS audit (id INTEGER PRIMARY KEY AUTOINCREMENT, entry BLOB NOT NULL);
"""

Db = sqlite3.Connection


class SqliteState:
    """State in a SQLite file, shared by the processes of this host and kept across restarts.

    Open one per process, after any fork: its worker thread does not survive one."""

    shared = "processes on this host"
    durable = True

    def __init__(self, url: str) -> None:
        self.url = url
        self._path = sqlite_path(url)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="state-sqlite")
        self._db: Db | None = None
        self._decisions = 0
        self._closed = False

    async def ping(self) -> None:
        await self._run(lambda db: db.execute("SELECT 1").fetchone(), begin=READ)

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await asyncio.get_running_loop().run_in_executor(self._executor, self._close_db)
            self._executor.shutdown(wait=True)

    # rate limits

    async def take_token(
        self, key: str, rate: float, burst: int, now: float, count: int = 1
    ) -> RateDecision:
        def take(db: Db) -> RateDecision:
            self._sweep_now_and_then(db, now)
            row = db.execute("SELECT tokens, updated FROM buckets WHERE key = ?", (key,)).fetchone()
            tokens, updated = (float(burst), now) if row is None else row
            tokens = min(burst, tokens + max(0.0, now - updated) * rate)
            granted = tokens_granted(tokens, count)
            tokens -= granted
            # Never back in time: a caller whose clock lags must not refill a second time.
            updated = max(now, updated)
            full_at = updated + (burst - tokens) / rate
            sql = "INSERT OR REPLACE INTO buckets VALUES (?, ?, ?, ?)"
            db.execute(sql, (key, tokens, updated, full_at))
            return token_decision(granted, tokens, rate, burst)

        return await self._run(take)

    # in-flight leases

    async def acquire_slot(self, key: str, holder: str, cap: int, ttl: float, now: float) -> bool:
        def acquire(db: Db) -> bool:
            self._sweep_now_and_then(db, now)
            db.execute("DELETE FROM slots WHERE key = ? AND until <= ?", (key, now))
            (held,) = db.execute("SELECT count(*) FROM slots WHERE key = ?", (key,)).fetchone()
            if held >= cap:
                return False
            db.execute("INSERT OR REPLACE INTO slots VALUES (?, ?, ?)", (key, holder, now + ttl))
            return True

        return await self._run(acquire)

    async def release_slot(self, key: str, holder: str) -> None:
        sql = "DELETE FROM slots WHERE key = ? AND holder = ?"
        await self._run(lambda db: db.execute(sql, (key, holder)))

    async def renew_slots(self, key: str, holders: Sequence[str], ttl: float, now: float) -> None:
        sql = "UPDATE slots SET until = ? WHERE key = ? AND holder = ? AND until > ?"
        rows = [(now + ttl, key, holder, now) for holder in holders]
        await self._run(lambda db: db.executemany(sql, rows))

    # idempotency journal

    async def claim(
        self, key: str, fingerprint: str, owner: str, lease: float, ttl: float, now: float
    ) -> Claim:
        def claim(db: Db) -> Claim:
            self._sweep_now_and_then(db, now)
            sql = "SELECT fingerprint, lease_until, expires, answer FROM runs WHERE key = ?"
            row = db.execute(sql, (key,)).fetchone()
            if row is not None and row[2] <= now:
                _drop_run(db, key)
                row = None
            if row is None:
                values = (key, fingerprint, owner, now + lease, now + ttl, None)
                db.execute("INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?)", values)
                return Claim(ClaimStatus.NEW)
            return _claim_existing(db, key, row, (fingerprint, owner, now + lease, now))

        return await self._run(claim)

    async def renew(self, key: str, owner: str, lease: float, now: float) -> bool:
        sql = f"UPDATE runs SET lease_until = ? WHERE {_LIVE}"
        values = (now + lease, key, owner, now)
        return await self._run(lambda db: db.execute(sql, values).rowcount > 0)

    async def record_intent(
        self, key: str, owner: str, batch: int, intent: bytes, now: float
    ) -> bool:
        def record(db: Db) -> bool:
            if db.execute(f"SELECT 1 FROM runs WHERE {_LIVE}", (key, owner, now)).fetchone():
                sql = "INSERT OR REPLACE INTO journal VALUES (?, ?, ?, NULL)"
                db.execute(sql, (key, batch, intent))
                return True
            return False

        return await self._run(record)

    async def record_outcome(self, key: str, batch: int, outcome: bytes) -> None:
        sql = "UPDATE journal SET outcome = ? WHERE key = ? AND batch = ?"
        await self._run(lambda db: db.execute(sql, (outcome, key, batch)))

    async def complete(self, key: str, owner: str, answer: bytes, ttl: float, now: float) -> bool:
        def complete(db: Db) -> bool:
            sql = (
                "UPDATE runs SET answer = ?, lease_until = ?, expires = ? "
                "WHERE key = ? AND owner = ? AND answer IS NULL"
            )
            if not db.execute(sql, (answer, now, now + ttl, key, owner)).rowcount:
                return False
            db.execute("DELETE FROM journal WHERE key = ?", (key,))
            return True

        return await self._run(complete)

    async def abandon(self, key: str, owner: str) -> None:
        sql = "UPDATE runs SET lease_until = 0 WHERE key = ? AND owner = ? AND answer IS NULL"
        await self._run(lambda db: db.execute(sql, (key, owner)))

    # quotas

    async def reserve(self, charges: Sequence[QuotaCharge]) -> QuotaResult:
        def reserve(db: Db) -> QuotaResult:
            used = _quota_used(db, [c.key for c in charges])
            for index, (charge, value) in enumerate(zip(charges, used, strict=True)):
                if value + charge.amount > charge.limit:
                    return QuotaResult(False, tuple(used), index)
            sql = (
                "INSERT INTO quotas VALUES (?, ?, ?) ON CONFLICT (key) DO UPDATE SET "
                "used = used + excluded.used, expires = max(expires, excluded.expires)"
            )
            db.executemany(sql, [(c.key, c.amount, c.expires_at) for c in charges])
            return QuotaResult(True, tuple(_quota_used(db, [c.key for c in charges])))

        return await self._run(reserve)

    async def give_back(self, charges: Sequence[QuotaCharge]) -> None:
        sql = "UPDATE quotas SET used = max(0, used - ?) WHERE key = ?"
        rows = [(c.amount, c.key) for c in charges]
        await self._run(lambda db: db.executemany(sql, rows))

    async def quota_used(self, keys: Sequence[str]) -> list[int]:
        return await self._run(lambda db: _quota_used(db, keys), begin=READ)

    # usage and audit

    async def add_usage(self, counts: UsageCounts, ttl: float, *, source: str, seq: int) -> None:
        now = time.time()
        rows = [
            (tenant, day, name, amount, now + ttl)
            for (tenant, day), increments in counts.items()
            for name, amount in increments.items()
        ]
        sql = (
            "INSERT INTO usage VALUES (?, ?, ?, ?, ?) ON CONFLICT (tenant, day, name) "
            "DO UPDATE SET n = n + excluded.n, expires = excluded.expires"
        )

        mark = (
            "INSERT INTO usage_sources VALUES (?, ?, ?) ON CONFLICT (source) "
            "DO UPDATE SET seq = excluded.seq, expires = excluded.expires "
            "WHERE usage_sources.seq < excluded.seq OR usage_sources.expires <= ?"
        )

        def add(db: Db) -> None:
            if db.execute(mark, (source, seq, now + ttl, now)).rowcount == 1:  # 0: added already
                db.executemany(sql, rows)

        await self._run(add)

    async def read_usage(self, tenant: str, days: Sequence[str]) -> dict[str, dict[str, int]]:
        def read(db: Db) -> dict[str, dict[str, int]]:
            found: dict[str, dict[str, int]] = {day: {} for day in days}
            sql = "SELECT day, name, n FROM usage WHERE tenant = ? AND day = ?"
            for day in days:
                for _day, name, n in db.execute(sql, (tenant, day)):
                    found[day][name] = n
            return found

        return await self._run(read, begin=READ)

    async def append_audit(self, entry: bytes, keep: int) -> None:
        def append(db: Db) -> None:
            db.execute("INSERT INTO audit (entry) VALUES (?)", (entry,))
            sql = "DELETE FROM audit WHERE id <= (SELECT max(id) FROM audit) - ?"
            db.execute(sql, (keep,))

        await self._run(append)

    async def read_audit(self, limit: int) -> list[bytes]:
        sql = "SELECT entry FROM audit ORDER BY id DESC LIMIT ?"
        rows = await self._run(lambda db: db.execute(sql, (limit,)).fetchall(), begin=READ)
        return [bytes(entry) for (entry,) in rows]

    # the worker thread

    async def _run(self, step: Callable[[Db], T], *, begin: str = DECIDE) -> T:
        """Run ``step`` in the worker thread, in one transaction opened by ``begin``."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, self._call, step, begin)
        except (sqlite3.Error, OSError) as exc:
            raise StateUnavailable(f"sqlite {self._path}: {exc}") from exc
        except RuntimeError as exc:  # the executor was shut down by close()
            raise StateUnavailable(f"sqlite {self._path}: closed") from exc

    def _call(self, step: Callable[[Db], T], begin: str) -> T:
        db = self._open()
        db.execute(begin)
        try:
            result = step(db)
            db.execute("COMMIT")
        except BaseException:
            # A COMMIT that fails (SQLITE_BUSY among others) leaves the transaction open: every
            # later BEGIN would fail, and a BEGIN IMMEDIATE's write lock would stay held.
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return result

    def _open(self) -> Db:
        if self._db is None:
            # Switching a new file to WAL takes an exclusive lock without waiting on the busy
            # timeout: several processes opening it at once get "database is locked". Tried
            # again for a while (this runs in the backend's thread, not on the event loop).
            for attempt in range(OPEN_ATTEMPTS):
                try:
                    self._db = self._connect()
                    break
                except sqlite3.OperationalError as exc:
                    if "locked" not in str(exc) or attempt == OPEN_ATTEMPTS - 1:
                        raise
                    time.sleep(OPEN_RETRY_SECONDS)
        assert self._db is not None
        return self._db

    def _connect(self) -> Db:
        db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        try:
            db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")
            db.executescript(SCHEMA)
        except BaseException:
            db.close()
            raise
        return db

    def _close_db(self) -> None:
        if self._db is not None:
            self._db.close()  # sqlite3's close does not fail on an open, idle connection
            self._db = None

    def _sweep_now_and_then(self, db: Db, now: float) -> None:
        """Drop rows that no longer mean anything, once every ``SWEEP_EVERY`` decisions."""
        self._decisions += 1
        if self._decisions % SWEEP_EVERY:
            return
        wall = time.time()
        db.execute("DELETE FROM buckets WHERE full_at <= ?", (now,))
        db.execute("DELETE FROM slots WHERE until <= ?", (now,))
        expired = "SELECT key FROM runs WHERE expires <= ?"
        db.execute(f"DELETE FROM journal WHERE key IN ({expired})", (now,))
        db.execute("DELETE FROM runs WHERE expires <= ?", (now,))
        db.execute("DELETE FROM quotas WHERE expires <= ?", (wall,))
        db.execute("DELETE FROM usage WHERE expires <= ?", (wall,))
        db.execute("DELETE FROM usage_sources WHERE expires <= ?", (wall,))


_LIVE: Final = "key = ? AND owner = ? AND answer IS NULL AND lease_until > ?"

ClaimRow = tuple[str, float, float, bytes | None]


def _claim_existing(db: Db, key: str, row: ClaimRow, asked: tuple[str, str, float, float]) -> Claim:
    """The claim of a live run: mismatch, done, running, or taken over by the asker."""
    fingerprint, owner, lease_until, now = asked
    if row[0] != fingerprint:
        return Claim(ClaimStatus.MISMATCH)
    if row[3] is not None:
        return Claim(ClaimStatus.DONE, answer=bytes(row[3]))
    if row[1] > now:
        return Claim(ClaimStatus.RUNNING)
    db.execute(
        "UPDATE runs SET owner = ?, lease_until = ? WHERE key = ?", (owner, lease_until, key)
    )
    rows = db.execute("SELECT batch, intent, outcome FROM journal WHERE key = ?", (key,))
    journal = {
        batch: JournalEntry(bytes(intent), None if outcome is None else bytes(outcome))
        for batch, intent, outcome in rows
    }
    return Claim(ClaimStatus.TAKEN_OVER, journal=journal)


def _drop_run(db: Db, key: str) -> None:
    db.execute("DELETE FROM journal WHERE key = ?", (key,))
    db.execute("DELETE FROM runs WHERE key = ?", (key,))


def _quota_used(db: Db, keys: Sequence[str]) -> list[int]:
    sql = "SELECT used FROM quotas WHERE key = ?"
    return [(db.execute(sql, (key,)).fetchone() or (0,))[0] for key in keys]
