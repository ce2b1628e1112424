"""Per-tenant limits through the state backend: a token bucket for rate and leased in-flight
slots, so that every process sharing the backend enforces one limit."""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass, replace
from functools import partial
from typing import Final

from proxy.config import Settings
from proxy.errors import TooManyRequests
from proxy.state.base import RateDecision
from proxy.state.fallback import ResilientState
from proxy.tenants import Limits, Tenant

PREFETCH_SECONDS: Final = 0.005  # a backend call fetches this many seconds' worth of tokens
SPARE_TTL: Final = 1.0  # tokens fetched but unspent this long are dropped (an idle process)
SLOT_TTL: Final = 20.0  # a dead process's slot is free at most this long after its last renewal
RENEW_EVERY: Final = 5.0


@dataclass(frozen=True, slots=True)
class TenantPolicy:
    """A tenant's effective limits: its own overrides, else the global settings."""

    rate: float | None
    burst: int
    max_inflight: int | None

    @classmethod
    def of(cls, tenant: Tenant, settings: Settings) -> TenantPolicy:
        rate = tenant.limits.rate_limit_rps or settings.rate_limit_rps
        burst = tenant.limits.rate_limit_burst or settings.rate_limit_burst
        inflight = tenant.limits.max_inflight or settings.max_inflight_per_tenant
        return cls(rate, burst or max(1, math.ceil(rate or 1)), inflight)


@dataclass(slots=True)
class Spare:
    """Tokens this process took from a bucket ahead of use (for one tenant's current key)."""

    key: str
    tokens: int
    expires_at: float
    last: RateDecision  # the backend's answer that brought them


def prefetch_count(rate: float, burst: int) -> int:
    """Tokens to ask for at once: 1 (exact) for a slow tenant, a few hundred for a fast one."""
    return max(1, min(burst, math.floor(rate * PREFETCH_SECONDS)))


@dataclass(slots=True)
class Slot:
    """A held in-flight slot: freed when its request ends, unless the request ``handed`` it to
    work that outlives it (an append run whose client left), which then calls ``free``."""

    free: Callable[[], Awaitable[None]]
    handed: bool = False


@dataclass(frozen=True, slots=True)
class Admission:
    """What the limiter decided for one admitted request (the rate-limit headers need it)."""

    policy: TenantPolicy
    rate: RateDecision | None
    slot: Slot | None = None


UNLIMITED: Final[AbstractAsyncContextManager[Admission | None]] = nullcontext(None)


def rate_key(tenant: Tenant, rate: float, burst: int) -> str:
    """The bucket of ``tenant`` under this policy: a changed limit starts with a full bucket."""
    return f"rate:{tenant.id}:{rate:g}:{burst}"


def slot_key(tenant: Tenant) -> str:
    return f"slots:{tenant.id}"


