"""deploy/: the Grafana dashboard and the Prometheus alerts use only what the gateway exports,
and every alert has unit tests run by promtool (firing and quiet)."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any, Final

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import Quotas
from proxy.tenants import Limits
from tests.conftest import (
    CREDS_A,
    CREDS_B,
    KEY_A,
    KEY_B,
    Client,
    MakeGateway,
    Upstream,
    make_tenant,
)
from tests.processes import free_port
from tests.test_deploy import DEPLOY

ALERTS: Final = DEPLOY / "prometheus-alerts.yml"
ALERT_TESTS: Final = DEPLOY / "prometheus-alerts.test.yml"
DASHBOARD: Final = DEPLOY / "grafana-dashboard.json"
# Prometheus adds these to every series it scrapes; `up` is Prometheus' own series.
SCRAPE_LABELS: Final = frozenset({"job", "instance"})
PROMETHEUS_OWN: Final = frozenset({"up"})
SUFFIXES: Final = ("_bucket", "_sum", "_count", "_total")
KEYWORDS: Final = frozenset({"and", "or", "unless", "offset", "bool"})

STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
MATCHERS = re.compile(r"\{[^}]*\}")
RANGE = re.compile(r"\[[^\]]*\]")
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
NAME = re.compile(r"(?<![\w$.])[a-zA-Z_:][\w:]*(?![\w:])(?!\s*\()")
SELECTOR = re.compile(r"([a-zA-Z_:][\w:]*)\s*\{([^}]*)\}")
MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')

ONE_CALL: Final = Limits(rate_limit_rps=0.01, rate_limit_burst=1)

Exported = dict[str, dict[str, set[str]]]  # base name -> label name -> values seen


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    """Run promtool; missing, it is a failure (make test installs Debian's prometheus)."""
    if shutil.which("promtool") is None:
        pytest.fail("promtool is not installed: run make test, or apt-get install prometheus")
    return subprocess.run(
        ["promtool", *args], capture_output=True, text=True, timeout=60, cwd=DEPLOY
    )


def base_name(name: str) -> str:
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression reads (functions and label names left out)."""
    bare = RANGE.sub(" ", MATCHERS.sub(" ", STRING.sub('""', expr)))
    bare = GROUPING.sub(" ", bare)
    return {n for n in NAME.findall(bare) if n not in KEYWORDS}


def grouping_labels(expr: str) -> set[str]:
    """Labels named in ``by (...)``, ``without (...)``, ``on (...)`` clauses."""
    return {label.strip() for group in GROUPING.findall(expr) for label in group.split(",")} - {""}


def alert_rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in data["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def dashboard_exprs() -> Iterator[str]:
    """Every panel target's expression, and the series the variables query."""
    for panel in dashboard()["panels"]:
        for target in panel["targets"]:
            yield target["expr"]
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            found = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", variable["query"]["query"])
            assert found is not None, variable
            yield found.group(1)


def all_exprs() -> list[str]:
    return [*dashboard_exprs(), *(rule["expr"] for rule in alert_rules())]


@pytest.fixture
async def exported(upstream: Upstream, make_gateway: MakeGateway) -> Exported:
    """Base names and label values on a real gateway's /metrics after traffic of every kind."""
    down = f"http://127.0.0.1:{free_port()}"
    client = await make_gateway(
        [
            dataclasses.replace(
                make_tenant("tenant-a", KEY_A, upstream.base_url, CREDS_A, limits=ONE_CALL),
                quotas=Quotas(requests_per_day=1000),  # so the quota gauges have series
            ),
            make_tenant("tenant-b", KEY_B, down, CREDS_B),
        ]
    )
    await traffic(client)
    response = await client.get("/metrics")
    seen: Exported = {}
    for family in text_string_to_metric_families(await response.text()):
        labels = seen.setdefault(base_name(family.name), {})
        for sample in family.samples:
            for name, value in sample.labels.items():
                labels.setdefault(name, set()).add(value)
    return seen


async def traffic(client: Client) -> None:
    """A forward, a 429, an append, a 502 and a wrong key."""
    json_headers = {"Content-Type": "application/json"}
    body = json.dumps(
        {"taskId": "t1", "countryCode": "86", "phoneNumbers": [{"phoneNumber": "13800000000"}]}
    ).encode()
    calls = [
        ("/openapi/aiagent/task/list", KEY_A, b"{}"),
        ("/openapi/aiagent/task/list", KEY_A, b"{}"),  # over tenant-a's burst of 1
        ("/api/openapi/append-numbers", KEY_B, body),  # tenant-b's upstream is down
        ("/openapi/aiagent/task/list", KEY_B, b"{}"),
        ("/openapi/aiagent/task/list", "wrong-key-nobody-has-0000", b"{}"),
    ]
    statuses = []
    for path, key, data in calls:
        response = await client.post(path, data=data, headers=json_headers | {"x-api-key": key})
        await response.read()
        statuses.append(response.status)
    assert statuses == [200, 429, 200, 502, 403]


# ---------------------------------------------------------------------------------------------


def test_alert_rules_pass_promtool_check() -> None:
    done = promtool("check", "rules", ALERTS.name)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in done.stdout


def test_alert_unit_tests_pass_promtool() -> None:
    done = promtool("test", "rules", ALERT_TESTS.name)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    cases = [
        case
        for test in yaml.safe_load(ALERT_TESTS.read_text(encoding="utf-8"))["tests"]
        for case in test["alert_rule_test"]
    ]
    for rule in alert_rules():
        mine = [c for c in cases if c["alertname"] == rule["alert"]]
        assert any(c["exp_alerts"] for c in mine), f"{rule['alert']} never fires in a test"
        assert any(not c["exp_alerts"] for c in mine), f"{rule['alert']} never stays quiet"


def test_alerts_cover_errors_latency_reloads_and_a_down_gateway() -> None:
    used = {name for rule in alert_rules() for name in metric_names(rule["expr"])}
    assert {base_name(n) for n in used} == {
        "nxlink_proxy_requests",
        "nxlink_proxy_upstream_latency_seconds",
        "nxlink_proxy_config_reloads",
        "nxlink_proxy_quota_used",
        "nxlink_proxy_quota_limit",
        "up",
    }
    assert all(rule["labels"]["severity"] in ("warning", "critical") for rule in alert_rules())


def test_dashboard_panels_are_well_formed_grafana_panels() -> None:
    panels = dashboard()["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(set(refs)) == len(refs)


def test_dashboard_shows_what_an_operator_watches() -> None:
    exprs = list(dashboard_exprs())
    used = {base_name(n) for e in exprs for n in metric_names(e)}
    assert {
        "nxlink_proxy_requests",
        "nxlink_proxy_upstream_latency_seconds",
        "nxlink_proxy_limited",
        "nxlink_proxy_append_numbers",
        "nxlink_proxy_config_reloads",
        "nxlink_proxy_quota_used",
    } <= used
    assert any("histogram_quantile(0.5," in e for e in exprs)
    assert any("histogram_quantile(0.99," in e for e in exprs)
    assert any('status_class="5xx"' in e and "/" in e for e in exprs)


def test_metric_name_extraction_reads_series_only() -> None:
    expr = 'sum by (tenant, le) (rate(a_b_bucket{job=~"$j", x="y z"}[$__rate_interval])) > up'
    assert metric_names(expr) == {"a_b_bucket", "up"}
    assert grouping_labels(expr) == {"tenant", "le"}


def test_every_metric_the_dashboard_and_alerts_use_is_exported(exported: Exported) -> None:
    used = {base_name(name) for expr in all_exprs() for name in metric_names(expr)}
    assert used - PROMETHEUS_OWN <= set(exported), used - PROMETHEUS_OWN - set(exported)


@pytest.mark.parametrize("expr", all_exprs(), ids=lambda e: " ".join(e.split())[:60])
def test_every_label_and_value_an_expression_names_is_exported(
    expr: str, exported: Exported
) -> None:
    available = set(SCRAPE_LABELS)
    for name in metric_names(expr) - PROMETHEUS_OWN:
        available |= set(exported[base_name(name)])
    assert grouping_labels(expr) <= available
    for name, matchers in SELECTOR.findall(expr):
        labels = exported.get(base_name(name), {})
        for label, op, value in MATCHER.findall(matchers):
            if label in SCRAPE_LABELS or "$" in value:
                continue
            assert label in labels, f"{name} has no label {label}"
            wanted = value.split("|") if op == "=~" else [value]
            assert set(wanted) <= labels[label], f"{name}{{{label}}} never is {wanted}"
