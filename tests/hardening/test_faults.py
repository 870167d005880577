"""Faults under load: token endpoint outages, upstream resets and restarts, SIGHUP, SIGTERM.

A bounded load (a fixed number of requests, a few at a time, 127.0.0.1 only) runs
while something breaks. Whatever happens, every request ends in a correct response
or a clean error (the proxy's own JSON answer, or a refused/closed connection), none
hangs, and every request that reached an upstream carried exactly one token that the
token endpoint issued.
"""

from __future__ import annotations

import asyncio
import functools
import json
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.app import ProxyApp
from tests.support.configs import (
    CLIENT_ID,
    CLIENT_SECRET,
    StartProxy,
    proxy_config,
    proxy_url,
    start_inventory,
    token_config,
    upstream_config,
)
from tests.support.process import ProxyProcess
from tests.support.rawhttp import HEALTHZ_FAST, EvilConnection, EvilUpstream, healthz_seconds
from tests.support.token_server import TokenServer
from tests.support.upstream import Upstream

pytestmark = [pytest.mark.timeout(90), pytest.mark.slow]

REQUEST_TIMEOUT = 10.0
# A clean error: the proxy's own answer, a connection that was refused or closed, or a
# body cut short (how a failure after the response head has to show).
CONNECTION_ERRORS = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, ConnectionError)
PROXY_ERROR_CODES = {
    400: "bad_request",
    403: "host_not_allowed",
    502: "upstream_unreachable",
    503: "token_unavailable",
    504: "upstream_timeout",
}


@dataclass
class Outcome:
    """How one request of the load ended."""

    index: int
    status: int | None = None
    error: str | None = None  # the proxy's error code, for its own answers
    exception: str | None = None  # a connection-level failure
    retry_after: str | None = None

    @property
    def kind(self) -> str:
        if self.exception is not None:
            return self.exception
        return str(self.status) if self.error is None else f"{self.status} {self.error}"


@dataclass
class Load:
    """A bounded load: at most `total` GETs (fewer once `stop()` is called),
    `concurrency` at a time, each with a deadline."""

    proxy: str
    url: Callable[[int], str]
    total: int
    concurrency: int = 8
    outcomes: list[Outcome] = field(default_factory=list)
    _progress: asyncio.Condition = field(default_factory=asyncio.Condition)
    _stopped: bool = False

    def stop(self) -> None:
        """Start no more requests; those in flight finish."""
        self._stopped = True

    async def run(self) -> list[Outcome]:
        indices = (index for index in range(self.total) if not self._stopped)
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
        connector = aiohttp.TCPConnector(limit=self.concurrency)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

            async def worker() -> None:
                for index in indices:
                    outcome = await self._one(session, index)
                    async with self._progress:
                        self.outcomes.append(outcome)
                        self._progress.notify_all()

            await asyncio.gather(*(worker() for _ in range(self.concurrency)))
        return sorted(self.outcomes, key=lambda outcome: outcome.index)

    async def _one(self, session: aiohttp.ClientSession, index: int) -> Outcome:
        outcome = Outcome(index)
        try:
            async with session.get(self.url(index), proxy=self.proxy) as response:
                outcome.status = response.status
                body = await response.read()
                if response.headers.get("Content-Type") == "application/json":
                    document = json.loads(body)
                    if isinstance(document, dict) and "upstream" in document:
                        outcome.error = document.get("error")
                outcome.retry_after = response.headers.get("Retry-After")
        except TimeoutError:
            outcome.exception = "timeout"
        except CONNECTION_ERRORS as error:
            outcome.exception = "connection:" + type(error).__name__
        return outcome

    async def reached(self, count: int, within: float = 30.0) -> None:
        """Until `count` requests have ended."""
        async with asyncio.timeout(within), self._progress:
            await self._progress.wait_for(lambda: len(self.outcomes) >= count)

    def since(self, count: int) -> list[Outcome]:
        return self.outcomes[count:]


def check_outcomes(outcomes: list[Outcome], allowed: set[str], total: int) -> Counter[str]:
    """Every request ended, none hung, each ending is in `allowed`; returns the tally."""
    assert [outcome.index for outcome in outcomes] == list(range(total))
    kinds = Counter(outcome.kind for outcome in outcomes)
    assert "timeout" not in kinds, f"requests hung: {kinds}"
    unexpected = {
        kind for kind in kinds if kind not in allowed and not kind.startswith("connection:")
    }
    assert not unexpected, f"unexpected outcomes {unexpected} in {kinds}"
    for outcome in outcomes:
        if outcome.error is not None:
            assert PROXY_ERROR_CODES[outcome.status or 0] == outcome.error
        if outcome.error == "token_unavailable":
            assert outcome.retry_after is not None
            assert int(outcome.retry_after) >= 1
    return kinds


