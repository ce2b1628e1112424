"""Per-tenant limits: a token bucket for rate and a counter for requests in flight."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Final

from proxy.config import Settings
from proxy.errors import TooManyRequests
from proxy.tenants import Tenant

UNLIMITED: Final[AbstractContextManager[None]] = nullcontext()


@dataclass(slots=True)
class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up."""

    rate: float
    burst: int
    tokens: float
    updated: float

    def take(self, now: float) -> float:
        """Take one token; 0.0 when granted, else seconds until one is available."""
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


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


class Limiter:
    """Per-tenant buckets and in-flight counts, keyed by the tenant's config source."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic):
        self.settings = settings
        self.clock = clock
        self._buckets: dict[str, tuple[TenantPolicy, TokenBucket]] = {}
        self._inflight: dict[str, int] = {}
        self._no_defaults = not settings.rate_limit_rps and not settings.max_inflight_per_tenant

    def admit(self, tenant: Tenant) -> AbstractContextManager[None]:
        """Take a token and hold an in-flight slot for the block, or raise 429."""
        own = tenant.limits
        if self._no_defaults and not own.rate_limit_rps and not own.max_inflight:
            return UNLIMITED  # the common case, decided without building a policy
        policy = TenantPolicy.of(tenant, self.settings)
        if policy.rate is None and policy.max_inflight is None:
            return UNLIMITED
        self._check_busy(tenant, policy.max_inflight)  # before the bucket: no token wasted
        self._check_rate(tenant, policy)
        return self._slot(tenant)

    def _check_rate(self, tenant: Tenant, policy: TenantPolicy) -> None:
        """Spend one token of the tenant's bucket or raise 429 ``RATE_LIMITED``."""
        if policy.rate is None:
            return
        bucket = self._bucket(tenant.source, policy)
        wait = bucket.take(self.clock())
        if wait > 0:
            raise TooManyRequests(
                f"Rate limit of {policy.rate:g} requests/s exceeded for {tenant.alias}",
                retry_after=math.ceil(wait),
            )

    def _bucket(self, key: str, policy: TenantPolicy) -> TokenBucket:
        known = self._buckets.get(key)
        if known is None or known[0] != policy:
            assert policy.rate is not None
            bucket = TokenBucket(policy.rate, policy.burst, float(policy.burst), self.clock())
            known = (policy, bucket)
            self._buckets[key] = known
        return known[1]

    def _check_busy(self, tenant: Tenant, cap: int | None) -> None:
        """Raise 429 ``TENANT_BUSY`` when the tenant has ``cap`` requests in flight."""
        if cap is not None and self._inflight.get(tenant.source, 0) >= cap:
            raise TooManyRequests(
                f"{tenant.alias} already has {cap} requests in flight", error="TENANT_BUSY"
            )

    @contextmanager
    def _slot(self, tenant: Tenant) -> Iterator[None]:
        """Hold one of the tenant's in-flight slots for the block."""
        key = tenant.source
        self._inflight[key] = self._inflight.get(key, 0) + 1
        try:
            yield
        finally:
            self._inflight[key] -= 1
