"""The usage ledger: per tenant and day (in ``QUOTA_TIMEZONE``), requests by action and status
class, numbers appended and failed, upstream errors. Counted in memory on the request path (no
state call) and added to the backend every ``FLUSH_EVERY`` seconds and on shutdown."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import defaultdict
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, Final
from zoneinfo import ZoneInfo

from proxy.config import Settings
from proxy.quotas import QuotaBook
from proxy.state import open_state
from proxy.state.base import StateUnavailable
from proxy.state.fallback import ResilientState
from proxy.tenants import Tenant

FLUSH_EVERY: Final = 1.0
KEEP_DAYS: Final = 100  # longer than the most days a report shows
MAX_DAYS: Final = 90
STATUS_CLASSES: Final = ("2xx", "4xx", "5xx")
UPSTREAM_ERRORS: Final = frozenset({502, 504})
# Distinct action names one process counts per tenant and day: the action is the client's
# header, so a tenant naming ever new ones has them counted past this as OTHER_ACTION (a name
# no action can have), and neither this process's memory nor the backend's usage grows with it.
MAX_ACTIONS: Final = 64
OTHER_ACTION: Final = "~other"

Counts = dict[tuple[str, str], dict[str, int]]


class Today:
    """Today's date in a zone, recomputed only when midnight passes (cheap per request)."""

    def __init__(self, zone: ZoneInfo):
        self.zone, self._until, self._label = zone, 0.0, ""

    def __call__(self) -> str:
        now = time.time()
        if now >= self._until:
            today = datetime.fromtimestamp(now, self.zone).date()
            tomorrow = today + timedelta(days=1)
            midnight = datetime(tomorrow.year, tomorrow.month, tomorrow.day, tzinfo=self.zone)
            self._until, self._label = midnight.timestamp(), today.isoformat()
        return self._label


class UsageLedger:
    """This process's counts not yet in the backend."""

    def __init__(self, state: ResilientState, zone: ZoneInfo):
        self.state, self.today = state, Today(zone)
        self.day = self.today()  # refreshed by every flush: no clock read per request
        self._requests: defaultdict[tuple[str, str, str, int], int] = defaultdict(int)
        self._numbers: Counts = {}
        self._actions: dict[str, set[str]] = {}  # tenant id → the action names counted today
        # Each flush is one batch, numbered in this ledger's sequence: one whose adding failed,
        # or may have (a late answer), is sent again as it is, under its number, and the
        # backend adds it once. One flush at a time, so batches reach the backend in order.
        self._source, self._seq = uuid.uuid4().hex, 0
        self._unsent: tuple[int, Counts] | None = None
        self._flushing = asyncio.Lock()

    def count_request(self, tenant: Tenant, action: str, status: int) -> None:
        """One answered request of ``tenant``."""
        named = self._actions.get(tenant.id)
        if named is None:
            named = self._actions[tenant.id] = set()
        if action not in named:
            if len(named) >= MAX_ACTIONS:
                action = OTHER_ACTION
            else:
                named.add(action)
        self._requests[tenant.id, self.day, action, status] += 1

    def count_numbers(self, tenant: Tenant, appended: int, failed: int) -> None:
        """The numbers one append-numbers request appended and failed."""
        day = self._numbers.setdefault((tenant.id, self.day), {})
        day["numbersAppended"] = day.get("numbersAppended", 0) + appended
        day["numbersFailed"] = day.get("numbersFailed", 0) + failed

    def count_upstream_error(self, tenant: Tenant) -> None:
        """One exchange with nxlink that failed inside a request answered otherwise (a batch of
        append-numbers); a forwarded request's 502 or 504 is counted by its status."""
        day = self._numbers.setdefault((tenant.id, self.day), {})
        day["upstreamErrors"] = day.get("upstreamErrors", 0) + 1

    def take(self) -> Counts:
        """Everything counted since the last take, as backend counters."""
        counts, self._numbers = self._numbers, {}
        requests, self._requests = self._requests, defaultdict(int)
        for (tenant, day, action, status), n in requests.items():
            fields = counts.setdefault((tenant, day), {})
            for name in ("requests", f"action:{action}", f"status:{status // 100}xx"):
                fields[name] = fields.get(name, 0) + n
            if status in UPSTREAM_ERRORS:
                fields["upstreamErrors"] = fields.get("upstreamErrors", 0) + n
        return counts

    async def flush(self) -> None:
        """Add what was counted to the backend as the next batch; a batch that failed is sent
        again, as it was, by the next flush, before anything newer (which waits in memory and
        goes in the same flush once the old batch is in: the last flush at shutdown loses
        nothing the backend takes)."""
        async with self._flushing:
            day = self.today()
            if day != self.day:
                self.day, self._actions = day, {}
            resent = self._unsent is not None
            if await self._send_batch() and resent:
                await self._send_batch()

    async def _send_batch(self) -> bool:
        """Send the pending batch, or the next one; False when the backend did not take it."""
        if self._unsent is None:
            counts = self.take()
            if not counts:
                return True
            self._seq += 1
            self._unsent = (self._seq, counts)
        seq, counts = self._unsent
        ttl, source = KEEP_DAYS * 86400, self._source
        try:
            await self.state.shared_only(lambda s: s.add_usage(counts, ttl, source=source, seq=seq))
        except StateUnavailable:
            return False
        self._unsent = None
        return True

    async def keep_flushing(self) -> None:
        """Flush every ``FLUSH_EVERY`` seconds, for good."""
        while True:
            await asyncio.sleep(FLUSH_EVERY)
            await self.flush()


