"""Retries fitted to the held token's remaining life.

The arithmetic of `proxy.tokens.schedule.retry_delay` on numbers, then the whole proxy
against a real token endpoint that fails three times inside a short refresh window:
no request may notice.
"""

from __future__ import annotations

import random
import time

import aiohttp
import pytest

from proxy.tokens import provider as provider_module
from proxy.tokens import schedule
from tests.support.configs import StartProxy, proxy_config, proxy_url, token_config, upstream_config
from tests.support.token_server import TokenServer
from tests.support.upstream import Upstream


class FixedRandom(random.Random):
    """Jitter pinned to one point of its range: 0.0 the low end, 1.0 the high end."""

    def __init__(self, fraction: float) -> None:
        super().__init__(0)
        self.fraction = fraction

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self.fraction


def delay(
    failures: int,
    token_left: float | None,
    *,
    retry_after: float | None = None,
    jitter: float = 1.0,
    retry_initial: float = 1.0,
    retry_max: float = 60.0,
) -> float:
    return schedule.retry_delay(
        failures,
        retry_initial=retry_initial,
        retry_max=retry_max,
        retry_after=retry_after,
        token_left=token_left,
        rng=FixedRandom(jitter),
    )


def test_without_a_valid_token_the_backoff_is_unchanged() -> None:
    assert [delay(n, None) for n in range(1, 9)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert delay(3, None, jitter=0.0) == schedule.RETRY_FLOOR
    assert delay(1, None, retry_after=30.0) == 30.0
    assert delay(1, None, retry_after=1e6) == schedule.RETRY_AFTER_MAX


def test_with_a_valid_token_each_delay_is_capped_at_a_share_of_its_life() -> None:
    assert delay(1, 1.7) == pytest.approx(schedule.FIT_FRACTION * 1.7)
    assert delay(5, 100.0) == 16.0  # under the cap of 25 s: the backoff as it is
    assert delay(5, 40.0) == pytest.approx(10.0)
    # Shorter draws of the jitter stay as they are.
    assert delay(1, 100.0, jitter=0.5) == pytest.approx(0.5)


def test_the_fitted_delay_has_a_floor_and_gives_up_once_nothing_fits() -> None:
    assert delay(3, 0.6) == schedule.FIT_FLOOR
    # Less than the floor left: no retry lands before expiry, the backoff applies.
    assert delay(3, schedule.FIT_FLOOR) == 4.0


def test_retry_after_is_honoured_where_it_fits_before_expiry() -> None:
    assert delay(1, 10.0, retry_after=3.0) == 3.0
    # A Retry-After past the token's end gives way to the cap: the longest delay that fits.
    assert delay(1, 10.0, retry_after=30.0) == pytest.approx(2.5)


def test_several_attempts_fit_in_a_short_refresh_window() -> None:
    """A 6 s token renewed 2 s before expiry: from the refresh (~1.7 s of use left) the
    attempts land before the token ends, the longest draws of the jitter included."""
    lifetime, margin = 6.0, 2.0
    usable_until = lifetime - schedule.expiry_leeway(lifetime)
    now, attempts, failures = lifetime - margin, [], 0
    while now < usable_until and len(attempts) < 20:
        failures += 1
        wait = delay(failures, usable_until - now)
        if now + wait >= usable_until:
            break
        now += wait
        attempts.append(round(now, 3))
    assert len(attempts) >= 4, attempts
    assert attempts == [4.425, 4.744, 4.994, 5.244, 5.494]


@pytest.mark.timeout(60)
async def test_three_token_endpoint_failures_inside_a_2s_refresh_window_fail_no_request(
    start_proxy: StartProxy,
    upstream: Upstream,
    token_server: TokenServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(provider_module, "MIN_LIFETIME", 1.0)  # 4 s tokens, not raised
    # Renewed 2 s before expiry (half the lifetime, the most a margin may be): from the
    # refresh 1.8 s of use are left (the leeway of a 4 s token is 0.2 s), of which the
    # three fitted delays take at most about 1 s.
    token_server.expires_in = 4
    token = token_config(token_server, refresh_before_expiry=2.0, retry_initial=1.0, retry_max=60.0)
    app = await start_proxy(
        proxy_config(upstream_config("inventory", ["inventory.internal"], token, url=upstream.url))
    )
    statuses: list[int] = []

    async def send(session: aiohttp.ClientSession) -> None:
        async with session.get(
            "http://inventory.internal/steady", proxy=proxy_url(app)
        ) as response:
            await response.read()
            statuses.append(response.status)

    async with aiohttp.ClientSession() as session:
        await send(session)
        assert statuses == [200]
        token_server.fail_next("500", "500", "500")
        started = time.monotonic()
        renewed_at: float | None = None
        # Steady traffic from the first token's life into the second's.
        while time.monotonic() - started < 15.0 and len(statuses) < 50_000:
            await send(session)
            if renewed_at is None and len(token_server.issued) >= 2:
                renewed_at = time.monotonic()
            if renewed_at is not None and time.monotonic() - renewed_at > 0.5:
                break
    assert renewed_at is not None, "the token was never renewed"
    assert statuses.count(200) == len(statuses), {s: statuses.count(s) for s in set(statuses)}
    assert len(statuses) > 100
    outcomes = [request.outcome for request in token_server.requests]
    assert outcomes[:5] == ["issued", *["failure:500"] * 3, "issued"]
    unavailable = app.metrics.registry.get_sample_value(
        "token_proxy_token_unavailable_total", {"upstream": "inventory"}
    )
    assert unavailable == 0
