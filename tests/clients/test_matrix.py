"""Every client in the catalogue against every scenario it supports, for real.

Each test gives one scenario to a real client (its own process, configured through
the environment or its usual proxy options) and then checks what the servers saw: the
token on requests to the configured host (and none on the tunnel), bodies by size and
SHA-256, the proxy's tunnel counters for how the request reached it, and for streams
that the client had the first part before the server sent the rest.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

import pytest

from tests.clients import matrix
from tests.clients.catalogue import BY_NAME, CLIENTS, CONNECT, SCENARIOS, cases
from tests.clients.lab import API_HOST, FIRST_PART, GATED_BODY_SHA256, OUTSIDE_HOST, REST, Lab
from tests.clients.runners import Runner
from tests.support.clients import INSTALL_TIMEOUT_SECONDS
from tests.support.upstream import Received

# The first test of a client may install it (apt-get, npm) before it runs.
pytestmark = pytest.mark.timeout(INSTALL_TIMEOUT_SECONDS + 120)


def _params() -> list[Any]:
    params = []
    for client, scenario in cases():
        defect = BY_NAME[client].defects.get(scenario)
        marks = [pytest.mark.xfail(strict=True, reason=defect)] if defect else []
        params.append(pytest.param(client, scenario, id=f"{client}-{scenario}", marks=marks))
    return params


def scenario_spec(lab: Lab, client: str, scenario: str) -> dict[str, Any]:
    tag = f"{client}-{scenario}"
    spec: dict[str, Any] = {"scenario": scenario}
    if scenario == "plain":
        spec["url"] = f"http://{API_HOST}/api/{tag}?q=1"
    elif scenario == "upload":
        spec["url"] = f"http://{API_HOST}/upload?client={tag}"
        spec["file"] = str(lab.upload_file)
    elif scenario == "tunnel":
        spec["url"] = f"https://{OUTSIDE_HOST}:{lab.outside.port}/api/{tag}"
        if client == "go":
            # ProxyFromEnvironment never proxies localhost: Transport.Proxy = http.ProxyURL.
            spec["proxy"] = lab.proxy_url
    elif scenario == "intercept":
        spec["url"] = f"https://{API_HOST}/api/{tag}"
    elif scenario == "stream":
        spec["url"] = f"http://{API_HOST}/gated/{tag}"
    elif scenario == "websocket":
        spec["url"] = f"ws://{API_HOST}/ws?client={tag}"
    elif scenario == "websocket_tls":
        spec["url"] = f"wss://{API_HOST}/ws?client={tag}"
    return spec


def seen(records: list[Received], path: str) -> list[Received]:
    return [record for record in records if record.path == path]


class Counters:
    """The proxy's tunnel counters before a scenario, to compare with after it."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.before = self.now()

    def now(self) -> dict[str, float]:
        return {
            "plain_http": self.lab.tunnels("inventory", "plain_http"),
            "intercepted": self.lab.tunnels("inventory", "intercepted"),
            "opened": self.lab.tunnels("unmatched", "opened"),
        }

    def delta(self, name: str) -> float:
        return self.now()[name] - self.before[name]