def report_days(zone: ZoneInfo, count: int, now: float | None = None) -> list[str]:
    """The last ``count`` days in ``zone``, newest first."""
    today = datetime.fromtimestamp(time.time() if now is None else now, zone).date()
    return [(today - timedelta(days=n)).isoformat() for n in range(count)]


def day_entry(day: str, fields: Mapping[str, int]) -> dict[str, Any]:
    """One day of the report, zeros where nothing was counted."""
    by_status = {cls: 0 for cls in STATUS_CLASSES}
    by_action: dict[str, int] = {}
    for name, n in fields.items():
        kind, _, label = name.partition(":")
        if kind == "status":
            by_status[label] = n
        elif kind == "action":
            by_action[label] = n
    return {
        "date": day,
        "requests": fields.get("requests", 0),
        "byAction": by_action,
        "byStatus": by_status,
        "numbersAppended": fields.get("numbersAppended", 0),
        "numbersFailed": fields.get("numbersFailed", 0),
        "upstreamErrors": fields.get("upstreamErrors", 0),
    }


async def usage_report(
    state: ResilientState, book: QuotaBook, tenant: Tenant, days: int
) -> dict[str, Any]:
    """A tenant's quotas and its last ``days`` days of usage (raises ``StateUnavailable``)."""
    labels = report_days(book.zone, days)
    read = await state.shared_only(lambda s: s.read_usage(tenant.id, labels))
    quotas = await book.used(tenant)
    return {
        "apiKeyAlias": tenant.alias,
        "timezone": book.zone.key,
        "quotas": [status.shown() for status in quotas],
        "days": [day_entry(day, read.get(day, {})) for day in labels],
    }


def parse_days(raw: str | None) -> int:
    """``days`` as given (default 7); ``ValueError`` unless 1 to ``MAX_DAYS``."""
    if raw is None or raw == "":
        return 7
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_DAYS:
        raise ValueError(f"days must be a whole number from 1 to {MAX_DAYS}")
    return int(raw)


async def read_reports(
    settings: Settings, tenants: Sequence[Tenant], days: int
) -> list[dict[str, Any]]:
    """Every tenant's report, read from ``STATE_URL`` (the ``usage`` command)."""
    state = ResilientState(open_state(settings.state_url))
    try:
        book = QuotaBook(settings, state)
        return [await usage_report(state, book, tenant, days) for tenant in tenants]
    finally:
        await state.close()


def report_lines(report: Mapping[str, Any]) -> list[str]:
    """One tenant's report as a table."""
    lines = [f"{report['apiKeyAlias']} (days in {report['timezone']})"]
    for quota in report["quotas"]:
        lines.append(
            f"  quota {quota['name']}: {quota['used']} of {quota['limit']} used, "
            f"{quota['remaining']} left, resets {quota['resetsAt']}"
        )
    lines.append(
        f"  {'date':<10} {'requests':>8} {'2xx':>6} {'4xx':>6} {'5xx':>6} "
        f"{'appended':>8} {'failed':>7} {'upstreamErr':>11}"
    )
    for day in report["days"]:
        status = day["byStatus"]
        lines.append(
            f"  {day['date']:<10} {day['requests']:>8} {status['2xx']:>6} {status['4xx']:>6} "
            f"{status['5xx']:>6} {day['numbersAppended']:>8} {day['numbersFailed']:>7} "
            f"{day['upstreamErrors']:>11}"
        )
    return lines
