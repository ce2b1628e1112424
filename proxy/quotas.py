"""Quotas: budgets of numbers and requests per calendar day and month in ``QUOTA_TIMEZONE``,
reserved atomically in the state backend before anything is sent."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Final, Literal
from zoneinfo import ZoneInfo

from proxy.config import Quotas, Settings
from proxy.errors import TooManyRequests
from proxy.state.base import QuotaCharge, QuotaResult, StateUnavailable
from proxy.state.fallback import ResilientState, Where
from proxy.tenants import Tenant

logger = logging.getLogger(__name__)

Kind = Literal["numbers", "requests"]
NO_QUOTAS: Final = Quotas()


@dataclass(frozen=True, slots=True)
class Window:
    """One calendar window of a quota: its key label and when it ends."""

    label: str  # 2026-12-01 or 2026-12
    seconds: int  # its whole length (86400 for a day of 24 h)
    resets_at: datetime


@dataclass(frozen=True, slots=True)
class QuotaStatus:
    """Where one quota stands."""

    name: str
    limit: int
    used: int
    window: Window

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.used)

    def shown(self) -> dict[str, object]:
        """The ``quota`` object of answers: name, limit, used, remaining, resetsAt."""
        resets = self.window.resets_at.isoformat(timespec="seconds")
        return {
            "name": self.name,
            "limit": self.limit,
            "used": self.used,
            "remaining": self.remaining,
            "resetsAt": resets,
        }


Observer = Callable[[str, Sequence["QuotaStatus"]], None]


def _unobserved(alias: str, statuses: Sequence[QuotaStatus]) -> None:
    return None


def window_of(name: str, now: datetime) -> Window:
    """The day or month (``now`` is aware, in the quota time zone) that ``name`` counts in."""
    today = now.date()
    if name.endswith("PerDay"):
        start, end, label = today, today + timedelta(days=1), today.isoformat()
    else:
        start = today.replace(day=1)
        end = (start + timedelta(days=32)).replace(day=1)
        label = start.isoformat()[:7]
    starts, ends = _midnight(start, now.tzinfo), _midnight(end, now.tzinfo)
    # Aware datetimes of one zone subtract as wall clocks: a 23 h day needs the timestamps.
    return Window(label, round(ends.timestamp() - starts.timestamp()), ends)


def _midnight(day: date, zone: object) -> datetime:
    assert isinstance(zone, ZoneInfo)
    return datetime(day.year, day.month, day.day, tzinfo=zone)


def quota_key(tenant: Tenant, name: str, window: Window) -> str:
    return f"q:{tenant.id}:{name}:{window.label}"


@dataclass(frozen=True, slots=True)
class Reservation:
    """What one ``reserve`` took: the exact charges, the backend that took them, and where the
    quotas stood after it (for the RateLimit headers)."""

    charges: tuple[QuotaCharge, ...] = ()
    where: Where = "shared"
    statuses: tuple[QuotaStatus, ...] = ()

    @property
    def amount(self) -> int:
        """What each charge took (one amount against every window)."""
        return self.charges[0].amount if self.charges else 0

    def keeping(self, amount: int) -> Reservation:
        """The same reservation reduced to ``amount`` (never grown)."""
        kept = min(max(0, amount), self.amount)
        charges = tuple(dataclasses.replace(c, amount=kept) for c in self.charges)
        return Reservation(charges, self.where, self.statuses)

    def encode(self) -> bytes:
        """The reservation as a journal record (its charges and backend)."""
        charges = [[c.key, c.limit, c.amount, c.expires_at] for c in self.charges]
        return json.dumps({"where": self.where, "charges": charges}).encode()

    @staticmethod
    def decode(raw: bytes) -> Reservation:
        """A reservation ``encode`` recorded."""
        doc = json.loads(raw)
        where: Where = "local" if doc["where"] == "local" else "shared"
        charges = tuple(
            QuotaCharge(str(key), int(limit), int(amount), float(expires))
            for key, limit, amount, expires in doc["charges"]
        )
        return Reservation(charges, where)


NOTHING_RESERVED: Final = Reservation()


class QuotaBook:
    """Reserves and gives back a tenant's numbers and requests."""

    def __init__(
        self,
        settings: Settings,
        state: ResilientState,
        observe: Observer = _unobserved,
        clock: Callable[[], float] = time.time,
    ):
        self.defaults, self.state, self.observe = settings.quota_defaults, state, observe
        self.zone, self.clock = ZoneInfo(settings.quota_timezone), clock
        self._no_defaults = self.defaults == NO_QUOTAS

    def in_force(self, tenant: Tenant) -> list[tuple[str, int]]:
        """The tenant's quotas as ``(name, limit)``; empty without a state call when none."""
        if self._no_defaults and tenant.quotas == NO_QUOTAS:
            return []
        return tenant.quotas.over(self.defaults).items()

    def statuses(self, tenant: Tenant, kind: Kind, now: float) -> list[QuotaStatus]:
        """The tenant's quotas of ``kind``, with nothing used yet."""
        in_force = [(name, limit) for name, limit in self.in_force(tenant) if name.startswith(kind)]
        if not in_force:
            return []  # no date worked out: a limited tenant without quotas asks on every request
        local = datetime.fromtimestamp(now, self.zone)
        return [QuotaStatus(name, limit, 0, window_of(name, local)) for name, limit in in_force]

    def every_status(self, tenant: Tenant, now: float) -> list[QuotaStatus]:
        """Every quota of the tenant, numbers first, with nothing used yet."""
        return self.statuses(tenant, "numbers", now) + self.statuses(tenant, "requests", now)

    async def reserve(self, tenant: Tenant, kind: Kind, amount: int) -> Reservation:
        """Reserve ``amount`` against every quota of ``kind``, or raise 429 ``QUOTA_EXCEEDED``."""
        now = self.clock()
        statuses = self.statuses(tenant, kind, now)
        if not statuses:
            return NOTHING_RESERVED
        charges = tuple(self._charges(tenant, statuses, amount))
        result, where = await self.state.located(lambda s: s.reserve(charges))
        counted = _counted(statuses, result)
        self.observe(tenant.alias, counted)
        if result.refused is not None:
            raise _exceeded(counted[result.refused], amount, now)
        return Reservation(charges, where, tuple(counted))

    async def give_back(self, reservation: Reservation, amount: int) -> None:
        """Return ``amount`` (at most what was reserved) to the very windows the reservation
        charged, on the backend that took it, whatever the day is now."""
        returned = reservation.keeping(amount)
        if returned.amount <= 0:
            return
        try:
            await self.state.on(returned.where, lambda s: s.give_back(returned.charges))
        except StateUnavailable:
            # Kept charged rather than given to the wrong counter: never extra budget.
            logger.warning("%d numbers not given back: state unavailable", returned.amount)

    async def used(self, tenant: Tenant) -> list[QuotaStatus]:
        """Every quota in force and what is used of it now."""
        statuses = self.every_status(tenant, self.clock())
        keys = [quota_key(tenant, s.name, s.window) for s in statuses]
        values = await self.state.shared_or_local(lambda s: s.quota_used(keys))
        return [
            QuotaStatus(s.name, s.limit, v, s.window) for s, v in zip(statuses, values, strict=True)
        ]

    def _charges(
        self, tenant: Tenant, statuses: Sequence[QuotaStatus], amount: int
    ) -> list[QuotaCharge]:
        return [
            QuotaCharge(
                quota_key(tenant, s.name, s.window),
                s.limit,
                amount,
                s.window.resets_at.timestamp(),
            )
            for s in statuses
        ]


def _counted(statuses: Sequence[QuotaStatus], result: QuotaResult) -> list[QuotaStatus]:
    return [
        QuotaStatus(s.name, s.limit, used, s.window)
        for s, used in zip(statuses, result.used, strict=True)
    ]


def _exceeded(status: QuotaStatus, amount: int, now: float) -> TooManyRequests:
    wait = math.ceil(status.window.resets_at.timestamp() - now)
    unit = "numbers" if status.name.startswith("numbers") else "requests"
    message = (
        f"Quota {status.name} of {status.limit} {unit} exceeded: {status.remaining} left, "
        f"{amount} asked"
    )
    return TooManyRequests(message, error="QUOTA_EXCEEDED", retry_after=wait, quota=status.shown())
