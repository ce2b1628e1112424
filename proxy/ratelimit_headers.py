"""``RateLimit-Policy`` and ``RateLimit`` (draft-ietf-httpapi-ratelimit-headers, the structured
field form of draft 10): one item per limit in force on the tenant."""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from proxy.limits import Admission
from proxy.quotas import QuotaBook, QuotaStatus
from proxy.tenants import Tenant

POLICY_HEADER: Final = "RateLimit-Policy"
STATE_HEADER: Final = "RateLimit"
RATE_ITEM: Final = "rate"


@dataclass(slots=True)
class LimitItem:
    """One limit: ``quota`` units per ``window`` seconds; ``remaining`` and ``reset`` (seconds)
    once this request has learnt them."""

    quota: int
    window: int
    remaining: int | None = None
    reset: int | None = None


@dataclass(slots=True)
class LimitState:
    """The limits in force on one request's tenant, filled in as they are decided."""

    items: dict[str, LimitItem] = field(default_factory=dict)

    def policy(self, name: str, quota: int, window: int) -> None:
        """A limit in force, its state not known yet."""
        self.items[name] = LimitItem(quota, max(1, window))

    def learn(self, name: str, remaining: int, reset: float) -> None:
        """What is left of ``name`` and in how many seconds it is restored."""
        item = self.items.get(name)
        if item is not None:
            item.remaining, item.reset = max(0, remaining), max(0, math.ceil(reset))

    def headers(self) -> list[tuple[str, str]]:
        """The two header fields (``RateLimit`` only when some item's state is known)."""
        policy = ", ".join(_policy_item(n, i.quota, i.window) for n, i in self.items.items())
        known = [
            f'"{n}";r={i.remaining};t={i.reset}'
            for n, i in self.items.items()
            if i.remaining is not None
        ]
        fields = [(POLICY_HEADER, policy)]
        if known:
            fields.append((STATE_HEADER, ", ".join(known)))
        return fields


@functools.lru_cache(maxsize=1024)
def _policy_item(name: str, quota: int, window: int) -> str:
    """One ``RateLimit-Policy`` item (the same for a tenant from one request to the next)."""
    return f'"{name}";q={quota};w={window}'


def bucket_window(rate: float, burst: int) -> int:
    """The seconds a bucket of ``burst`` takes to refill at ``rate``: ``burst`` per that time."""
    return max(1, math.ceil(burst / rate))


def limit_state(book: QuotaBook, tenant: Tenant, admitted: Admission | None) -> LimitState | None:
    """The limits in force on ``tenant`` (None when it has none: no headers)."""
    quotas = book.in_force(tenant)
    rate = None if admitted is None else admitted.policy.rate
    if not quotas and rate is None:
        return None
    state = LimitState()
    if admitted is not None and rate is not None:
        burst = admitted.policy.burst
        state.policy(RATE_ITEM, burst, bucket_window(rate, burst))
        if admitted.rate is not None:
            state.learn(RATE_ITEM, admitted.rate.remaining, admitted.rate.reset)
    if quotas:
        now = time.time()
        for status in book.statuses(tenant, "numbers", now) + book.statuses(
            tenant, "requests", now
        ):
            state.policy(status.name, status.limit, status.window.seconds)
    return state


def learn_quotas(state: LimitState | None, statuses: Sequence[QuotaStatus]) -> None:
    """Record what reserving left of each quota."""
    if state is None:
        return
    now = time.time()
    for status in statuses:
        state.learn(status.name, status.remaining, status.window.resets_at.timestamp() - now)
