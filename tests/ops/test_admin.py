"""The admin server over real HTTP, fed by real token providers and a real token endpoint."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDictProxy
from prometheus_client import CollectorRegistry, Histogram, Metric, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import proxy
from proxy.config import Address, LimitsConfig, Secret, TokenConfig
from proxy.errors import TOKEN_FETCH_FAILURE_REASONS
from proxy.ops.admin import AdminServer, UpstreamHealth, create_admin_app
from proxy.ops.metrics import REQUEST_BUCKETS, UNMATCHED, Metrics
from proxy.tokens import TokenProvider
from tests.support import tools
from tests.support.token_server import TokenServer

CLIENT_ID = "order-service"
CLIENT_SECRET = "adm1n-s3cret-Qx7"
# What `client_secret_basic` sends: as secret as the secret itself.
BASIC_CREDENTIALS = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()

# The metric table of the product contract: name -> Prometheus type.
CONTRACT_METRICS = {
    "token_proxy_token_fetches_total": "counter",
    "token_proxy_token_fetch_failures_total": "counter",
    "token_proxy_token_fetch_duration_seconds": "histogram",
    "token_proxy_token_expiry_timestamp_seconds": "gauge",
    "token_proxy_requests_total": "counter",
    "token_proxy_request_duration_seconds": "histogram",
    "token_proxy_upstream_unauthorized_retries_total": "counter",
    "token_proxy_token_unavailable_total": "counter",
}

DEADLINE_SECONDS = 10.0


@dataclass
class ProxyState:
    """The HealthSource the application implements, as plain settable state."""

    draining: bool = False
    current: dict[str, UpstreamHealth] = field(default_factory=dict)

    def upstreams(self) -> Mapping[str, UpstreamHealth]:
        return self.current


@dataclass
class Reply:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    def json(self) -> Any:
        def refuse(constant: str) -> None:
            raise AssertionError(f"{constant} is not JSON")

        return json.loads(self.body, parse_constant=refuse)


class Admin:
    """A client for the admin server under test."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str) -> None:
        self.session = session
        self.base_url = base_url

    async def request(self, method: str, path: str, **kwargs: Any) -> Reply:
        async with self.session.request(method, self.base_url + path, **kwargs) as response:
            return Reply(response.status, response.headers, await response.read())

    async def get(self, path: str, **kwargs: Any) -> Reply:
        return await self.request("GET", path, **kwargs)

    async def all_bodies(self) -> dict[str, bytes]:
        return {path: (await self.get(path)).body for path in ("/status", "/readyz", "/metrics")}


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll `check` until it holds, failing after DEADLINE_SECONDS."""
    deadline = time.monotonic() + DEADLINE_SECONDS
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {DEADLINE_SECONDS} s: {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
async def token_endpoint() -> AsyncIterator[TokenServer]:
    async with TokenServer(clients={CLIENT_ID: CLIENT_SECRET}) as server:
        yield server


@pytest.fixture
def refused_url() -> Iterator[str]:
    """A token URL on a bound port nobody listens on: connections are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/oauth/token"


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


@pytest.fixture
def state() -> ProxyState:
    return ProxyState()


MakeProvider = Callable[..., TokenProvider]


@pytest.fixture
async def add_upstream(
    metrics: Metrics, state: ProxyState, token_endpoint: TokenServer
) -> AsyncIterator[MakeProvider]:
    """Add an upstream with a real (not yet started) provider to the proxy state."""
    created: list[TokenProvider] = []

    def add(name: str, *, required: bool = True, token_url: str | None = None) -> TokenProvider:
        metrics.register_upstream(name)
        config = TokenConfig(
            client_id=CLIENT_ID,
            token_url=token_url or token_endpoint.url,
            client_secret=Secret(CLIENT_SECRET),
            timeout=5.0,
            retry_initial=0.05,
            retry_max=0.2,
        )
        provider = TokenProvider(name, config, metrics, allow_insecure_http=True)
        created.append(provider)
        state.current[name] = UpstreamHealth(provider=provider, required=required)
        return provider

    yield add
    for provider in created:
        await provider.close()


@pytest.fixture
async def admin(metrics: Metrics, state: ProxyState) -> AsyncIterator[Admin]:
    server = AdminServer(create_admin_app(metrics, state), Address("127.0.0.1", 0), LimitsConfig())
    await server.start()
    try:
        async with aiohttp.ClientSession() as session:
            yield Admin(session, f"http://127.0.0.1:{server.port}")
    finally:
        await server.close()