def check_tokens(upstream: Upstream, *token_servers: TokenServer) -> None:
    """Every request the upstream received carried exactly one issued bearer token."""
    issued = {f"Bearer {token}" for server in token_servers for token in server.issued}
    assert upstream.received, "the upstream received nothing at all"
    for seen in upstream.received:
        assert len(seen.all("Authorization")) == 1, seen
        assert seen.header("Authorization") in issued, seen


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def status_of(app_url: str, url: str) -> int:
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(url, proxy=app_url) as response,
    ):
        await response.read()
        return response.status


# -- token endpoint outages ------------------------------------------------------------------


@pytest.mark.parametrize("failure", ["500", "drop", "hang", "invalid_client"])
async def test_token_endpoint_outage_under_load(
    start_proxy: StartProxy, token_server: TokenServer, upstream: Upstream, failure: str
) -> None:
    app = await start_proxy(
        proxy_config(
            upstream_config(
                "inventory",
                ["inventory.internal"],
                token_config(token_server, timeout=1.0),
                url=upstream.url,
            )
        )
    )
    load = Load(proxy_url(app), lambda index: f"http://inventory.internal/load/{index}", 200)
    runner = asyncio.create_task(load.run())
    await load.reached(50)
    # The outage: the token endpoint breaks and the upstream stops accepting the cached
    # token, so the proxy must fetch a new one and cannot.
    token_server.set_failing(failure)
    for token in token_server.issued:
        token_server.revoke(token)
    await load.reached(120)
    token_server.set_failing(None)  # recovery, while the load goes on
    outcomes = await runner
    kinds = check_outcomes(outcomes, {"200", "401", "503 token_unavailable"}, total=200)
    assert kinds["503 token_unavailable"] > 0, kinds
    assert {outcome.kind for outcome in outcomes[:40]} == {"200"}

    # Once a token can be had again, everything goes through.
    await eventually(lambda: _status_is(app, "http://inventory.internal/probe", 200), 20.0)
    after = Load(proxy_url(app), lambda index: f"http://inventory.internal/after/{index}", 40)
    check_outcomes(await after.run(), {"200"}, total=40)
    check_tokens(upstream, token_server)
    assert await healthz_seconds(app.admin_port) < HEALTHZ_FAST


async def _status_is(app: ProxyApp, url: str, status: int) -> bool:
    return await status_of(proxy_url(app), url) == status


# -- upstream resets and restarts ------------------------------------------------------------


async def test_upstream_restarts_under_load(
    start_proxy: StartProxy, token_server: TokenServer, upstream: Upstream
) -> None:
    app = await start_inventory(
        start_proxy, token_server, upstream, connect_timeout=1.0, timeout=2.0
    )
    port = upstream.port
    load = Load(proxy_url(app), lambda index: f"http://inventory.internal/r/{index}", 300)
    runner = asyncio.create_task(load.run())
    for threshold in (50, 120, 190):
        await load.reached(threshold)
        await upstream.close()
        await load.reached(threshold + 15)  # some requests meet a closed port
        await upstream.start(port=port)
    outcomes = await runner
    kinds = check_outcomes(outcomes, {"200", "502 upstream_unreachable"}, total=300)
    assert kinds["200"] >= 150, kinds
    check_tokens(upstream, token_server)


def chaos(ok: bytes) -> Callable[[EvilConnection], Awaitable[None]]:
    """Connection i: answers every request (i % 4 == 0), resets after the head (1),
    closes at once (2), or answers once then resets mid-body (3)."""

    async def behaviour(conn: EvilConnection) -> None:
        mode = conn.index % 4
        if mode == 2:
            conn.close()
            return
        while True:
            await conn.read_head(within=30.0)
            if mode == 1:
                conn.reset()
                return
            if mode == 3:
                conn.send(ok[: len(ok) - 1])
                await conn.writer.drain()
                conn.reset()
                return
            conn.send(ok)
            await conn.writer.drain()

    return behaviour


async def test_upstream_resets_under_load(
    start_proxy: StartProxy, token_server: TokenServer
) -> None:
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123456789"
    async with EvilUpstream(chaos(ok)) as evil:
        app = await start_proxy(
            proxy_config(
                upstream_config(
                    "inventory",
                    ["inventory.internal"],
                    token_config(token_server),
                    url=evil.url,
                    timeout=2.0,
                )
            )
        )
        load = Load(proxy_url(app), lambda index: f"http://inventory.internal/c/{index}", 200)
        outcomes = await load.run()
        # A reset mid-body reaches the client as a broken response (a connection error).
        kinds = check_outcomes(outcomes, {"200", "502 upstream_unreachable"}, total=200)
        assert kinds["200"] > 0, kinds
        assert kinds["502 upstream_unreachable"] > 0, kinds
        issued = {f"Bearer {token}".encode() for token in token_server.issued}
        for head in evil.heads:
            fields = [
                line for line in head.split(b"\r\n") if line.lower().startswith(b"authorization:")
            ]
            assert len(fields) == 1
            assert fields[0].split(b":", 1)[1].strip() in issued
        assert await healthz_seconds(app.admin_port) < HEALTHZ_FAST


