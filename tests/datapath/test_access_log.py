"""The access log: one line per request, the same fields on every path, measured to the end.

`bytes_out` counts the body bytes the client was sent (chunked ones too), `duration_ms`
runs to the last byte, and `host`/`path` are where the request went (origin-form path,
no query), whether it came in absolute form, through a reverse port or inside an
intercepted tunnel. Real servers on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import aiohttp
import pytest

from proxy.app import ProxyApp
from proxy.config import Address
from tests.support.configs import (
    StartProxy,
    proxy_config,
    proxy_url,
    token_config,
    upstream_config,
)
from tests.support.rawhttp import EvilConnection, EvilUpstream
from tests.support.token_server import TokenServer
from tests.support.upstream import Upstream
from tests.support.waiting import eventually


def access_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == "access"]


@pytest.fixture
async def logged(
    start_proxy: StartProxy, token_server: TokenServer, upstream: Upstream
) -> ProxyApp:
    inventory = upstream_config(
        "inventory",
        ["inventory.internal"],
        token_config(token_server),
        url=upstream.url,
        listen=Address("127.0.0.1", 0),
    )
    return await start_proxy(proxy_config(inventory, access_log=True))


async def test_chunked_bodies_are_counted_on_both_paths_with_the_same_fields(
    logged: ProxyApp, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="token_proxy.access")
    size = 300_000
    reverse_port = logged.reverse_listeners["inventory"].port
    async with aiohttp.ClientSession() as session:
        # The first request finds no idle upstream connection (the coroutine path), the
        # second one does (the fast path); the third comes through the reverse port.
        for _ in range(2):
            async with session.get(
                f"http://inventory.internal/stream/{size}?secret=1", proxy=proxy_url(logged)
            ) as response:
                assert len(await response.read()) == size
        async with session.get(f"http://127.0.0.1:{reverse_port}/stream/{size}") as response:
            assert len(await response.read()) == size

    async def three_lines() -> bool:
        return len(access_lines(caplog)) == 3

    await eventually(three_lines, within=10)
    for record in access_lines(caplog):
        fields = record.__dict__
        assert fields["bytes_out"] == size
        assert fields["path"] == f"/stream/{size}"  # origin-form, the query never logged
        assert fields["host"] == upstream.url.removeprefix("http://")
        assert fields["status"] == 200
        assert fields["upstream"] == "inventory"


def head_then_rest(rest_released: asyncio.Event) -> object:
    """An upstream that sends its head and half the body, then the rest when released."""

    async def behaviour(conn: EvilConnection) -> None:
        await conn.read_head()
        conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
        await conn.writer.drain()
        await rest_released.wait()
        conn.send(b"world")
        await conn.writer.drain()

    return behaviour


@pytest.fixture
async def slow_body() -> AsyncIterator[tuple[EvilUpstream, asyncio.Event]]:
    released = asyncio.Event()
    behaviour = head_then_rest(released)
    async with EvilUpstream(behaviour) as evil:  # type: ignore[arg-type]
        yield evil, released


async def test_the_duration_runs_to_the_last_byte(
    start_proxy: StartProxy,
    token_server: TokenServer,
    slow_body: tuple[EvilUpstream, asyncio.Event],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="token_proxy.access")
    evil, released = slow_body
    inventory = upstream_config(
        "inventory", ["inventory.internal"], token_config(token_server), url=evil.url
    )
    app = await start_proxy(proxy_config(inventory, access_log=True))
    loop = asyncio.get_running_loop()
    async with (
        aiohttp.ClientSession() as session,
        session.get("http://inventory.internal/x", proxy=proxy_url(app)) as response,
    ):
        assert await response.content.readexactly(5) == b"hello"
        head_seen = loop.time()
        # The upstream holds the rest of its body back; nothing is logged meanwhile.
        assert access_lines(caplog) == []
        pause = 0.3  # the upstream's pause mid-body, which the duration must include
        await asyncio.sleep(pause)
        released.set()
        assert await response.content.read() == b"world"
        body_done = loop.time()

    async def logged() -> bool:
        return len(access_lines(caplog)) == 1

    await eventually(logged, within=10)
    fields = access_lines(caplog)[0].__dict__
    assert fields["bytes_out"] == 10
    assert fields["duration_ms"] >= pause * 1000
    assert fields["duration_ms"] <= (body_done - head_seen + 5) * 1000
