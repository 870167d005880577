"""TokenProvider against a real token server: caching, single flight, refresh, backoff."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import random
import ssl
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trustme

from proxy.config import Secret, TlsClientConfig, TokenConfig
from proxy.errors import TOKEN_FETCH_FAILURE_REASONS, TokenUnavailable
from proxy.ops.metrics import Metrics
from proxy.tokens import TokenProvider
from proxy.tokens import provider as provider_module
from tests.support.token_server import OMIT, Failure, TokenServer

UPSTREAM = "inventory"
CLIENT_ID = "order-service"
SECRET = "s3cret-VALUE-41d7"


class FixedRandom(random.Random):
    """Jitter pinned to one point of its range: 0.0 the low end, 1.0 the high end."""

    def __init__(self, fraction: float) -> None:
        super().__init__(0)
        self.fraction = fraction

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self.fraction


class ShiftableClock:
    """The monotonic clock, plus an offset a test can move forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


class StillClock:
    """A monotonic clock that moves only when the test moves it."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class SteppableWallClock:
    """The wall clock, plus an offset a test can step (as NTP or an operator would)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def step(self, seconds: float) -> None:
        self.offset += seconds


@pytest.fixture
def short_lifetimes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tokens of a second or two, to see refreshes within a test: below the real floor."""
    monkeypatch.setattr(provider_module, "MIN_LIFETIME", 0.5)


@pytest.fixture
async def server() -> AsyncIterator[TokenServer]:
    async with TokenServer(clients={CLIENT_ID: SECRET}) as ts:
        yield ts


@pytest.fixture
def metrics() -> Metrics:
    m = Metrics()
    m.register_upstream(UPSTREAM)
    return m


@pytest.fixture
async def providers() -> AsyncIterator[list[TokenProvider]]:
    created: list[TokenProvider] = []
    yield created
    for provider in created:
        await provider.close()


@pytest.fixture
def make_provider(
    server: TokenServer, metrics: Metrics, providers: list[TokenProvider]
) -> Callable[..., TokenProvider]:
    def make(
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        invalidate_interval: float = 5.0,
        **overrides: Any,
    ) -> TokenProvider:
        settings: dict[str, Any] = {
            "client_id": CLIENT_ID,
            "token_url": server.url,
            "client_secret": Secret(SECRET),
            "timeout": 5.0,
        }
        settings.update(overrides)
        provider = TokenProvider(
            UPSTREAM,
            TokenConfig(**settings),
            metrics,
            clock=clock,
            wall_clock=wall_clock,
            rng=rng,
            invalidate_interval=invalidate_interval,
        )
        providers.append(provider)
        return provider

    return make


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, {"upstream": UPSTREAM, **labels})
    assert value is not None, f"no sample {name} {labels}"
    return value


def fetches(metrics: Metrics, outcome: str) -> float:
    return sample(metrics, "token_proxy_token_fetches_total", outcome=outcome)


def failures(metrics: Metrics, reason: str) -> float:
    return sample(metrics, "token_proxy_token_fetch_failures_total", reason=reason)


async def eventually(predicate: Callable[[], bool], within: float = 5.0) -> None:
    """Poll `predicate` until it holds, failing after `within` seconds."""
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def assert_no_secrets_logged(caplog: pytest.LogCaptureFixture, server: TokenServer) -> None:
    for record in caplog.records:
        rendered = record.getMessage() + " " + repr(record.__dict__)
        assert SECRET not in rendered
        for token in server.issued:
            assert token not in rendered
        assert "tok-" not in rendered


# -- the happy path ------------------------------------------------------------------


async def test_start_fetches_a_token_and_reports_it(
    server: TokenServer, metrics: Metrics, make_provider: Callable[..., TokenProvider]
) -> None:
    # A clock that stands still: the times reported are exact.
    provider = make_provider(clock=lambda: 1_000.0, rng=FixedRandom(1.0))
    await provider.start()
    token = await provider.get()

    assert token == server.issued[0]
    assert server.is_valid(token)
    assert provider.current() == token
    assert provider.is_valid()
    assert fetches(metrics, "success") == 1
    assert fetches(metrics, "failure") == 0
    assert sample(metrics, "token_proxy_token_expires_in_seconds") == 3600
    expiry = sample(metrics, "token_proxy_token_expiry_timestamp_seconds")
    assert abs(expiry - (time.time() + 3600)) < 5
    assert sample(metrics, "token_proxy_token_fetch_duration_seconds_count") == 1

    status = provider.status()
    assert status["state"] == "valid"
    assert status["fetches"] == 1
    assert status["consecutive_failures"] == 0
    assert status["last_error"] is None
    assert status["token_endpoint"] == server.url
    assert isinstance(status["last_fetch_time"], float)
    # 3600 s token: renewed 300 s before expiry, and 5 % of that earlier (the top jitter).
    assert status["refresh_in_seconds"] == 3600 - 315
    rendered = json.dumps(status)
    assert token not in rendered
    assert SECRET not in rendered


@pytest.mark.parametrize(
    ("lifetime", "refresh_before_expiry", "margin"),
    [
        (3600, None, 300.0),  # min(300 s, 20 %) -> renewed at 55 min
        (60, None, 12.0),  # 20 % -> renewed at 48 s
        (3600, 10.0, 10.0),  # configured
        (60, 100.0, 30.0),  # configured, but never more than half the lifetime
    ],
)
@pytest.mark.parametrize("jitter", [0.0, 1.0])
async def test_refresh_is_scheduled_margin_and_jitter_before_expiry(
    server: TokenServer,
    make_provider: Callable[..., TokenProvider],
    lifetime: float,
    refresh_before_expiry: float | None,
    margin: float,
    jitter: float,
) -> None:
    server.expires_in = lifetime
    # A clock that stands still: no time passes between the fetch and the reading.
    provider = make_provider(
        clock=lambda: 1_000.0,
        rng=FixedRandom(jitter),
        refresh_before_expiry=refresh_before_expiry,
    )
    await provider.get()
    expected = lifetime - margin - jitter * 0.05 * margin
    refresh_in = provider.status()["refresh_in_seconds"]
    assert isinstance(refresh_in, float)
    assert refresh_in == pytest.approx(expected)


@pytest.mark.parametrize("started", [False, True])
async def test_500_concurrent_gets_on_a_cold_start_make_one_request(
    server: TokenServer, make_provider: Callable[..., TokenProvider], started: bool
) -> None:
    server.hold = asyncio.Event()
    provider = make_provider()
    if started:
        await provider.start()
    callers = [asyncio.create_task(provider.get()) for _ in range(500)]
    await server.wait_for_requests(1)
    assert not any(caller.done() for caller in callers)
    server.hold.set()
    tokens = await asyncio.gather(*callers)

    assert set(tokens) == {server.issued[0]}
    assert len(server.requests) == 1


async def test_cancelled_callers_do_not_cancel_the_shared_fetch(
    server: TokenServer, make_provider: Callable[..., TokenProvider]
) -> None:
    server.hold = asyncio.Event()
    provider = make_provider()
    impatient = asyncio.create_task(provider.get())
    await server.wait_for_requests(1)
    impatient.cancel()
    patient = asyncio.create_task(provider.get())
    server.hold.set()
    assert await patient == server.issued[0]
    assert len(server.requests) == 1


# -- proactive refresh ----------------------------------------------------------------


@pytest.mark.usefixtures("short_lifetimes")
async def test_refresh_happens_before_expiry_without_blocking_requests(
    server: TokenServer, make_provider: Callable[..., TokenProvider]
) -> None:
    server.expires_in = 2
    # Renewed 1 s before expiry (at most 5 % of that earlier, as jitter): a second of
    # slack, so a stall of the machine does not look like a late refresh.
    provider = make_provider(refresh_before_expiry=1.0)
    await provider.start()
    first = await provider.get()
    server.hold = asyncio.Event()

    await server.wait_for_requests(2)  # the proactive refresh
    # While the refresh is in flight, requests get the cached token at once.
    assert await asyncio.wait_for(provider.get(), 5) == first
    server.hold.set()
    await server.wait_for_issued(2)
    await eventually(lambda: provider.current() == server.issued[1])

    # Times as the token endpoint saw them: the refresh came about 1 s after the first
    # request (0.2 s at least, should the first have reached it late), and before the
    # first token expired.
    fetched, refreshed = (request.received_at for request in server.requests[:2])
    assert refreshed - fetched >= 0.2
    assert refreshed < server.expiry(first)
    assert server.fetch_count == 2


async def test_a_late_refresh_is_started_by_the_next_request(
    server: TokenServer, make_provider: Callable[..., TokenProvider]
) -> None:
    clock = ShiftableClock()
    provider = make_provider(clock=clock, rng=FixedRandom(0.0))
    first = await provider.get()  # not started: no background task renews the token

    clock.advance(3301)  # past the refresh time
    assert await provider.get() == first  # still valid: served at once, renewal started
    await server.wait_for_issued(2)
    await server.wait_for_issued(2)
    await eventually(lambda: provider.current() == server.issued[1])

    clock.advance(3601)  # past the second token's expiry: never handed out
    server.hold = asyncio.Event()
    assert provider.current() is None
    waiting = asyncio.create_task(provider.get())
    await server.wait_for_requests(3)
    server.hold.set()
    assert await waiting == server.issued[2]


@pytest.mark.usefixtures("short_lifetimes")
async def test_steady_traffic_across_several_refreshes_never_fails(
    server: TokenServer, metrics: Metrics, make_provider: Callable[..., TokenProvider]
) -> None:
    server.expires_in = 2
    # Renewed 1 s before expiry, no jitter: every 1 s, with 0.9 s of use left at each.
    provider = make_provider(refresh_before_expiry=1.0, rng=FixedRandom(0.0))
    # Traffic ends 0.5 s after the fourth refresh is due and 0.5 s before the fifth.
    deadline = time.monotonic() + 4.5
    await provider.start()
    await provider.get()
    served = 0
    gaps = 0

    async def worker() -> None:
        nonlocal served, gaps
        while time.monotonic() < deadline:
            if provider.current() is None:
                gaps += 1
            token = await provider.get()
            assert server.is_valid(token)
            served += 1
            await asyncio.sleep(0.005)  # traffic pacing, not synchronisation

    await asyncio.gather(*(worker() for _ in range(20)))

    assert gaps == 0
    assert served > 1000
    assert fetches(metrics, "failure") == 0
    assert 1 + 3 <= server.fetch_count <= 1 + 4
    assert fetches(metrics, "success") == server.fetch_count
    assert len(server.requests) == server.fetch_count


# -- failures, backoff, recovery -----------------------------------------------------


@pytest.mark.parametrize(
    ("jitter", "expected_intervals"),
    [
        (1.0, [0.2, 0.4, 0.8, 0.8]),  # top of the range: doubling, capped at retry_max
        (0.0, [0.1, 0.1, 0.1, 0.1]),  # bottom of the range: the 0.1 s floor
    ],
)
async def test_failed_fetches_back_off_exponentially_with_jitter(
    server: TokenServer,
    metrics: Metrics,
    make_provider: Callable[..., TokenProvider],
    caplog: pytest.LogCaptureFixture,
    jitter: float,
    expected_intervals: list[float],
) -> None:
    caplog.set_level(logging.INFO, logger="token_proxy")
    server.set_failing("500")
    provider = make_provider(retry_initial=0.2, retry_max=0.8, rng=FixedRandom(jitter))
    await provider.start()
    arrivals = []
    for n in range(1, 6):
        await server.wait_for_requests(n)
        arrivals.append(time.monotonic())
    intervals = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    await eventually(lambda: failures(metrics, "http_5xx") >= 5)

    # The delays the provider scheduled, exactly; the attempts came no earlier than
    # scheduled, and not much later in all (a stalled machine makes some later).
    scheduled = [r.__dict__["retry_in"] for r in caplog.records if hasattr(r, "retry_in")]
    assert scheduled[:4] == expected_intervals
    for got, expected in zip(intervals, expected_intervals, strict=True):
        assert got >= expected - 0.03, intervals
    assert sum(intervals) <= sum(expected_intervals) + 1.0, intervals
    assert fetches(metrics, "success") == 0
    status = provider.status()
    assert status["state"] == "unavailable"
    assert status["consecutive_failures"] >= 5  # type: ignore[operator]
    assert status["last_error"] == {
        "reason": "http_5xx",
        "message": "token endpoint answered HTTP 500 (server_error)",
        "time": status["last_fetch_time"],
    }


async def test_retry_after_is_honoured(
    server: TokenServer, make_provider: Callable[..., TokenProvider]
) -> None:
    server.fail_next(Failure(status=503, body=b"", headers={"Retry-After": "1"}))
    provider = make_provider(retry_initial=0.05, retry_max=0.1)
    await provider.start()
    await server.wait_for_requests(1)
    failed_at = time.monotonic()
    await server.wait_for_issued(1)
    assert time.monotonic() - failed_at >= 0.95
    assert await provider.get() == server.issued[0]


async def test_a_huge_retry_after_is_capped_at_ten_minutes(
    server: TokenServer, make_provider: Callable[..., TokenProvider]
) -> None:
    server.fail_next(Failure(status=429, body=b"", headers={"Retry-After": "100000"}))
    provider = make_provider(retry_initial=0.05, retry_max=0.1)
    with pytest.raises(TokenUnavailable) as caught:
        await provider.get()
    assert 590 <= caught.value.retry_after <= 600
    assert 590 <= provider.status()["refresh_in_seconds"] <= 600  # type: ignore[operator]


@pytest.mark.usefixtures("short_lifetimes")
async def test_outage_serves_the_valid_token_then_refuses_then_recovers(
    server: TokenServer,
    metrics: Metrics,
    make_provider: Callable[..., TokenProvider],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    # The provider's time moves only when the test moves it (the background task's
    # sleeps are real): no stall of the machine can end the token's life early.
    clock = StillClock()
    server.expires_in = 1.5  # renewed at 1.185 s, unusable from 1.425 s
    provider = make_provider(clock=clock, retry_initial=30.0, retry_max=60.0, rng=FixedRandom(1.0))
    await provider.start()
    first = await provider.get()
    server.set_failing("500")

    clock.advance(1.2)  # the refresh is due; 0.225 s of use left: too little to fit a retry
    await server.wait_for_requests(2)  # the proactive refresh fails
    assert await provider.get() == first  # the cached token is still valid: served
    await eventually(lambda: provider.status()["consecutive_failures"] == 1)
    assert provider.status()["state"] == "valid_retrying"

    clock.advance(0.25)  # past the token's usable life, long before the next attempt
    assert provider.current() is None
    results = await asyncio.gather(*(provider.get() for _ in range(100)), return_exceptions=True)
    assert all(isinstance(result, TokenUnavailable) for result in results)
    unavailable = results[0]
    assert isinstance(unavailable, TokenUnavailable)
    assert unavailable.upstream == UPSTREAM
    # The next attempt of the backoff schedule: 30 s after the failure, 0.25 s ago.
    assert unavailable.retry_after == pytest.approx(30 - 0.25)
    assert "http_5xx" in unavailable.detail
    assert len(server.requests) == 2  # requests caused no fetch outside the schedule
    assert provider.status()["state"] == "unavailable"
    assert sample(metrics, "token_proxy_token_expires_in_seconds") == 0
    assert sample(metrics, "token_proxy_token_expiry_timestamp_seconds") == 0

    server.set_failing(None)
    clock.advance(31)  # the backoff has passed: the next request may fetch
    second = await provider.get()
    assert second == server.issued[1]
    assert provider.status()["state"] == "valid"
    assert provider.status()["consecutive_failures"] == 0
    assert fetches(metrics, "success") == 2
    assert failures(metrics, "http_5xx") == 1
    assert_no_secrets_logged(caplog, server)


@pytest.mark.parametrize(
    ("failure", "reason"),
    [
        ("500", "http_5xx"),
        ("429", "http_4xx"),
        ("invalid_client", "invalid_client"),
        ("bad_type", "invalid_response"),
        ("bad_json", "invalid_response"),
        ("drop", "connect"),
        ("hang", "timeout"),
    ],
)
async def test_each_failure_is_counted_logged_and_explained(
    server: TokenServer,
    metrics: Metrics,
    make_provider: Callable[..., TokenProvider],
    caplog: pytest.LogCaptureFixture,
    failure: str,
    reason: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    server.fail_next(failure)
    provider = make_provider(timeout=0.5, retry_initial=30.0, rng=FixedRandom(1.0))
    with pytest.raises(TokenUnavailable) as caught:
        await provider.get()
    await eventually(lambda: fetches(metrics, "failure") == 1)

    assert caught.value.upstream == UPSTREAM
    assert caught.value.retry_after > 0
    assert failures(metrics, reason) == 1
    for other in TOKEN_FETCH_FAILURE_REASONS:
        if other != reason:
            assert failures(metrics, other) == 0
    assert fetches(metrics, "success") == 0
    assert sample(metrics, "token_proxy_token_fetch_duration_seconds_count") == 1
    [record] = [r for r in caplog.records if getattr(r, "outcome", None) == "failure"]
    assert record.name.startswith("token_proxy.")
    assert record.levelno == logging.ERROR  # no valid token to fall back on
    assert record.__dict__["upstream"] == UPSTREAM
    assert record.__dict__["reason"] == reason
    assert record.__dict__["consecutive_failures"] == 1
    assert 29 <= record.__dict__["retry_in"] <= 30
    assert record.__dict__["duration_ms"] >= 0
    assert record.__dict__["error"] in record.getMessage()
    assert_no_secrets_logged(caplog, server)
    assert SECRET not in json.dumps(provider.status())


@pytest.mark.usefixtures("short_lifetimes")
async def test_no_secret_or_token_is_logged_on_the_success_paths(
    server: TokenServer,
    make_provider: Callable[..., TokenProvider],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    server.expires_in = 1
    provider = make_provider(invalidate_interval=0.0)
    await provider.start()
    first = await provider.get()
    await server.wait_for_issued(2)  # a proactive refresh
    await server.wait_for_issued(2)
    await eventually(lambda: provider.current() == server.issued[1])
    second = await provider.get()
    provider.invalidate(second)
    await server.wait_for_issued(3)
    assert first != second
    assert any(getattr(r, "outcome", None) == "success" for r in caplog.records)
    assert_no_secrets_logged(caplog, server)


# -- invalidation --------------------------------------------------------------------


async def test_100_concurrent_invalidations_cause_one_fetch(
    server: TokenServer, make_provider: Callable[..., TokenProvider]
) -> None:
    provider = make_provider()
    await provider.start()
    first = await provider.get()

    async def upstream_said_401() -> None:
        provider.invalidate(first)

    await asyncio.gather(*(upstream_said_401() for _ in range(100)))
    assert provider.current() is None  # never again the rejected token
    second = await provider.get()
    assert second == server.issued[1]
    assert server.fetch_count == 2

    provider.invalidate(first)  # stale: nothing happens
    provider.invalidate(second)  # the new one rejected at once: kept, no fetch storm
    assert provider.current() == second
    assert len(server.requests) == 2


async def test_invalidation_after_the_interval_fetches_again(
    server: TokenServer, make_provider: Callable[..., TokenProvider]
) -> None:
    provider = make_provider(invalidate_interval=0.0)
    first = await provider.get()
    provider.invalidate(first)
    second = await provider.get()
    provider.invalidate(second)
    third = await provider.get()
    assert [first, second, third] == server.issued


async def test_invalidation_during_backoff_waits_for_the_schedule(
    server: TokenServer, make_provider: Callable[..., TokenProvider]
) -> None:
    clock = ShiftableClock()
    provider = make_provider(clock=clock, retry_initial=30.0, rng=FixedRandom(1.0))
    first = await provider.get()  # not started: requests drive the schedule here
    server.set_failing("500")
    clock.advance(3400)  # past the refresh time: the next request starts the refresh
    assert await provider.get() == first
    await eventually(lambda: provider.status()["consecutive_failures"] == 1)

    provider.invalidate(first)
    with pytest.raises(TokenUnavailable) as caught:
        await provider.get()
    assert caught.value.retry_after > 25
    assert len(server.requests) == 2


# -- discovery, TLS, cookies ---------------------------------------------------------


async def test_issuer_is_discovered_at_start_and_after_a_failure(
    server: TokenServer, make_provider: Callable[..., TokenProvider]
) -> None:
    server.fail_next("500")
    provider = make_provider(token_url=None, issuer=server.issuer, retry_initial=0.05)
    await provider.start()
    await server.wait_for_issued(1)
    await eventually(provider.is_valid)
    assert server.discovery_requests == ["/.well-known/openid-configuration"] * 2
    assert provider.status()["token_endpoint"] == server.url


async def test_a_failed_discovery_is_a_classified_failure(
    server: TokenServer, metrics: Metrics, make_provider: Callable[..., TokenProvider]
) -> None:
    server.discovery = set()
    provider = make_provider(token_url=None, issuer=server.issuer, retry_initial=0.05)
    with pytest.raises(TokenUnavailable, match="404"):
        await provider.get()
    assert failures(metrics, "http_4xx") == 1
    assert server.requests == []

    server.discovery = {"oauth"}
    await provider.start()
    await eventually(provider.is_valid)
    assert server.requests[0].outcome == "issued"


async def test_token_endpoint_over_tls_with_a_private_ca(
    metrics: Metrics, providers: list[TokenProvider], tmp_path: Path
) -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    async with TokenServer(clients={CLIENT_ID: SECRET}, ssl_context=server_context) as ts:
        config = TokenConfig(
            client_id=CLIENT_ID,
            token_url=ts.url,
            client_secret=Secret(SECRET),
            tls=TlsClientConfig(ca_file=ca_file),
        )
        provider = TokenProvider(UPSTREAM, config, metrics)
        providers.append(provider)
        assert ts.is_valid(await provider.get())
        await provider.close()


async def test_cookies_are_never_sent_back(
    server: TokenServer, make_provider: Callable[..., TokenProvider]
) -> None:
    server.fail_next(
        Failure(
            name="cookie",
            status=200,
            body={"access_token": "cookie-token", "token_type": "Bearer", "expires_in": 3600},
            headers={"Set-Cookie": "session=abc; Path=/"},
        )
    )
    provider = make_provider(invalidate_interval=0.0)
    first = await provider.get()
    assert first == "cookie-token"
    provider.invalidate(first)
    await server.wait_for_issued(1)
    assert "Cookie" not in server.requests[1].headers


# -- shutdown ------------------------------------------------------------------------


async def test_close_stops_an_inflight_fetch_and_its_waiters_cleanly(
    server: TokenServer,
    make_provider: Callable[..., TokenProvider],
    caplog: pytest.LogCaptureFixture,
) -> None:
    server.hold = asyncio.Event()
    provider = make_provider()
    await provider.start()
    waiter = asyncio.create_task(provider.get())
    await server.wait_for_requests(1)

    await provider.close()
    with pytest.raises(TokenUnavailable, match="closed"):
        await waiter
    with pytest.raises(TokenUnavailable, match="closed"):
        await provider.get()
    assert provider.status()["state"] == "closed"
    assert provider.current() is None
    assert not [r for r in caplog.records if r.name == "asyncio"]


async def test_the_token_held_for_requests_is_dropped_when_the_provider_closes(
    make_provider: Callable[..., TokenProvider],
) -> None:
    provider = make_provider()
    await provider.start()
    token = await provider.get()
    assert provider.held.current() == token  # what the request path reads
    await provider.close()
    assert provider.held.current() is None
    assert provider.current() is None


async def test_an_unstarted_provider_closes(make_provider: Callable[..., TokenProvider]) -> None:
    provider = make_provider()
    await provider.close()
    assert provider.status()["state"] == "closed"


# -- lifetimes and clocks --------------------------------------------------------------


async def test_a_lifetime_below_the_floor_is_raised_counted_and_logged_once_per_change(
    server: TokenServer,
    metrics: Metrics,
    make_provider: Callable[..., TokenProvider],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="token_proxy")
    floor = provider_module.MIN_LIFETIME
    server.expires_in = 0.001
    # The provider's time moves only as the test's traffic moves it, so the times it
    # reports are exact.
    clock = StillClock()
    # A configured margin far beyond the lifetime: clamped to half the floored lifetime.
    provider = make_provider(
        clock=clock, refresh_before_expiry=300.0, rng=FixedRandom(1.0), invalidate_interval=0.0
    )
    await provider.start()
    for _ in range(40):
        await provider.get()  # never TokenUnavailable
        clock.advance(0.005)  # longer than a token of 0.001 s lives
        await asyncio.sleep(0.005)  # traffic pacing, not synchronisation

    assert server.fetch_count == 1
    status = provider.status()
    assert status["expires_in_seconds"] == pytest.approx(floor - 0.2)
    margin = floor / 2
    assert status["refresh_in_seconds"] == pytest.approx(floor - margin * 1.05 - 0.2)
    assert sample(metrics, "token_proxy_token_lifetime_clamped_total") == 1

    def clamp_logs() -> list[logging.LogRecord]:
        return [r for r in caplog.records if getattr(r, "event", None) == "token_lifetime_clamped"]

    # Every short token is counted; the log says it once, and once more when it ends.
    provider.invalidate(server.issued[0])
    await server.wait_for_issued(2)
    await eventually(lambda: provider.current() == server.issued[1])
    provider.invalidate(server.issued[1])
    await server.wait_for_issued(3)
    await eventually(lambda: provider.current() == server.issued[2])
    await eventually(lambda: sample(metrics, "token_proxy_token_lifetime_clamped_total") == 3)
    [warning] = clamp_logs()
    assert warning.levelno == logging.WARNING
    assert warning.__dict__["declared_lifetime"] == 0.001

    server.expires_in = 3600
    provider.invalidate(server.issued[2])
    await server.wait_for_issued(4)
    await eventually(lambda: provider.current() == server.issued[3])
    assert sample(metrics, "token_proxy_token_lifetime_clamped_total") == 3
    assert [r.levelno for r in clamp_logs()] == [logging.WARNING, logging.INFO]
    assert_no_secrets_logged(caplog, server)


@pytest.mark.usefixtures("short_lifetimes")
@pytest.mark.parametrize("jwt_only", [False, True], ids=["expires_in", "jwt_exp_minus_iat"])
@pytest.mark.parametrize("step", [3600.0, -3600.0], ids=["plus_1h", "minus_1h"])
async def test_a_wall_clock_step_under_traffic_changes_no_expiry_and_no_schedule(
    server: TokenServer,
    metrics: Metrics,
    make_provider: Callable[..., TokenProvider],
    caplog: pytest.LogCaptureFixture,
    step: float,
    jwt_only: bool,
) -> None:
    caplog.set_level(logging.INFO, logger="token_proxy")
    server.token_format = "jwt"
    server.expires_in = 2  # JWTs with iat, exp = iat + 2
    if jwt_only:
        server.response_overrides["expires_in"] = OMIT
    wall = SteppableWallClock()
    # Renewed 1 s before expiry, no jitter: every 1 s, with 0.9 s of use left at each.
    provider = make_provider(wall_clock=wall, refresh_before_expiry=1.0, rng=FixedRandom(0.0))
    # Traffic ends 0.5 s after the third refresh is due and 0.5 s before the fourth.
    deadline = time.monotonic() + 3.5
    await provider.start()
    await provider.get()
    wall.step(step)  # the monotonic clock runs on unchanged
    served = gaps = 0

    async def worker() -> None:
        nonlocal served, gaps
        while time.monotonic() < deadline:
            if provider.current() is None:
                gaps += 1
            token = await provider.get()  # raises TokenUnavailable on an outage
            assert server.is_valid(token)
            served += 1
            await asyncio.sleep(0.005)  # traffic pacing, not synchronisation

    await asyncio.gather(*(worker() for _ in range(10)))

    assert gaps == 0
    assert served > 500
    assert fetches(metrics, "failure") == 0
    assert 1 + 2 <= server.fetch_count <= 1 + 3  # as without a step
    status = provider.status()
    assert 0 < status["expires_in_seconds"] <= 2  # type: ignore[operator]
    # The expiry gauge is a Unix time on the (stepped) wall clock of the moment it is read.
    expiry = sample(metrics, "token_proxy_token_expiry_timestamp_seconds")
    expires_in = sample(metrics, "token_proxy_token_expires_in_seconds")
    assert abs(expiry - (wall() + expires_in)) < 0.5
    assert abs(status["last_fetch_time"] - wall()) < 3  # type: ignore[operator]
    # The disagreement is reported once, not per fetch.
    [record] = [r for r in caplog.records if getattr(r, "event", None) == "clock_disagreement"]
    assert record.levelno == logging.WARNING
    assert record.__dict__["upstream"] == UPSTREAM
    assert abs(record.__dict__["clock_offset"] - step) < 5
    assert ("ahead of" if step > 0 else "behind") in record.getMessage()
    assert_no_secrets_logged(caplog, server)
