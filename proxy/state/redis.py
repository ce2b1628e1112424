"""``redis://``, ``rediss://``, ``unix://``: state on a Redis server that replicas share.

redis-py's asyncio client does the talking. Every decision is one Lua script (``proxy.state.lua``)
run with EVALSHA, so that it is atomic on the server; counters that only add go in one
MULTI/EXEC transaction. Keys start with ``nxp:``. Timeouts are short: a Redis that does not
answer makes the call fail fast with ``StateUnavailable`` instead of holding the request.

A call whose connection broke may have run on the server with its answer lost on the way back.
Only reads and calls that do the same when run twice are sent again (``_call_again``); any
other fails as ``StateUnavailable``, so that no token, reservation or count is taken twice."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as BrokenConnection
from redis.exceptions import RedisError

from proxy.state import lua
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
from proxy.state.memory import token_decision
from proxy.urls import mask_url

T = TypeVar("T")
PREFIX: Final = "nxp:"
TIMEOUT: Final = 2.0  # seconds to connect, and to wait for one answer
AUDIT_KEY: Final = PREFIX + "audit"


class RedisState:
    """State on a Redis server, shared by every replica that names it."""

    shared = "every replica using this Redis"
    durable = True  # as far as the server keeps its data (RDB/AOF)

    def __init__(self, url: str) -> None:
        self.url = mask_url(url)
        self._client: aioredis.Redis = aioredis.from_url(
            url,
            socket_connect_timeout=TIMEOUT,
            socket_timeout=TIMEOUT,
            # No resending by redis-py: its Retry sends a command whole again after a broken
            # connection, also one that ran and lost its answer (see _call_again).
            retry=Retry(NoBackoff(), 0),
            # RESP2, so that the pool replaces a connection the server closed (a restart)
            # before sending on it: under RESP3, redis-py 8.1's asyncio pool skips that check
            # (redis/redis-py#4252) and the command sent on the dead connection fails.
            protocol=2,
        )
        register = self._client.register_script
        self._take_token = register(lua.TAKE_TOKEN)
        self._acquire_slot = register(lua.ACQUIRE_SLOT)
        self._renew_slots = register(lua.RENEW_SLOTS)
        self._claim = register(lua.CLAIM)
        self._renew = register(lua.RENEW)
        self._record_intent = register(lua.RECORD_INTENT)
        self._record_outcome = register(lua.RECORD_OUTCOME)
        self._complete = register(lua.COMPLETE)
        self._abandon = register(lua.ABANDON)
        self._reserve = register(lua.RESERVE)
        self._give_back = register(lua.GIVE_BACK)
        self._add_usage = register(lua.ADD_USAGE)

    async def ping(self) -> None:
        await self._call_again(self._client.ping)

    async def close(self) -> None:
        await self._call(self._client.aclose())

    # rate limits

    async def take_token(
        self, key: str, rate: float, burst: int, now: float, count: int = 1
    ) -> RateDecision:
        args = (rate, burst, now, count)
        granted, tokens = await self._call(self._take_token([_key("bucket", key)], args))
        return token_decision(int(granted), float(tokens), rate, burst)

    # in-flight leases

    async def acquire_slot(self, key: str, holder: str, cap: int, ttl: float, now: float) -> bool:
        keys = [_key("slots", key)]
        return bool(await self._call(self._acquire_slot(keys, (holder, cap, ttl, now))))

    async def release_slot(self, key: str, holder: str) -> None:
        await self._call_again(lambda: self._client.zrem(_key("slots", key), holder))

    async def renew_slots(self, key: str, holders: Sequence[str], ttl: float, now: float) -> None:
        if holders:
            keys = [_key("slots", key)]
            await self._call_again(lambda: self._renew_slots(keys, (ttl, now, *holders)))

    # idempotency journal

    async def claim(
        self, key: str, fingerprint: str, owner: str, lease: float, ttl: float, now: float
    ) -> Claim:
        args = (fingerprint, owner, lease, ttl, now)
        reply = await self._call_again(lambda: self._claim(_run_keys(key), args))  # see lua.CLAIM
        status = ClaimStatus(reply[0].decode())
        if status is ClaimStatus.DONE:
            return Claim(status, answer=reply[1])
        if status is ClaimStatus.TAKEN_OVER:
            return Claim(status, journal=_journal(reply[1]))
        return Claim(status)

    async def renew(self, key: str, owner: str, lease: float, now: float) -> bool:
        keys = [_key("run", key)]
        return bool(await self._call_again(lambda: self._renew(keys, (owner, lease, now))))

    async def record_intent(
        self, key: str, owner: str, batch: int, intent: bytes, now: float
    ) -> bool:
        args = (owner, now, batch, intent)
        return bool(await self._call_again(lambda: self._record_intent(_run_keys(key), args)))

    async def record_outcome(self, key: str, batch: int, outcome: bytes) -> None:
        keys = [_key("journal", key)]
        await self._call_again(lambda: self._record_outcome(keys, (batch, outcome)))

    async def complete(self, key: str, owner: str, answer: bytes, ttl: float, now: float) -> bool:
        args = (owner, answer, ttl, now)
        return bool(await self._call(self._complete(_run_keys(key), args)))

    async def abandon(self, key: str, owner: str) -> None:
        await self._call_again(lambda: self._abandon([_key("run", key)], (owner,)))

    # quotas

    async def reserve(self, charges: Sequence[QuotaCharge]) -> QuotaResult:
        keys = [_key("quota", c.key) for c in charges]
        args = [value for c in charges for value in (c.limit, c.amount, c.expires_at)]
        granted, refused, used = await self._call(self._reserve(keys, args))
        index = None if granted else int(refused)
        return QuotaResult(bool(granted), tuple(int(n) for n in used), index)

    async def give_back(self, charges: Sequence[QuotaCharge]) -> None:
        keys = [_key("quota", c.key) for c in charges]
        await self._call(self._give_back(keys, [c.amount for c in charges]))

    async def quota_used(self, keys: Sequence[str]) -> list[int]:
        if not keys:
            return []
        names = [_key("quota", k) for k in keys]
        values = await self._call_again(lambda: self._client.mget(names))
        return [0 if value is None else int(value) for value in values]

    # usage and audit

    async def add_usage(self, counts: UsageCounts, ttl: float, *, source: str, seq: int) -> None:
        keys = [_key("usage-source", source)]
        args: list[str | int] = [max(1, round(ttl)), seq]
        for (tenant, day), increments in counts.items():
            keys.append(_usage_key(tenant, day))
            args.append(len(increments))
            for field, amount in increments.items():
                args.extend((field, amount))
        # Sent again after a lost reply: the script adds a source's batch number only once.
        await self._call_again(lambda: self._add_usage(keys, args))

    async def read_usage(self, tenant: str, days: Sequence[str]) -> dict[str, dict[str, int]]:
        def read() -> Awaitable[list[Any]]:
            pipe = self._client.pipeline(transaction=False)
            for day in days:
                pipe.hgetall(_usage_key(tenant, day))
            return pipe.execute()

        found = await self._call_again(read)
        return {
            day: {name.decode(): int(n) for name, n in counters.items()}
            for day, counters in zip(days, found, strict=True)
        }

    async def append_audit(self, entry: bytes, keep: int) -> None:
        pipe = self._client.pipeline(transaction=True)
        pipe.lpush(AUDIT_KEY, entry)
        if keep > 0:
            pipe.ltrim(AUDIT_KEY, 0, keep - 1)
        else:
            pipe.delete(AUDIT_KEY)
        await self._call(pipe.execute())

    async def read_audit(self, limit: int) -> list[bytes]:
        if limit <= 0:
            return []
        entries = await self._call_again(lambda: self._client.lrange(AUDIT_KEY, 0, limit - 1))
        return [entry for entry in entries if isinstance(entry, bytes)]

    async def _call(self, pending: Awaitable[T]) -> T:
        """Await a Redis call, its failures translated once into ``StateUnavailable``."""
        try:
            return await pending
        except (RedisError, OSError) as exc:
            raise StateUnavailable(f"redis {self.url}: {type(exc).__name__}: {exc}") from exc

    async def _call_again(self, send: Callable[[], Awaitable[T]]) -> T:
        """A read, or a call that does the same when run twice: sent once more if the
        connection broke (not after a timeout: the server may just be slow)."""
        try:
            return await self._call(send())
        except StateUnavailable as exc:
            if not isinstance(exc.__cause__, BrokenConnection):
                raise
        return await self._call(send())


def _key(kind: str, key: str) -> str:
    return f"{PREFIX}{kind}:{key}"


def _run_keys(key: str) -> list[str]:
    return [_key("run", key), _key("journal", key)]


def _usage_key(tenant: str, day: str) -> str:
    return f"{PREFIX}usage:{tenant}:{day}"


def _journal(flat: list[Any]) -> dict[int, JournalEntry]:
    """The journal hash (``i:<batch>`` intent, ``o:<batch>`` outcome) as entries."""
    fields = {name.decode(): value for name, value in zip(flat[::2], flat[1::2], strict=True)}
    return {
        int(name[2:]): JournalEntry(value, fields.get(f"o:{name[2:]}"))
        for name, value in fields.items()
        if name.startswith("i:")
    }