async def wait_ready(admin: Admin) -> Reply:
    replies: list[Reply] = []

    async def ready() -> bool:
        replies.append(await admin.get("/readyz"))
        return replies[-1].status == 200

    await eventually(ready, "/readyz answers 200")
    return replies[-1]


async def test_readyz_waits_for_the_first_token_of_a_required_upstream(
    admin: Admin, add_upstream: MakeProvider
) -> None:
    inventory = add_upstream("inventory")

    before = await admin.get("/readyz")
    assert before.status == 503
    assert before.headers["Content-Type"].startswith("application/json")
    assert before.json() == {
        "ready": False,
        "draining": False,
        "waiting_for": ["inventory"],
        "optional_not_ready": [],
    }

    await inventory.start()
    after = await wait_ready(admin)
    assert after.json() == {"ready": True}
    assert inventory.is_valid()


async def test_optional_upstream_never_blocks_readiness(
    admin: Admin, add_upstream: MakeProvider, refused_url: str
) -> None:
    inventory = add_upstream("inventory")
    audit = add_upstream("audit", required=False, token_url=refused_url)

    before = (await admin.get("/readyz")).json()
    assert before["waiting_for"] == ["inventory"]
    assert before["optional_not_ready"] == ["audit"]

    await audit.start()
    await inventory.start()
    after = await wait_ready(admin)
    assert after.json() == {"ready": True, "optional_not_ready": ["audit"]}

    async def audit_failed() -> bool:
        audit_status = (await admin.get("/status")).json()["upstreams"]["audit"]
        return bool(audit_status["consecutive_failures"] >= 2)

    await eventually(audit_failed, "the optional upstream's token fetches fail")
    still = await admin.get("/readyz")
    assert still.status == 200
    assert still.json() == {"ready": True, "optional_not_ready": ["audit"]}


async def test_draining_fails_readiness_but_not_liveness(
    admin: Admin, add_upstream: MakeProvider, state: ProxyState
) -> None:
    await add_upstream("inventory").start()
    await wait_ready(admin)

    state.draining = True
    readyz = await admin.get("/readyz")
    assert readyz.status == 503
    assert readyz.json() == {
        "ready": False,
        "draining": True,
        "waiting_for": [],
        "optional_not_ready": [],
    }
    healthz = await admin.get("/healthz")
    assert healthz.status == 200
    assert healthz.body.strip() == b"ok"
    assert (await admin.get("/status")).json()["draining"] is True


async def test_readyz_follows_the_current_upstream_set(
    admin: Admin, add_upstream: MakeProvider, state: ProxyState
) -> None:
    await add_upstream("inventory").start()
    await wait_ready(admin)

    add_upstream("billing")  # a config reload added it; its first fetch has not started
    reloaded = await admin.get("/readyz")
    assert reloaded.status == 503
    assert reloaded.json()["waiting_for"] == ["billing"]
    assert set((await admin.get("/status")).json()["upstreams"]) == {"inventory", "billing"}

    del state.current["billing"]  # and a second reload removed it again
    assert (await admin.get("/readyz")).status == 200


async def test_status_describes_each_upstream(
    admin: Admin, add_upstream: MakeProvider, token_endpoint: TokenServer, refused_url: str
) -> None:
    started_at = time.time()
    await add_upstream("inventory").start()
    audit = add_upstream("audit", required=False, token_url=refused_url)
    await audit.start()
    await wait_ready(admin)

    async def audit_failed() -> bool:
        return bool((await admin.get("/status")).json()["upstreams"]["audit"]["last_error"])

    await eventually(audit_failed, "the audit upstream records its failure")
    reply = await admin.get("/status")
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("application/json")
    assert reply.headers["Cache-Control"] == "no-store"
    status = reply.json()
    assert status["version"] == proxy.__version__
    assert status["draining"] is False
    assert list(status["upstreams"]) == ["inventory", "audit"]

    inventory = status["upstreams"]["inventory"]
    assert inventory["required"] is True
    assert inventory["state"] == "valid"
    assert isinstance(inventory["expires_in_seconds"], float)
    assert 3000 < inventory["expires_in_seconds"] <= 3600
    assert isinstance(inventory["refresh_in_seconds"], float)
    assert 0 < inventory["refresh_in_seconds"] < inventory["expires_in_seconds"]
    assert isinstance(inventory["last_fetch_time"], float)
    assert started_at <= inventory["last_fetch_time"] <= time.time()
    assert isinstance(inventory["last_fetch_duration_seconds"], float)
    assert 0 <= inventory["last_fetch_duration_seconds"] < DEADLINE_SECONDS
    assert inventory["last_error"] is None
    assert inventory["consecutive_failures"] == 0
    assert inventory["fetches"] == 1
    assert inventory["token_endpoint"] == token_endpoint.url

    failing = status["upstreams"]["audit"]
    assert failing["required"] is False
    assert failing["state"] == "unavailable"
    assert failing["expires_in_seconds"] is None
    assert failing["last_error"]["reason"] == "connect"
    assert isinstance(failing["last_error"]["message"], str)
    assert isinstance(failing["consecutive_failures"], int)
    assert failing["consecutive_failures"] >= 1
    assert failing["fetches"] == 0


