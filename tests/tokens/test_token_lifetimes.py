"""Token lifetimes through the whole proxy: wall-clock steps and absurdly short lifetimes.

A real token endpoint issues the tokens, a real upstream checks them against it, and
real clients send traffic through the proxy. The wall clock the proxy reads is stepped
(`proxy.tokens.clock.wall_clock`) while the monotonic clock runs on, as when NTP or an
operator sets the system time.
"""

from __future__ import annotations

import time
from collections import Counter

import aiohttp
import pytest

from proxy.app import ProxyApp
from proxy.tokens import clock
from proxy.tokens import provider as provider_module
from tests.support.configs import StartProxy, proxy_config, proxy_url, token_config, upstream_config
from tests.support.token_server import OMIT, TokenServer
from tests.support.upstream import Upstream


class SteppableWallClock:
    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


async def fetch(session: aiohttp.ClientSession, app: ProxyApp, path: str) -> int:
    async with session.get(f"http://inventory.internal{path}", proxy=proxy_url(app)) as response:
        await response.read()
        return response.status


def metric(app: ProxyApp, name: str, **labels: str) -> float:
    value = app.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


@pytest.mark.timeout(60)
@pytest.mark.parametrize("jwt_only", [False, True], ids=["expires_in", "jwt_exp_minus_iat"])
async def test_wall_clock_steps_of_an_hour_under_traffic_cause_no_503_and_no_extra_fetches(
    start_proxy: StartProxy,
    upstream: Upstream,
    token_server: TokenServer,
    monkeypatch: pytest.MonkeyPatch,
    jwt_only: bool,
) -> None:
    """3 s JWTs (iat, exp), renewed every ~1.5 s; the wall clock jumps +1 h, then to -1 h."""
    monkeypatch.setattr(provider_module, "MIN_LIFETIME", 0.5)  # 3 s tokens, not raised
    wall = SteppableWallClock()
    monkeypatch.setattr(clock, "wall_clock", wall)
    token_server.token_format = "jwt"
    token_server.expires_in = 3
    if jwt_only:
        token_server.response_overrides["expires_in"] = OMIT
    # Renewed 1.5 s before expiry: a refresh may be 1.35 s late (a stalled machine)
    # before a token is missing.
    token = token_config(token_server, refresh_before_expiry=1.5)
    app = await start_proxy(
        proxy_config(upstream_config("inventory", ["inventory.internal"], token, url=upstream.url))
    )
    statuses: Counter[int] = Counter()
    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        while (elapsed := time.monotonic() - started) < 7.0:
            wall.offset = 0.0 if elapsed < 1.0 else 3600.0 if elapsed < 4.0 else -3600.0
            statuses[await fetch(session, app, "/stock")] += 1
    elapsed = time.monotonic() - started

    assert set(statuses) == {200}, statuses
    assert statuses[200] > 100
    # One fetch per 1.425-1.5 s (the jitter), plus the first: the same rate as with a
    # still clock. Never more (the first came after `started`); fewer if refreshes came
    # late.
    issued = len(token_server.issued)
    assert 1 + elapsed / 1.5 - 2 <= issued <= 1 + elapsed / 1.425
    assert (
        metric(app, "token_proxy_token_fetches_total", upstream="inventory", outcome="failure") == 0
    )
    assert metric(app, "token_proxy_token_unavailable_total", upstream="inventory") == 0
    retries = metric(app, "token_proxy_upstream_unauthorized_retries_total", upstream="inventory")
    assert retries == 0
    # The expiry gauge follows the wall clock the proxy reads; /status stays monotonic.
    status = app.providers["inventory"].status()
    expires_in = status["expires_in_seconds"]
    assert isinstance(expires_in, float)
    assert 0 < expires_in <= 3
    expiry = metric(app, "token_proxy_token_expiry_timestamp_seconds", upstream="inventory")
    assert abs(expiry - (wall() + expires_in)) < 0.5


@pytest.mark.timeout(60)
async def test_a_millisecond_lifetime_does_not_make_a_fetch_per_request(
    start_proxy: StartProxy, token_server: TokenServer
) -> None:
    """`expires_in: 0.001`: the token is used for the floor lifetime, and counted."""
    token_server.expires_in = 0.001
    async with Upstream() as lenient:  # accepts whatever token it is sent
        app = await start_proxy(
            proxy_config(
                upstream_config(
                    "inventory",
                    ["inventory.internal"],
                    token_config(token_server),
                    url=lenient.url,
                )
            )
        )
        async with aiohttp.ClientSession() as session:
            statuses = Counter([await fetch(session, app, f"/r{i}") for i in range(40)])
    assert statuses == {200: 40}
    assert len(token_server.issued) == 1
    clamped = metric(app, "token_proxy_token_lifetime_clamped_total", upstream="inventory")
    assert clamped == 1
    status = app.providers["inventory"].status()
    expires_in = status["expires_in_seconds"]
    assert isinstance(expires_in, float)
    assert provider_module.MIN_LIFETIME - 2 < expires_in <= provider_module.MIN_LIFETIME
