"""Many upstreams on one token endpoint: `token_endpoint_concurrency` bounds the token
requests in flight to it, and every upstream still gets its first token promptly."""

from __future__ import annotations

import asyncio

import pytest

from proxy.tokens.endpoint import SessionPool
from tests.support.configs import StartProxy, proxy_config, token_config, upstream_config
from tests.support.token_server import TokenServer
from tests.support.waiting import eventually

pytestmark = pytest.mark.timeout(60)


async def test_first_fetches_of_many_upstreams_respect_the_endpoint_concurrency(
    start_proxy: StartProxy, token_server: TokenServer
) -> None:
    upstreams = [
        upstream_config(
            f"api-{index}",
            [f"api-{index}.internal"],
            token_config(token_server, scope=(f"scope-{index}",)),
        )
        for index in range(40)
    ]
    token_server.hold = asyncio.Event()
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            pending = sum(1 for r in token_server.requests if r.outcome == "pending")
            peak = max(peak, pending)
            await asyncio.sleep(0)

    watcher = asyncio.create_task(watch())
    app = await start_proxy(proxy_config(*upstreams, token_endpoint_concurrency=3))
    await token_server.wait_for_requests(3)
    for _ in range(200):  # give the other 37 every chance to exceed the bound
        await asyncio.sleep(0)
    assert len(token_server.requests) == 3
    token_server.hold.set()

    async def all_valid() -> bool:
        return all(provider.is_valid() for provider in app.providers.values())

    await eventually(all_valid, within=20)
    watcher.cancel()
    assert token_server.fetch_count == 40
    assert peak <= 3
    # One session (and its few keep-alive connections) for the 40, not one each.
    assert len(app._token_sessions) == 1


async def test_sessions_are_shared_by_equal_settings_and_closed_by_the_last_user(
    token_server: TokenServer,
) -> None:
    pool = SessionPool(4)
    first, second = token_config(token_server), token_config(token_server, scope=("other",))
    other_timeout = token_config(token_server, timeout=7.0)
    shared = pool.acquire(first)
    assert pool.acquire(second) is shared
    separate = pool.acquire(other_timeout)
    assert separate is not shared
    assert len(pool) == 2
    await pool.release(first, shared)
    assert not shared.closed
    await pool.release(second, shared)
    await pool.release(other_timeout, separate)
    assert shared.closed
    assert separate.closed
    assert len(pool) == 0