async def test_no_token_or_secret_in_any_admin_body(
    admin: Admin, add_upstream: MakeProvider, token_endpoint: TokenServer
) -> None:
    inventory = add_upstream("inventory")
    await inventory.start()
    await wait_ready(admin)
    snapshots = [await admin.all_bodies()]

    # Failures of every kind the endpoint can answer with, then a recovery.
    token_endpoint.set_failing("invalid_client")
    token_endpoint.fail_next("500", "bad_json", "no_token")
    first_token = inventory.current()
    assert first_token is not None
    inventory.invalidate(first_token)

    async def failing() -> bool:
        status = (await admin.get("/status")).json()["upstreams"]["inventory"]
        return bool(status["state"] == "unavailable" and status["consecutive_failures"] >= 4)

    await eventually(failing, "four failed fetches")
    snapshots.append(await admin.all_bodies())
    token_endpoint.set_failing(None)
    await wait_ready(admin)
    snapshots.append(await admin.all_bodies())

    assert len(token_endpoint.issued) == 2
    forbidden = [*token_endpoint.issued, CLIENT_SECRET, BASIC_CREDENTIALS, "tok-broken"]
    for snapshot in snapshots:
        for path, body in snapshot.items():
            text = body.decode()
            for secret in forbidden:
                assert secret not in text, f"{path} exposes {secret!r}"
    # The failures really are on display, so the bodies above were worth searching.
    failed_status = json.loads(snapshots[1]["/status"])["upstreams"]["inventory"]
    assert failed_status["last_error"]["reason"] == "invalid_client"
    failures = samples_by_labels(
        parse_metrics(snapshots[1]["/metrics"]), "token_proxy_token_fetch_failures_total"
    )
    for reason in ("invalid_client", "http_5xx", "invalid_response"):
        assert failures[frozenset({("upstream", "inventory"), ("reason", reason)})] >= 1


def parse_metrics(body: bytes) -> dict[str, Metric]:
    return {family.name: family for family in text_string_to_metric_families(body.decode())}


def samples_by_labels(families: dict[str, Metric], sample_name: str) -> dict[frozenset[Any], float]:
    """Values of the samples called `sample_name`, by their label set."""
    return {
        frozenset(sample.labels.items()): sample.value
        for family in families.values()
        for sample in family.samples
        if sample.name == sample_name
    }


async def test_metrics_hold_every_contract_series_before_any_failure(
    admin: Admin, add_upstream: MakeProvider
) -> None:
    await add_upstream("inventory").start()
    await wait_ready(admin)

    reply = await admin.get("/metrics")
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("text/plain")
    families = parse_metrics(reply.body)
    for name, kind in CONTRACT_METRICS.items():
        family = families.get(name.removesuffix("_total"))
        assert family is not None, f"{name} missing"
        assert family.type == kind, name

    fetches = samples_by_labels(families, "token_proxy_token_fetches_total")
    assert fetches[frozenset({("upstream", "inventory"), ("outcome", "success")})] == 1.0
    assert fetches[frozenset({("upstream", "inventory"), ("outcome", "failure")})] == 0.0
    failures = samples_by_labels(families, "token_proxy_token_fetch_failures_total")
    for reason in TOKEN_FETCH_FAILURE_REASONS:
        assert failures[frozenset({("upstream", "inventory"), ("reason", reason)})] == 0.0
    for name in (
        "token_proxy_upstream_unauthorized_retries_total",
        "token_proxy_token_unavailable_total",
    ):
        assert samples_by_labels(families, name) == {frozenset({("upstream", "inventory")}): 0.0}
    fetch_count = samples_by_labels(families, "token_proxy_token_fetch_duration_seconds_count")
    assert fetch_count == {frozenset({("upstream", "inventory")}): 1.0}
    request_count = samples_by_labels(families, "token_proxy_request_duration_seconds_count")
    assert request_count[frozenset({("upstream", UNMATCHED)})] == 0.0
    assert request_count[frozenset({("upstream", "inventory")})] == 0.0
    expiry = samples_by_labels(families, "token_proxy_token_expiry_timestamp_seconds")
    assert time.time() + 3000 < expiry[frozenset({("upstream", "inventory")})] <= time.time() + 3600