# -- a real process: SIGHUP and SIGTERM --------------------------------------------------------


def process_config(
    token_server: TokenServer, upstream: Upstream, scope: str, **extra: Any
) -> dict[str, Any]:
    upstreams: dict[str, Any] = {
        "inventory": {
            "match": {"hosts": ["inventory.internal"]},
            "url": upstream.url,
            "timeout": "20s",
            "token": {
                "token_url": token_server.url,
                "client_id": CLIENT_ID,
                "client_secret": CLIENT_SECRET,
                "scope": scope,
            },
        }
    }
    upstreams.update(extra)
    return {"shutdown_grace_period": "10s", "upstreams": upstreams}


@pytest.fixture
async def process(
    tmp_path: Path, token_server: TokenServer, upstream: Upstream
) -> AsyncIterator[ProxyProcess]:
    proxy = ProxyProcess(tmp_path, process_config(token_server, upstream, "read"))
    await proxy.start()
    yield proxy
    await proxy.stop()
    assert "Traceback" not in proxy.logs()


async def reloads(process: ProxyProcess) -> tuple[float, float]:
    """(successful, failed) reloads so far, from the process's /metrics."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{process.admin_port}/metrics") as response,
    ):
        metrics = await response.text()
    counts = {"success": 0.0, "failure": 0.0}
    for line in metrics.splitlines():
        for outcome in counts:
            prefix = f'token_proxy_config_reloads_total{{outcome="{outcome}"}} '
            if line.startswith(prefix):
                counts[outcome] = float(line[len(prefix) :])
    return counts["success"], counts["failure"]


async def test_sighup_reloads_under_load(
    process: ProxyProcess, token_server: TokenServer, upstream: Upstream
) -> None:
    load = Load(process.url, lambda index: f"http://inventory.internal/h/{index}", 5000)
    runner = asyncio.create_task(load.run())
    extra_upstream = {
        "billing": {
            "match": {"hosts": ["billing.internal"]},
            "url": upstream.url,
            "required": False,
            "token": {
                "token_url": token_server.url,
                "client_id": CLIENT_ID,
                "client_secret": CLIENT_SECRET,
            },
        }
    }
    try:
        for round_ in range(4):
            await load.reached(len(load.outcomes) + 30)
            # Alternate a changed token config (a new provider) and an added upstream.
            scope = "write" if round_ % 2 else "read"
            extra = extra_upstream if round_ % 2 else {}
            process.write_config(process_config(token_server, upstream, scope, **extra))
            process.signal(signal.SIGHUP)
            await eventually(functools.partial(_reloaded, process, round_ + 1))
        await load.reached(len(load.outcomes) + 30)  # and the load carries on after them
    finally:
        load.stop()
    outcomes = await runner
    assert len(outcomes) < load.total, "the load ended before the reloads did"
    check_outcomes(outcomes, {"200"}, total=len(outcomes))
    assert not [outcome for outcome in outcomes if outcome.exception], "no request may fail"
    check_tokens(upstream, token_server)
    assert await reloads(process) == (4.0, 0.0)


async def _reloaded(process: ProxyProcess, count: int) -> bool:
    return (await reloads(process))[0] >= count


async def test_sigterm_under_load_drains_and_exits_cleanly(
    process: ProxyProcess, token_server: TokenServer, upstream: Upstream
) -> None:
    # One slow request is in flight when SIGTERM comes: it must still complete.
    slow = asyncio.create_task(status_of(process.url, "http://inventory.internal/slow/1"))
    await eventually(lambda: _async_true(any(seen.path == "/slow/1" for seen in upstream.received)))
    load = Load(process.url, lambda index: f"http://inventory.internal/t/{index}", 3000)
    runner = asyncio.create_task(load.run())
    await load.reached(60)
    started = time.monotonic()
    process.signal(signal.SIGTERM)
    try:
        # New connections are refused once the listener closed: the load sees that.
        await eventually(
            lambda: _async_true(any(outcome.exception for outcome in load.outcomes)), 10.0
        )
    finally:
        load.stop()
    outcomes = await runner
    # Served, or refused / closed once the listener stopped: never an error or a hang.
    kinds = check_outcomes(outcomes, {"200"}, total=len(outcomes))
    assert kinds["200"] >= 60
    assert process.process is not None
    assert process.process.returncode is None  # still draining: the slow request is in flight
    upstream.release.set()
    assert await slow == 200
    assert await process.wait(within=15.0) == 0
    assert time.monotonic() - started < 12.0
    check_tokens(upstream, token_server)


async def _async_true(value: bool) -> bool:
    return value
