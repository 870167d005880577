"""The alerting rules, their unit tests, and the Grafana dashboard, against the code.

`promtool` checks the rules and runs deploy/prometheus/token-proxy-rules.test.yaml,
which drives every alert with input series to fire and, beside it, a look-alike
that must stay silent. The Prometheus Operator copy must hold the same rules. Every
expression in the rules and the dashboard may name only series that
`proxy.ops.metrics.Metrics` exports, with labels those series have, so neither can drift
from the code; the dashboard's queries must also parse as PromQL. docs/dashboard.md
must describe every panel and every alert.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from proxy.errors import TOKEN_FETCH_FAILURE_REASONS
from proxy.ops.metrics import (
    TOKEN_CACHE_ERROR_REASONS,
    TOKEN_CACHE_LOOKUP_RESULTS,
    TOKEN_CACHE_REJECT_REASONS,
    TOKEN_CACHE_WAIT_OUTCOMES,
    Metrics,
)
from tests.support import tools

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "deploy" / "prometheus" / "token-proxy-rules.yaml"
RULES_TESTS = REPO / "deploy" / "prometheus" / "token-proxy-rules.test.yaml"
PROMETHEUS_RULE = REPO / "deploy" / "base" / "prometheusrule.yaml"
DASHBOARD = REPO / "deploy" / "grafana" / "token-proxy-dashboard.json"
DASHBOARD_DOC = REPO / "docs" / "dashboard.md"

# Labels Prometheus adds to every scraped series (job, instance) and those the
# Kubernetes service discovery adds (namespace, pod); `le` is a histogram bucket's.
TARGET_LABELS = frozenset({"job", "instance", "namespace", "pod"})
SCRAPE_JOB = "token-proxy"
SEVERITIES = {"warning", "critical"}
# The alerts the product promises; each must say which upstream it is about.
UPSTREAM_ALERTS = {
    "TokenProxyTokenFetchFailing",
    "TokenProxyTokenExpiringSoon",
    "TokenProxyTokenUnavailable",
    "TokenProxyUpstreamErrors",
}
REQUIRED_ALERTS = UPSTREAM_ALERTS | {"TokenProxySidecarDown"}
KNOWN_LABEL_VALUES = {
    ("token_proxy_token_fetches_total", "outcome"): {"success", "failure"},
    ("token_proxy_config_reloads_total", "outcome"): {"success", "failure"},
    ("token_proxy_token_fetch_failures_total", "reason"): set(TOKEN_FETCH_FAILURE_REASONS),
    ("token_proxy_token_cache_lookups_total", "result"): set(TOKEN_CACHE_LOOKUP_RESULTS),
    ("token_proxy_token_cache_lock_waits_total", "outcome"): set(TOKEN_CACHE_WAIT_OUTCOMES),
    ("token_proxy_token_cache_errors_total", "reason"): set(TOKEN_CACHE_ERROR_REASONS),
    ("token_proxy_token_cache_rejected_entries_total", "reason"): set(TOKEN_CACHE_REJECT_REASONS),
}
# Grafana's variables, replaced by values that keep a query valid PromQL.
GRAFANA_SUBSTITUTES = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
    "$namespace": ".*",
    "$upstream": ".*",
}

_SERIES_SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum"),
    "info": ("_info",),
}
_SELECTOR = re.compile(r"\b(token_proxy_[a-z0-9_]+)\s*(\{[^}]*\})?")
_MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)"')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")


def exported_series() -> dict[str, frozenset[str]]:
    """Every series name a live `Metrics()` exports -> the label names it carries."""
    metrics = Metrics()
    metrics.register_upstream("inventory")
    metrics.enable_token_cache()  # the fleet token cache's families, registered with it
    metrics.register_cache_upstream("inventory")
    metrics.observe_request("inventory", 200, 0.01)  # so that its samples show their labels
    declared: dict[str, frozenset[str]] = {}
    # dir(), not vars(): a compiled Metrics keeps its attributes in a C struct.
    for wrapper in (getattr(metrics, name) for name in dir(metrics)):
        if isinstance(wrapper, MetricWrapperBase):
            # Declared label names, for families that have no sample yet.
            declared[wrapper._name] = frozenset(wrapper._labelnames)
    series: dict[str, frozenset[str]] = {}
    for family in metrics.registry.collect():
        label_names = set(declared.get(family.name, frozenset()))
        for sample in family.samples:
            label_names |= set(sample.labels) - {"le"}
        for suffix in _SERIES_SUFFIXES[family.type]:
            extra = {"le"} if suffix == "_bucket" else set()
            series[family.name + suffix] = frozenset(label_names | extra)
    return series


EXPORTED = exported_series()


def check_expression(expression: str) -> list[str]:
    """Problems with the series, labels and label values `expression` names."""
    problems = []
    named = _SELECTOR.findall(expression)
    if not named:
        problems.append(f"names no token_proxy_ series: {expression}")
    allowed_labels = set(TARGET_LABELS)
    for name, braces in named:
        if name not in EXPORTED:
            problems.append(f"{name} is not exported by proxy.ops.metrics")
            continue
        allowed_labels |= EXPORTED[name]
        for label, _op, value in _MATCHER.findall(braces or ""):
            if label not in EXPORTED[name] | TARGET_LABELS:
                problems.append(f"{name} has no label {label}")
            known = KNOWN_LABEL_VALUES.get((name, label))
            if known is not None:
                wanted = set(value.split("|")) if _op in ("=~", "!~") else {value}
                if not wanted <= known:
                    problems.append(f"{name}{{{label}}} never takes {wanted - known}")
    for grouping in _GROUPING.findall(expression):
        for label in filter(None, (part.strip() for part in grouping.split(","))):
            if label not in allowed_labels:
                problems.append(f"groups by {label}, which no series here carries")
    return problems


def test_exported_series_cover_the_product_contract() -> None:
    # The reader above is what every drift check relies on: it must see the metrics.
    assert EXPORTED["token_proxy_token_fetches_total"] == {"upstream", "outcome"}
    assert EXPORTED["token_proxy_request_duration_seconds_bucket"] == {"upstream", "le"}
    assert EXPORTED["token_proxy_client_connections"] == frozenset()
    assert "token_proxy_build_info" in EXPORTED
    assert check_expression('rate(token_proxy_requests_total{upstrem="x"}[5m])')
    assert check_expression("token_proxy_no_such_metric")
    assert check_expression('token_proxy_token_fetches_total{outcome="failed"}')
    assert check_expression("sum by (host) (token_proxy_requests_total)")
    assert not check_expression('sum by (upstream) (token_proxy_requests_total{code=~"5.."})')


# ---------------------------------------------------------------------------
# Alerting rules
# ---------------------------------------------------------------------------


def plain_rule_groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = yaml.safe_load(RULES.read_text())["groups"]
    return groups


def alerting_rules() -> Iterator[dict[str, Any]]:
    for group in plain_rule_groups():
        yield from (rule for rule in group["rules"] if "alert" in rule)


def test_operator_rule_holds_the_same_rules_as_the_plain_file() -> None:
    resource = yaml.safe_load(PROMETHEUS_RULE.read_text())
    assert resource["apiVersion"] == "monitoring.coreos.com/v1"
    assert resource["kind"] == "PrometheusRule"
    assert resource["spec"]["groups"] == plain_rule_groups()


@pytest.fixture(scope="module")
def promtool() -> Path:
    try:
        return tools.promtool()
    except tools.ToolUnavailable as unavailable:
        pytest.skip(f"!!! promtool unavailable, alert rules NOT checked: {unavailable}")


def _promtool(promtool: Path, *arguments: str, cwd: Path | None = None) -> str:
    result = subprocess.run(
        [str(promtool), *arguments],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.timeout(600)
def test_promtool_accepts_both_rule_files(promtool: Path, tmp_path: Path) -> None:
    output = _promtool(promtool, "check", "rules", str(RULES))
    assert f"SUCCESS: {len(list(alerting_rules()))} rules found" in output
    operator_groups = tmp_path / "operator-rules.yaml"
    spec = yaml.safe_load(PROMETHEUS_RULE.read_text())["spec"]
    operator_groups.write_text(yaml.safe_dump(spec))
    _promtool(promtool, "check", "rules", str(operator_groups))


@pytest.mark.timeout(600)
def test_promtool_unit_tests_pass(promtool: Path) -> None:
    output = _promtool(promtool, "test", "rules", RULES_TESTS.name, cwd=RULES_TESTS.parent)
    assert "SUCCESS" in output


@pytest.mark.timeout(600)
def test_promtool_unit_tests_can_fail(promtool: Path, tmp_path: Path) -> None:
    """A rule that never fires must fail its unit test, or the passing run means nothing."""
    groups = plain_rule_groups()
    for rule in groups[0]["rules"]:
        rule["expr"] = "vector(1) == 0"
    (tmp_path / RULES.name).write_text(yaml.safe_dump({"groups": groups}))
    (tmp_path / RULES_TESTS.name).write_text(RULES_TESTS.read_text())
    result = subprocess.run(
        [str(promtool), "test", "rules", RULES_TESTS.name],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode != 0
    for alert in REQUIRED_ALERTS:
        assert f"alertname: {alert}," in result.stdout + result.stderr, alert


def test_every_alert_is_tested_firing_and_silent() -> None:
    unit_tests = yaml.safe_load(RULES_TESTS.read_text())
    assert unit_tests["rule_files"] == [RULES.name]
    firing: set[str] = set()
    silent: set[str] = set()
    for case in unit_tests["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check["exp_alerts"] else silent).add(check["alertname"])
    alerts = {rule["alert"] for rule in alerting_rules()}
    assert alerts == firing, f"never seen firing: {alerts - firing}"
    assert alerts == silent, f"never seen silent: {alerts - silent}"


def test_alerts_promised_by_the_product_exist() -> None:
    missing = REQUIRED_ALERTS - {rule["alert"] for rule in alerting_rules()}
    assert not missing


@pytest.mark.parametrize("rule", list(alerting_rules()), ids=lambda rule: rule["alert"])
def test_alert_is_labelled_and_explained(rule: dict[str, Any]) -> None:
    assert rule["labels"]["severity"] in SEVERITIES
    annotations = rule["annotations"]
    assert annotations["summary"].strip()
    assert len(annotations["description"]) > len(annotations["summary"])
    if rule["alert"] in UPSTREAM_ALERTS:
        assert "{{ $labels.upstream }}" in annotations["summary"]
        assert "{{ $labels.upstream }}" in annotations["description"]
    if rule["alert"] in REQUIRED_ALERTS:
        assert re.fullmatch(r"\d+[smh]", rule["for"]), "needs a `for:` against flapping"
    assert f'job="{SCRAPE_JOB}"' in rule["expr"], "must select the token-proxy scrape job"


@pytest.mark.parametrize("rule", list(alerting_rules()), ids=lambda rule: rule["alert"])
def test_alert_expression_names_only_exported_series(rule: dict[str, Any]) -> None:
    expression = rule["expr"]
    if rule["alert"] == "TokenProxySidecarDown":
        # `up` is Prometheus' own series for the scrape, not one the proxy exports.
        assert re.findall(r"\bup\{", expression)
        assert "absent(" in expression
        return
    assert check_expression(expression) == []


# ---------------------------------------------------------------------------
# Grafana dashboard
# ---------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def dashboard_queries() -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    for panel in panels():
        for target in panel["targets"]:
            yield f"{panel['title']} {target['refId']}", target["expr"]
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            text = query["query"] if isinstance(query, dict) else query
            selector = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", text)
            assert selector, f"variable {variable['name']}: unexpected query {text}"
            yield f"variable {variable['name']}", selector.group(1)


def test_dashboard_has_datasource_and_upstream_variables() -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    upstream = variables["upstream"]
    assert upstream["type"] == "query"
    assert upstream["includeAll"]
    assert upstream["multi"]
    assert upstream["datasource"]["uid"] == "${datasource}"


def test_dashboard_panels_are_well_formed() -> None:
    everything = dashboard()["panels"]
    ids = [p["id"] for p in everything]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    occupied: set[tuple[int, int]] = set()
    for panel in everything:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {
            (grid["x"] + dx, grid["y"] + dy) for dx in range(grid["w"]) for dy in range(grid["h"])
        }
        assert not cells & occupied, f"{panel['title']} overlaps another panel"
        occupied |= cells
    for panel in panels():
        assert panel["title"], panel["id"]
        assert panel["description"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_dashboard_queries_name_only_exported_series() -> None:
    problems = {where: check_expression(expr) for where, expr in dashboard_queries()}
    assert {where: p for where, p in problems.items() if p} == {}


def test_dashboard_filters_by_the_upstream_variable() -> None:
    for panel in panels():
        for target in panel["targets"]:
            names = {name for name, _ in _SELECTOR.findall(target["expr"])}
            if any("upstream" in EXPORTED[name] for name in names):
                assert 'upstream=~"$upstream"' in target["expr"], panel["title"]


def test_dashboard_shows_what_operators_need() -> None:
    expressions = "\n".join(expr for _, expr in dashboard_queries())
    for needed in (
        "token_proxy_token_expires_in_seconds",
        "token_proxy_token_fetches_total",
        "token_proxy_token_fetch_failures_total",
        "token_proxy_requests_total",
        "token_proxy_upstream_unauthorized_retries_total",
        "token_proxy_token_unavailable_total",
    ):
        assert needed in expressions, needed
    for histogram in (
        "token_proxy_token_fetch_duration_seconds",
        "token_proxy_request_duration_seconds",
    ):
        assert re.search(rf"histogram_quantile\([^,]+,[^\n]*{histogram}_bucket", expressions)
    assert re.search(
        r"by \(upstream, reason\)[^\n]*token_proxy_token_fetch_failures_total", expressions
    )


@pytest.mark.timeout(600)
def test_dashboard_queries_parse_as_promql(promtool: Path, tmp_path: Path) -> None:
    rules = []
    for index, (_where, expression) in enumerate(dashboard_queries()):
        for variable, value in GRAFANA_SUBSTITUTES.items():
            expression = expression.replace(variable, value)
        assert "$" not in expression, f"unknown Grafana variable in {expression}"
        rules.append({"record": f"dashboard:query_{index}", "expr": expression})
    as_rules = tmp_path / "dashboard-queries.yaml"
    as_rules.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    output = _promtool(promtool, "check", "rules", str(as_rules))
    assert f"SUCCESS: {len(rules)} rules found" in output


# ---------------------------------------------------------------------------
# The runbook
# ---------------------------------------------------------------------------


def doc_headings() -> set[str]:
    headings = set()
    for line in DASHBOARD_DOC.read_text().splitlines():
        if line.startswith("#"):
            headings.add(line.lstrip("#").strip().strip("`"))
    return headings


def test_docs_describe_every_panel() -> None:
    missing = {p["title"] for p in panels()} - doc_headings()
    assert not missing, f"docs/dashboard.md has no section for panels {missing}"


def test_docs_give_a_runbook_for_every_alert() -> None:
    missing = {rule["alert"] for rule in alerting_rules()} - doc_headings()
    assert not missing, f"docs/dashboard.md has no section for alerts {missing}"