async def test_metrics_carry_no_created_series(admin: Admin, add_upstream: MakeProvider) -> None:
    # prometheus-client's `*_created` series would double every counter's series.
    add_upstream("inventory")
    text = (await admin.get("/metrics")).body.decode()
    assert "token_proxy_token_fetches_total" in text
    assert "_created" not in text


async def test_promtool_accepts_the_metrics(
    admin: Admin, add_upstream: MakeProvider, refused_url: str
) -> None:
    try:
        promtool = tools.promtool()
    except tools.ToolUnavailable as exc:
        pytest.skip(str(exc))
    await add_upstream("inventory").start()
    audit = add_upstream("audit", required=False, token_url=refused_url)
    await audit.start()
    await wait_ready(admin)

    async def audit_failed() -> bool:
        return bool(audit.status()["consecutive_failures"])

    await eventually(audit_failed, "the audit upstream's first fetch fails")
    body = (await admin.get("/metrics")).body
    failures = samples_by_labels(parse_metrics(body), "token_proxy_token_fetch_failures_total")
    assert failures[frozenset({("upstream", "audit"), ("reason", "connect")})] >= 1

    check = await asyncio.create_subprocess_exec(
        str(promtool),
        "check",
        "metrics",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await check.communicate(body)
    assert check.returncode == 0, output.decode()


async def test_metrics_negotiate_compression_and_openmetrics(admin: Admin) -> None:
    gzipped = await admin.get("/metrics", headers={"Accept-Encoding": "gzip"})
    assert gzipped.status == 200
    assert gzipped.headers["Content-Encoding"] == "gzip"
    assert b"token_proxy_token_fetches_total" in gzipped.body  # the client decompressed it

    openmetrics = await admin.get(
        "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert openmetrics.headers["Content-Type"].startswith("application/openmetrics-text")
    assert openmetrics.body.endswith(b"# EOF\n")


async def test_only_get_and_head_on_known_paths(admin: Admin) -> None:
    assert (await admin.get("/healthz")).body == b"ok\n"
    head = await admin.request("HEAD", "/healthz")
    assert head.status == 200
    assert head.body == b""
    assert (await admin.request("HEAD", "/metrics")).status == 200
    assert (await admin.request("POST", "/readyz")).status == 405
    assert (await admin.request("DELETE", "/status")).status == 405
    assert (await admin.get("/")).status == 404
    assert (await admin.get("/metrics/extra")).status == 404


@pytest.fixture
def aiohttp_access_records() -> Iterator[list[logging.LogRecord]]:
    """Records reaching aiohttp's access logger, enabled at INFO for the test."""
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    access = logging.getLogger("aiohttp.access")
    handler, saved_level = Collect(), access.level
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    yield records
    access.removeHandler(handler)
    access.setLevel(saved_level)


async def test_admin_requests_are_not_access_logged(
    aiohttp_access_records: list[logging.LogRecord], admin: Admin
) -> None:
    for path in ("/healthz", "/readyz", "/metrics", "/status", "/missing"):
        await admin.get(path)
    assert aiohttp_access_records == []


def test_request_durations_fall_in_the_buckets_prometheus_client_would_use() -> None:
    # RequestStats keeps its own bucket counts on the hot path; prometheus-client's
    # Histogram with the same bounds is the reference for where each duration belongs
    # (`le` is inclusive, beyond the last bound is +Inf).
    durations = [0.0, 0.001, 0.0011, 0.0025, 0.7, 29.999, 30.0, 30.001, 1e9]
    ours = Metrics()
    reference_registry = CollectorRegistry()
    reference = Histogram(
        "token_proxy_request_duration_seconds",
        "",
        ["upstream"],
        buckets=REQUEST_BUCKETS,
        registry=reference_registry,
    )
    for seconds in durations:
        ours.observe_request("inventory", 200, seconds)
        reference.labels(upstream="inventory").observe(seconds)

    def buckets(registry: CollectorRegistry) -> dict[str, float]:
        text = generate_latest(registry).decode()
        return {
            sample.labels["le"]: sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "token_proxy_request_duration_seconds_bucket"
            and sample.labels.get("upstream") == "inventory"
        }

    expected = buckets(reference_registry)
    assert len(expected) == len(REQUEST_BUCKETS) + 1
    assert buckets(ours.registry) == expected
