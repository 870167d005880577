"""End to end with a real Prometheus server: it scrapes a running proxy process and loads
the alert rules from deploy/.

The server is Debian's `prometheus` binary (see tests/support/prometheus.py); where it
cannot be had the tests skip with a loud reason.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.support import prometheus as prometheus_support
from tests.support.configs import upstream_entry
from tests.support.process import ProxyProcess
from tests.support.prometheus import PrometheusServer
from tests.support.token_server import TokenServer
from tests.support.tools import ToolUnavailable
from tests.support.upstream import Upstream
from tests.support.waiting import eventually

pytestmark = pytest.mark.timeout(90)

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "token-proxy-rules.yaml"
JOB = "token-proxy"
REQUESTS = 3


@pytest.fixture(scope="module")
def prometheus_binary() -> Path:
    try:
        return prometheus_support.prometheus_binary()
    except ToolUnavailable as unavailable:
        pytest.skip(
            "!!! Prometheus server unavailable: the end-to-end scrape and the loading of "
            f"deploy/prometheus/token-proxy-rules.yaml were NOT tested: {unavailable}"
        )


@dataclass
class Scraped:
    """A proxy process that handled some traffic, and a Prometheus scraping its admin port."""

    proxy: ProxyProcess
    prometheus: PrometheusServer


@pytest.fixture
async def scraped(
    tmp_path: Path, prometheus_binary: Path, token_server: TokenServer, upstream: Upstream
) -> AsyncIterator[Scraped]:
    proxy_dir = tmp_path / "proxy"
    proxy_dir.mkdir()
    proxy = ProxyProcess(
        proxy_dir,
        {
            "upstreams": {
                "inventory": upstream_entry("inventory.internal", upstream.url, token_server)
            }
        },
    )
    await proxy.start()
    try:
        async with aiohttp.ClientSession() as session:
            for number in range(REQUESTS):
                url = f"http://inventory.internal/api/stock/{number}"
                async with session.get(url, proxy=proxy.url) as response:
                    assert response.status == 200, await response.text()
        assert len(upstream.received) == REQUESTS
        assert all(
            (seen.header("Authorization") or "").startswith("Bearer ") for seen in upstream.received
        )
        prometheus_dir = tmp_path / "prometheus"
        prometheus_dir.mkdir()
        async with PrometheusServer(
            prometheus_dir,
            {JOB: [f"127.0.0.1:{proxy.admin_port}"]},
            rule_files=[RULES],
            scrape_interval="1s",
            binary=prometheus_binary,
        ) as prometheus:
            yield Scraped(proxy, prometheus)
    finally:
        await proxy.stop()


async def poll_query(prometheus: PrometheusServer, expr: str) -> list[dict[str, Any]]:
    """The query's result once it is not empty (the first scrapes may not have happened)."""
    result: list[dict[str, Any]] = []

    async def answered() -> bool:
        nonlocal result
        result = await prometheus.query(expr)
        return bool(result)

    try:
        await eventually(answered, within=20)
    except AssertionError:
        raise AssertionError(
            f"{expr} stayed empty; targets: {await prometheus.targets()}\n{prometheus.logs()}"
        ) from None
    return result


def value(sample: dict[str, Any]) -> float:
    return float(sample["value"][1])


async def test_prometheus_scrapes_the_token_fetch_counter(scraped: Scraped) -> None:
    prometheus = scraped.prometheus
    fetches = await poll_query(
        prometheus, 'token_proxy_token_fetches_total{upstream="inventory",outcome="success"} >= 1'
    )
    assert len(fetches) == 1
    assert value(fetches[0]) >= 1
    assert fetches[0]["metric"]["job"] == JOB
    assert fetches[0]["metric"]["instance"] == f"127.0.0.1:{scraped.proxy.admin_port}"

    # The proxied requests, and failure series that exist at 0 before any failure.
    requests = await poll_query(
        prometheus, f'token_proxy_requests_total{{upstream="inventory",code="200"}} >= {REQUESTS}'
    )
    assert value(requests[0]) == REQUESTS
    failures = await prometheus.query(
        'token_proxy_token_fetch_failures_total{upstream="inventory"}'
    )
    assert {sample["metric"]["reason"] for sample in failures} >= {"timeout", "http_5xx"}
    assert all(value(sample) == 0 for sample in failures)
    expires_in = await prometheus.query(
        'token_proxy_token_expires_in_seconds{upstream="inventory"}'
    )
    assert 0 < value(expires_in[0]) <= 3600


async def test_prometheus_loads_and_evaluates_the_alert_rules(scraped: Scraped) -> None:
    prometheus = scraped.prometheus
    expected = {
        group["name"]: [rule.get("alert", rule.get("record")) for rule in group["rules"]]
        for group in yaml.safe_load(RULES.read_text())["groups"]
    }
    up = await poll_query(prometheus, f'up{{job="{JOB}"}} == 1')
    assert len(up) == 1
    groups: list[dict[str, Any]] = []

    def active(listed: list[dict[str, Any]]) -> list[str]:
        return [r["name"] for g in listed for r in g["rules"] if r["state"] != "inactive"]

    async def evaluated_since_scraped() -> bool:
        nonlocal groups
        groups = await prometheus.rule_groups()
        rules = [rule for group in groups for rule in group["rules"]]
        # Evaluations before the first scrape see no `up` series: SidecarDown is pending
        # then, rightly. A healthy sidecar with a fresh token and only 200s sets off nothing
        # once it is scraped.
        return (
            bool(rules)
            and all(rule["health"] != "unknown" for rule in rules)
            and not active(groups)
        )

    try:
        await eventually(evaluated_since_scraped, within=20)
    except AssertionError:
        raise AssertionError(
            f"rules never all evaluated and inactive: {active(groups)} active in {groups}\n"
            + prometheus.logs()
        ) from None

    assert {group["name"]: [rule["name"] for rule in group["rules"]] for group in groups} == (
        expected
    )
    for group in groups:
        assert group["file"] == str(RULES)
        for rule in group["rules"]:
            assert rule["health"] == "ok", rule
            assert not rule.get("lastError"), rule
