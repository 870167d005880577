"""Whole proxies sharing tokens through a real redis-server: in this process (several
`ProxyApp`s, where token lifetimes can be made short) and as real processes started
from YAML (`python -m proxy run`), one of them killed while it holds the fetch lock.

The request path never touches Redis: with Redis killed and restarted under load, no
request fails and none reaches the upstream without a token.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.app import ProxyApp
from proxy.config import ProxyConfig
from proxy.tokens import provider as provider_module
from proxy.tokens import redis_backend
from tests.support.configs import (
    CLIENT_ID,
    CLIENT_SECRET,
    StartProxy,
    proxy_config,
    proxy_url,
    token_config,
    upstream_config,
    upstream_entry,
)
from tests.support.process import ProxyProcess
from tests.support.redis_server import RedisServer
from tests.support.token_server import TokenServer
from tests.support.upstream import Upstream
from tests.support.waiting import eventually
from tests.tokens.fleet import cache_config

pytestmark = pytest.mark.timeout(90)


def fleet_config(
    token_server: TokenServer, upstream: Upstream, redis_url: str, key_file: Path, **token: Any
) -> ProxyConfig:
    return proxy_config(
        upstream_config(
            "inventory",
            ["inventory.internal"],
            token_config(token_server, **token),
            url=upstream.url,
        ),
        token_cache=cache_config(redis_url, key_file, lock_timeout=5.0),
    )


async def get(session: aiohttp.ClientSession, app: ProxyApp, path: str = "/api/x") -> int:
    async with session.get(f"http://inventory.internal{path}", proxy=proxy_url(app)) as reply:
        await reply.read()
        return reply.status


async def admin_json(session: aiohttp.ClientSession, port: int, path: str) -> Any:
    async with session.get(f"http://127.0.0.1:{port}{path}") as reply:
        return await reply.json()


def bearer_tokens(upstream: Upstream) -> list[str | None]:
    return [received.header("Authorization") for received in upstream.received]


# -- in this process -------------------------------------------------------------------


async def test_proxies_share_one_token_and_say_where_it_came_from(
    start_proxy: StartProxy,
    token_server: TokenServer,
    upstream: Upstream,
    redis_server: RedisServer,
    key_file: Path,
) -> None:
    config = fleet_config(token_server, upstream, redis_server.url, key_file)
    first = await start_proxy(config)
    async with aiohttp.ClientSession() as session:
        assert await get(session, first) == 200
        second = await start_proxy(config)
        assert await get(session, second) == 200
        assert token_server.fetch_count == 1
        assert len(set(bearer_tokens(upstream))) == 1

        status = await admin_json(session, second.admin_port, "/status")
        assert status["upstreams"]["inventory"]["token_source"] == "shared_cache"
        assert status["token_cache"]["state"] == "up"
        assert status["token_cache"]["backend"] == redis_server.url
        first_status = await admin_json(session, first.admin_port, "/status")
        assert first_status["upstreams"]["inventory"]["token_source"] == "fetched"
        text = str(status) + str(first_status)
        assert token_server.issued[0] not in text
        assert CLIENT_SECRET not in text


async def test_readiness_does_not_wait_for_an_unreachable_cache(
    start_proxy: StartProxy,
    token_server: TokenServer,
    upstream: Upstream,
    redis_server: RedisServer,
    key_file: Path,
) -> None:
    await redis_server.stop()
    app = await start_proxy(fleet_config(token_server, upstream, redis_server.url, key_file))
    async with aiohttp.ClientSession() as session:

        async def ready() -> bool:
            async with session.get(f"http://127.0.0.1:{app.admin_port}/readyz") as reply:
                return reply.status == 200

        await eventually(ready)
        assert await get(session, app) == 200
        status = await admin_json(session, app.admin_port, "/status")
        assert status["token_cache"]["state"] == "down"
        assert status["upstreams"]["inventory"]["token_source"] == "fetched"


async def test_an_upstream_with_cache_local_keeps_its_token_to_itself(
    start_proxy: StartProxy,
    token_server: TokenServer,
    upstream: Upstream,
    redis_server: RedisServer,
    key_file: Path,
) -> None:
    config = proxy_config(
        upstream_config(
            "inventory", ["inventory.internal"], token_config(token_server), url=upstream.url
        ),
        upstream_config(
            "billing",
            ["billing.internal"],
            token_config(token_server, cache="local", scope=("billing",)),
            url=upstream.url,
        ),
        token_cache=cache_config(redis_server.url, key_file),
    )
    first, second = await start_proxy(config), await start_proxy(config)

    async def all_valid() -> bool:
        return all(p.is_valid() for app in (first, second) for p in app.providers.values())

    await eventually(all_valid)
    # One shared inventory token, and a billing token for each proxy.
    assert token_server.fetch_count == 3
    assert len(await redis_server.dump()) == 1
    assert first.providers["billing"].status()["token_cache"] == "local"
    assert (
        first.metrics.registry.get_sample_value(
            "token_proxy_token_cache_lookups_total", {"upstream": "billing", "result": "miss"}
        )
        is None
    )


async def test_redis_killed_and_restarted_under_load_fails_no_request(
    start_proxy: StartProxy,
    token_server: TokenServer,
    upstream: Upstream,
    redis_server: RedisServer,
    key_file: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Tokens of two seconds (below the real floor), renewed all through the outage, 1 s
    # before expiry: a refresh may be 0.9 s late (a Redis timeout and a stalled
    # machine) before a token is missing.
    monkeypatch.setattr(provider_module, "MIN_LIFETIME", 0.5)
    monkeypatch.setattr(redis_backend, "RETRY_MAX", 0.5)
    token_server.expires_in = 2
    config = fleet_config(
        token_server, upstream, redis_server.url, key_file, refresh_before_expiry=1.0
    )
    proxies = [await start_proxy(config) for _ in range(2)]
    statuses: list[int] = []
    stop = asyncio.Event()

    async def load(app: ProxyApp) -> None:
        async with aiohttp.ClientSession() as session:
            while not stop.is_set() and len(statuses) < 20_000:
                statuses.append(await get(session, app))

    loaders = [asyncio.create_task(load(app)) for app in proxies for _ in range(4)]

    async def fetched_since(count: int, more: int) -> None:
        async def enough() -> bool:
            return token_server.fetch_count >= count + more

        await eventually(enough, within=30)

    await fetched_since(token_server.fetch_count, 2)
    await redis_server.stop()
    await fetched_since(token_server.fetch_count, 4)  # renewals while Redis is gone
    await redis_server.start()

    async def cache_back() -> bool:
        return all(app.token_cache is not None and app.token_cache.state == "up" for app in proxies)

    await eventually(cache_back, within=30)
    await fetched_since(token_server.fetch_count, 2)
    stop.set()
    await asyncio.gather(*loaders)

    assert len(statuses) > 100
    assert set(statuses) == {200}
    tokens = bearer_tokens(upstream)
    assert len(tokens) == len(statuses)
    assert all(token is not None and token.startswith("Bearer tok-") for token in tokens)
    assert all(
        app.metrics.registry.get_sample_value(
            "token_proxy_token_unavailable_total", {"upstream": "inventory"}
        )
        == 0
        for app in proxies
    )


# -- real processes --------------------------------------------------------------------


def process_config(
    token_server: TokenServer, upstream: Upstream, redis_url: str, key_file: Path, **cache: Any
) -> dict[str, Any]:
    return {
        "upstreams": {
            "inventory": upstream_entry("inventory.internal", upstream.url, token_server)
        },
        "token_cache": {
            "redis": {"url": redis_url},
            "encryption_key_file": str(key_file),
            **cache,
        },
    }


@pytest.fixture
async def processes() -> AsyncIterator[list[ProxyProcess]]:
    started: list[ProxyProcess] = []
    yield started
    for process in started:
        await process.stop()


def new_directory(path: Path) -> Path:
    path.mkdir()
    return path


async def start_process(
    processes: list[ProxyProcess], directory: Path, config: dict[str, Any]
) -> ProxyProcess:
    process = ProxyProcess(new_directory(directory), config)
    processes.append(process)
    await process.start()
    return process


async def metric(
    session: aiohttp.ClientSession, process: ProxyProcess, name: str, **labels: str
) -> float:
    async with session.get(f"http://127.0.0.1:{process.admin_port}/metrics") as reply:
        text = await reply.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


async def wait_ready(session: aiohttp.ClientSession, process: ProxyProcess) -> None:
    async def ready() -> bool:
        try:
            async with session.get(f"http://127.0.0.1:{process.admin_port}/readyz") as reply:
                return reply.status == 200
        except aiohttp.ClientError:
            return False

    await eventually(ready, within=30)


@pytest.mark.timeout(120)
async def test_three_proxy_processes_share_one_token(
    processes: list[ProxyProcess],
    tmp_path: Path,
    token_server: TokenServer,
    upstream: Upstream,
    redis_server: RedisServer,
    key_file: Path,
) -> None:
    config = process_config(token_server, upstream, redis_server.url, key_file)
    fleet = [await start_process(processes, tmp_path / f"p{i}", config) for i in range(3)]
    async with aiohttp.ClientSession() as session:
        for process in fleet:
            await wait_ready(session, process)
            async with session.get("http://inventory.internal/api/1", proxy=process.url) as reply:
                assert reply.status == 200
        assert token_server.fetch_count == 1
        assert len(set(bearer_tokens(upstream))) == 1
        hits = [
            await metric(session, p, "token_proxy_token_cache_lookups_total", result="hit")
            for p in fleet
        ]
        waited = [
            await metric(session, p, "token_proxy_token_cache_lock_waits_total", outcome="entry")
            for p in fleet
        ]
        assert sum(hits) + sum(waited) == 2
        assert all([await metric(session, p, "token_proxy_token_cache_up") == 1 for p in fleet])
    logs = "".join(process.logs() for process in fleet)
    assert token_server.issued[0] not in logs
    assert CLIENT_SECRET not in logs
    assert CLIENT_ID  # the client id may be logged; the secret and token never


@pytest.mark.timeout(120)
async def test_a_proxy_killed_while_holding_the_lock_delays_the_others_by_its_expiry(
    processes: list[ProxyProcess],
    tmp_path: Path,
    token_server: TokenServer,
    upstream: Upstream,
    redis_server: RedisServer,
    key_file: Path,
) -> None:
    config = process_config(token_server, upstream, redis_server.url, key_file, lock_timeout="4s")
    token_server.hold = asyncio.Event()  # the first proxy's token request hangs
    holder = await start_process(processes, tmp_path / "holder", config)
    await token_server.wait_for_requests(1)
    holder.signal(signal.SIGKILL)  # mid-fetch: no release, no write
    await holder.wait()

    others = [await start_process(processes, tmp_path / f"p{i}", config) for i in range(2)]
    token_server.hold.set()
    async with aiohttp.ClientSession() as session:
        for process in others:
            await wait_ready(session, process)
        # One of them took the lock once it expired; the other got its token.
        acquired = [
            await metric(session, p, "token_proxy_token_cache_lock_waits_total", outcome="acquired")
            for p in others
        ]
        timeouts = [
            await metric(session, p, "token_proxy_token_cache_lock_waits_total", outcome="timeout")
            for p in others
        ]
    assert sum(acquired) == 1
    assert sum(timeouts) == 0
    # The dead holder's request, then one more for the whole fleet.
    assert token_server.fetch_count == 2
