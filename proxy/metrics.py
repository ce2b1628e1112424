"""Prometheus metrics, one registry per app; labels are aliases and routes, never keys."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from proxy.quotas import QuotaStatus

# The *_created series double the exposition size and tell an operator nothing here.
disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in prometheus-client

PREFIX: Final = "nxlink_proxy"
LATENCY_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """Every metric the gateway exports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            f"{PREFIX}_requests",
            "Requests answered, by tenant alias, route and status class",
            ["tenant", "route", "status_class"],
            registry=self.registry,
        )
        self.upstream_latency = Histogram(
            f"{PREFIX}_upstream_latency_seconds",
            "Time until nxlink's response headers",
            ["tenant"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        # A plain int bumped per request, read when scraped (a Gauge takes a lock per change).
        self.in_flight = 0
        Gauge(
            f"{PREFIX}_in_flight_requests", "Requests being served", registry=self.registry
        ).set_function(lambda: self.in_flight)
        self.limited = Counter(
            f"{PREFIX}_limited",
            "Requests refused by a per-tenant limit",
            ["tenant", "reason"],
            registry=self.registry,
        )
        self.rejected = Counter(
            f"{PREFIX}_auth_rejected",
            "Requests refused by API-key authentication",
            ["reason"],
            registry=self.registry,
        )
        self.reloads = Counter(
            f"{PREFIX}_config_reloads",
            "Tenant configuration reloads",
            ["result"],
            registry=self.registry,
        )
        # Exported at 0 from the start, so an alert's increase() sees the very first failure.
        for result in ("success", "failure"):
            self.reloads.labels(result)
        self.append_numbers = Counter(
            f"{PREFIX}_append_numbers",
            "Numbers processed by append-numbers",
            ["tenant", "result"],
            registry=self.registry,
        )
        self.state_errors = Counter(
            f"{PREFIX}_state_errors",
            "State backend calls that failed (limits and quotas then use this process's memory)",
            registry=self.registry,
        )
        self.quota_used = Gauge(
            f"{PREFIX}_quota_used",
            "What a tenant used of each quota in its current window, as last reserved here",
            ["tenant", "quota"],
            registry=self.registry,
        )
        self.quota_limit = Gauge(
            f"{PREFIX}_quota_limit",
            "Each quota of a tenant",
            ["tenant", "quota"],
            registry=self.registry,
        )

        # Labelled children of the two per-request metrics, looked up once per label set.
        self._counted: dict[tuple[str, str, str], Counter] = {}
        self._timed: dict[str, Histogram] = {}

    def count_request(self, tenant: str, route: str, status: int) -> None:
        """One answered request."""
        key = (tenant, route, status_class(status))
        child = self._counted.get(key)
        if child is None:
            child = self._counted[key] = self.requests.labels(*key)
        child.inc()

    def observe_upstream(self, tenant: str, seconds: float) -> None:
        """One upstream exchange's time until response headers."""
        child = self._timed.get(tenant)
        if child is None:
            child = self._timed[tenant] = self.upstream_latency.labels(tenant)
        child.observe(seconds)

    def observe_quotas(self, tenant: str, statuses: Sequence[QuotaStatus]) -> None:
        """What a reservation left of the tenant's quotas."""
        for status in statuses:
            self.quota_used.labels(tenant, status.name).set(status.used)
            self.quota_limit.labels(tenant, status.name).set(status.limit)

    def render(self) -> bytes:
        """The exposition text."""
        return generate_latest(self.registry)


def status_class(status: int) -> str:
    """``2xx``, ``4xx``, ... for a status code."""
    return f"{status // 100}xx"