class Limiter:
    """Per-tenant buckets and in-flight leases in the state backend, keyed by the tenant id."""

    def __init__(
        self, settings: Settings, state: ResilientState, clock: Callable[[], float] = time.time
    ):
        self.settings, self.state, self.clock = settings, state, clock
        self._no_defaults = not settings.rate_limit_rps and not settings.max_inflight_per_tenant
        self._free_defaults = self._no_defaults and not settings.quota_defaults.items()
        self._held: dict[str, set[str]] = {}  # slot key → the holders of this process
        self._holder = f"{os.getpid()}-{secrets.token_hex(4)}-"
        self._serial = itertools.count()
        self._spare: dict[str, Spare] = {}  # tenant id → its prefetched tokens
        # tenant id → (the tenant's Limits object, its policy, its bucket key)
        self._policies: dict[str, tuple[Limits, TenantPolicy, str]] = {}

    def free(self, tenant: Tenant) -> bool:
        """True when no limit and no quota applies to ``tenant``: the common case, decided
        from a few attributes (it runs on every request)."""
        own, quotas = tenant.limits, tenant.quotas
        return (
            self._free_defaults
            and not own.rate_limit_rps
            and not own.max_inflight
            and quotas.numbers_per_day is None
            and quotas.numbers_per_month is None
            and quotas.requests_per_day is None
            and quotas.requests_per_month is None
        )

    def admit(self, tenant: Tenant) -> AbstractAsyncContextManager[Admission | None]:
        """Take a token and hold an in-flight slot for the block, or raise 429."""
        own = tenant.limits
        if self._no_defaults and not own.rate_limit_rps and not own.max_inflight:
            return UNLIMITED  # the common case: decided without a policy or a state call
        policy, key = self._policy(tenant)
        if policy.rate is None and policy.max_inflight is None:
            return UNLIMITED
        return Admitting(self, tenant, policy, key)

    def _policy(self, tenant: Tenant) -> tuple[TenantPolicy, str]:
        """The tenant's policy and bucket key, worked out once per ``Limits`` object (a reload
        or an admin write brings new ones, so a changed limit is seen at once; the cache holds
        no tenant, so nothing of a removed one's credentials stays here)."""
        own = tenant.limits
        cached = self._policies.get(tenant.id)
        if cached is not None and cached[0] is own:
            return cached[1], cached[2]
        policy = TenantPolicy.of(tenant, self.settings)
        key = "" if policy.rate is None else rate_key(tenant, policy.rate, policy.burst)
        self._policies[tenant.id] = (own, policy, key)
        return policy, key

    async def _take(self, tenant: Tenant, policy: TenantPolicy, key: str) -> RateDecision | None:
        """Spend one token of the tenant's bucket ``key`` or raise 429 ``RATE_LIMITED``.

        Tokens are taken from the shared bucket before they are spent, never after: a process
        holds at most ``prefetch_count - 1`` spare ones, which the others cannot have meanwhile
        (the under-admission bound), and drops them after ``SPARE_TTL``."""
        rate = policy.rate
        if rate is None:
            return None
        now = self.clock()
        spare = self._spare.get(tenant.id)
        if spare is not None and spare.key == key and spare.tokens and now < spare.expires_at:
            spare.tokens -= 1
            # Approximate: the bucket's count when they were fetched, plus what is left here.
            last = spare.last
            return RateDecision(1, last.remaining + spare.tokens, last.retry_after, last.reset)
        decision = await self._fetch(tenant, key, rate, policy.burst, now)
        if not decision.allowed:
            raise TooManyRequests(
                f"Rate limit of {rate:g} requests/s exceeded for {tenant.alias}",
                retry_after=math.ceil(decision.retry_after),
            )
        return decision

    async def _fetch(
        self, tenant: Tenant, key: str, rate: float, burst: int, now: float
    ) -> RateDecision:
        """Take up to ``prefetch_count`` tokens; one is spent now, the rest kept as spare."""
        count = prefetch_count(rate, burst)
        decision = await self.state.shared_or_local(
            lambda s: s.take_token(key, rate, burst, now, count)
        )
        if decision.granted > 1:
            spare = self._spare.get(tenant.id)
            live = spare is not None and spare.key == key and now < spare.expires_at
            kept = spare.tokens if spare is not None and live else 0
            left = kept + decision.granted - 1  # concurrent fetches add up, nothing is lost
            self._spare[tenant.id] = Spare(key, left, now + SPARE_TTL, decision)
        return replace(decision, granted=1) if decision.granted > 1 else decision

    async def _acquire(self, tenant: Tenant, cap: int | None) -> str | None:
        """One of the tenant's ``cap`` in-flight slots, or 429 ``TENANT_BUSY``."""
        if cap is None:
            return None
        key, holder, now = slot_key(tenant), f"{self._holder}{next(self._serial)}", self.clock()
        held = await self.state.shared_or_local(
            lambda s: s.acquire_slot(key, holder, cap, SLOT_TTL, now)
        )
        if not held:
            raise TooManyRequests(
                f"{tenant.alias} already has {cap} requests in flight", error="TENANT_BUSY"
            )
        self._held.setdefault(key, set()).add(holder)
        return holder

    async def _release(self, key: str, holder: str) -> None:
        holders = self._held.get(key, set())
        holders.discard(holder)
        if not holders:
            self._held.pop(key, None)
        # Also in memory, in case the slot was taken there while the backend was down.
        await self.state.local.release_slot(key, holder)
        await self.state.shared_or_local(lambda s: s.release_slot(key, holder))

    async def keep_slots(self) -> None:
        """Renew the leases of the slots this process holds, every few seconds, for good."""
        while True:
            await asyncio.sleep(RENEW_EVERY)
            await self.renew_slots()

    async def renew_slots(self) -> None:
        """Extend every slot this process holds by ``SLOT_TTL``."""
        for key, holders in list(self._held.items()):
            await self._renew(key, list(holders), self.clock())

    async def _renew(self, key: str, holders: list[str], now: float) -> None:
        await self.state.local.renew_slots(key, holders, SLOT_TTL, now)
        await self.state.shared_or_local(lambda s: s.renew_slots(key, holders, SLOT_TTL, now))


class Admitting:
    """The block of one admitted request: its slot held (before the bucket: a busy tenant
    wastes no token) and its token taken on entry, the slot freed on exit unless handed on.
    A class, not a generator-based context manager: it runs on every limited request."""

    __slots__ = ("limiter", "policy", "key", "slot", "tenant")

    def __init__(self, limiter: Limiter, tenant: Tenant, policy: TenantPolicy, key: str):
        self.limiter, self.tenant, self.policy, self.key = limiter, tenant, policy, key
        self.slot: Slot | None = None

    async def __aenter__(self) -> Admission:
        limiter, tenant = self.limiter, self.tenant
        holder = await limiter._acquire(tenant, self.policy.max_inflight)
        if holder is not None:
            self.slot = Slot(partial(limiter._release, slot_key(tenant), holder))
        try:
            rate = await limiter._take(tenant, self.policy, self.key)
        except BaseException:
            await self._free()
            raise
        return Admission(self.policy, rate, self.slot)

    async def __aexit__(self, *exc_info: object) -> None:
        await self._free()

    async def _free(self) -> None:
        slot = self.slot
        if slot is not None and not slot.handed:
            await slot.free()