@pytest.mark.parametrize(("client", "scenario"), _params())
def test_client(client: str, scenario: str, lab: Lab, runners: Callable[[str], Runner]) -> None:
    runner = runners(client)
    spec = scenario_spec(lab, client, scenario)
    counters = Counters(lab)
    gate = spec["url"].rsplit("/", 1)[1] if scenario == "stream" else None

    def release() -> None:
        assert gate is not None
        lab.release(lab.api, gate)

    result = runner.run(spec, on_first=release if gate else None)
    if gate is not None:
        assert lab.api.gate_outcomes.get(gate) == "released", (
            f"{client} did not hand over the first part before the rest was sent: {result}"
        )
    assert "error" not in result, f"{client} failed: {result['error']}"
    tokens = lab.tokens()
    assert tokens, "the token endpoint issued no token"
    token = f"Bearer {tokens[-1]}"
    url_path = "/" + spec["url"].split("/", 3)[3]
    route = BY_NAME[client].route(scenario)

    if scenario in ("plain", "intercept"):
        assert result["status"] == 200, result
        assert json.loads(result["body"])["path"] == url_path
        (record,) = seen(lab.api.received, url_path)
        assert record.all("Authorization") == [token]
    elif scenario == "upload":
        assert result["status"] == 200, result
        body = json.loads(result["body"])
        assert body == {"size": len(lab.upload), "sha256": hashlib.sha256(lab.upload).hexdigest()}
        (record,) = seen(lab.api.received, url_path)
        assert record.all("Authorization") == [token]
        assert record.body_size == len(lab.upload)
    elif scenario == "tunnel":
        assert result["status"] == 200, result
        assert json.loads(result["body"])["path"] == url_path
        (record,) = seen(lab.outside.received, url_path)
        assert record.all("Authorization") == []
        # The request as the client wrote it, inside TLS the proxy cannot read.
        assert record.all("Host") == [f"{OUTSIDE_HOST}:{lab.outside.port}"]
        assert counters.delta("opened") >= 1
        assert seen(lab.api.received, url_path) == []
    elif scenario == "stream":
        assert result["status"] == 200, result
        assert result["size"] == len(FIRST_PART) + len(REST)
        assert result["sha256"] == GATED_BODY_SHA256
        (record,) = seen(lab.api.received, url_path)
        assert record.all("Authorization") == [token]
    else:  # websocket, websocket_tls
        assert json.loads(result["greeting"]) == {"authorization": token}
        assert result["echo"] == "echo:hello"
        (record,) = seen(lab.api.received, url_path)
        assert record.all("Authorization") == [token]

    if scenario in ("intercept", "websocket_tls"):
        assert counters.delta("intercepted") >= 1, "the request did not come through interception"
    elif scenario != "tunnel":
        tunnelled = counters.delta("plain_http")
        if route == CONNECT:
            assert tunnelled >= 1, "expected plain HTTP inside a CONNECT tunnel"
        else:
            assert tunnelled == 0, "expected an absolute-form request, not a CONNECT tunnel"


# ---------------------------------------------------------------------------
# The README's table
# ---------------------------------------------------------------------------


def test_readme_table_is_the_rendering_of_the_committed_results() -> None:
    readme = matrix.README.read_text()
    assert matrix.readme_section(readme) == matrix.render(matrix.load_results()), (
        "run `python -m tests.clients.matrix` to re-render the README's client matrix"
    )


def test_committed_results_claim_only_tests_that_exist() -> None:
    results = matrix.load_results()
    existing = set(cases())
    for client, cells in results.items():
        assert client in BY_NAME, f"results.json names an unknown client {client}"
        for scenario, outcome in cells.items():
            assert (client, scenario) in existing, f"no test for {client} x {scenario}"
            assert outcome in (matrix.PASS, matrix.DEFECT), (client, scenario, outcome)
            if outcome == matrix.DEFECT:
                assert scenario in BY_NAME[client].defects, (client, scenario)
    assert set(SCENARIOS) >= {s for c in CLIENTS for s in c.scenarios}


def test_this_run_agrees_with_the_committed_results() -> None:
    """Each matrix test that ran in this session has the outcome the README shows."""
    results = matrix.load_results()
    ran = {key: outcome for key, outcome in matrix.OUTCOMES.items() if outcome != matrix.SKIPPED}
    if not ran:
        pytest.skip("no client matrix test ran in this session")
    differing = {
        f"{client}-{scenario}": (outcome, results.get(client, {}).get(scenario, "missing"))
        for (client, scenario), outcome in ran.items()
        if results.get(client, {}).get(scenario) != outcome
    }
    assert not differing, (
        f"outcomes (this run, README): {differing}; if the change is right, run "
        "`python -m tests.clients.matrix --update`"
    )
