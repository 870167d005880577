"""Resource limits: what a client or an upstream can make the proxy hold, and for how long.

Request line, header size and count (414/431), the body limit (413), header and idle
timeouts the proxy sets itself, the connection cap, and upstreams that never answer,
stall mid-head or mid-body, or outlive their client. After each case the process's
file descriptors and asyncio tasks return to their baseline (polled with a deadline)
and `/healthz` still answers at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from proxy.app import ProxyApp
from proxy.config import LimitsConfig
from tests.support.configs import (
    StartProxy,
    scripted_inventory,
    start_inventory,
)
from tests.support.rawhttp import (
    HEALTHZ_FAST,
    Behaviour,
    EvilConnection,
    EvilUpstream,
    RawClient,
    healthz_seconds,
    open_fds,
    roundtrip,
    settle,
    stall,
    task_count,
)
from tests.support.token_server import TokenServer
from tests.support.upstream import Upstream

pytestmark = pytest.mark.timeout(60)

LIMITS = LimitsConfig(
    max_request_line=1024,
    max_header_size=4096,
    max_headers=20,
    max_body_size=1000,
    header_timeout=1.0,
    idle_timeout=2.0,
    max_connections=6,
)
# The sweeper runs once a second: a deadline is enforced within about a second of it.
SWEEP_SLACK = 2.5
# What the proxy answers itself, from what it already has, comes within this.
AT_ONCE = 1.0


def get(target: bytes = b"http://inventory.internal/x", *lines: bytes) -> bytes:
    return b"\r\n".join([b"GET " + target + b" HTTP/1.1", b"Host: inventory.internal", *lines]) + (
        b"\r\n\r\n"
    )


def post(*lines: bytes, body: bytes = b"") -> bytes:
    return (
        b"\r\n".join(
            [b"POST http://inventory.internal/x HTTP/1.1", b"Host: inventory.internal", *lines]
        )
        + b"\r\n\r\n"
        + body
    )


class Baseline:
    """Descriptors and tasks of this process once the proxy is warm; checked after a case."""

    def __init__(self, app: ProxyApp) -> None:
        self.app = app
        self.fds = 0
        self.tasks = 0

    async def take(self) -> None:
        # One request first, so that the token fetch and a pooled upstream connection
        # (which a case may legitimately reuse) are part of the baseline.
        response, _ = await roundtrip(self.app.port, get(), close_within=0)
        assert response.status == 200
        await asyncio.sleep(0)  # let the client connection's close be processed
        self.fds = await _steady(open_fds)
        self.tasks = await _steady(task_count)

    async def check(self) -> None:
        await settle(open_fds, self.fds, within=10.0)
        await settle(task_count, self.tasks, within=10.0)
        assert await healthz_seconds(self.app.admin_port) < HEALTHZ_FAST


async def _steady(measure: Callable[[], int]) -> int:
    """A value that stays the same for 0.2 s (closing sockets take a loop turn or two)."""
    value = measure()
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        again = measure()
        if again == value:
            return value
        value = again
    return value


Limited = Callable[..., Awaitable[tuple[ProxyApp, Baseline]]]


@pytest.fixture
async def limited(
    start_proxy: StartProxy, token_server: TokenServer, upstream: Upstream
) -> Limited:
    """A proxy with small limits sending inventory.internal to the recording upstream."""

    async def start(
        limits: LimitsConfig = LIMITS, **upstream_changes: Any
    ) -> tuple[ProxyApp, Baseline]:
        app = await start_inventory(
            start_proxy,
            token_server,
            upstream,
            proxy={"unknown_hosts": "deny", "limits": limits, "shutdown_grace_period": 0.5},
            **upstream_changes,
        )
        baseline = Baseline(app)
        await baseline.take()
        return app, baseline

    return start


EvilProxy = Callable[..., Awaitable[tuple[ProxyApp, EvilUpstream, Baseline]]]


@pytest.fixture
async def evil_proxy(
    start_proxy: StartProxy, token_server: TokenServer
) -> AsyncIterator[EvilProxy]:
    """A proxy sending inventory.internal to a scripted upstream (connection 0 warms up)."""
    evils: list[EvilUpstream] = []

    async def start(
        *behaviours: Behaviour, upstream_timeout: float = 1.0, limits: LimitsConfig = LIMITS
    ) -> tuple[ProxyApp, EvilUpstream, Baseline]:
        ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
        evil = EvilUpstream(_answer_once(ok), *behaviours)
        await evil.__aenter__()
        evils.append(evil)
        app = await start_proxy(
            scripted_inventory(
                token_server, evil.url, upstream_timeout=upstream_timeout, limits=limits
            )
        )
        baseline = Baseline(app)
        await baseline.take()
        assert await (await evil.connection(0)).closed_by_proxy()
        return app, evil, baseline

    yield start
    for evil in evils:
        await evil.close()


def _answer_once(raw: bytes) -> Behaviour:
    """Answer one request, then close (so the warm-up leaves no pooled connection)."""

    async def behaviour(conn: EvilConnection) -> None:
        await conn.read_head()
        conn.send(raw)
        await conn.writer.drain()
        conn.close()

    return behaviour


# -- request line, header section and body -------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (get(b"http://inventory.internal/" + b"a" * 990), 200),
        (get(b"http://inventory.internal/" + b"a" * 1000), 414),
        (get(b"http://inventory.internal/?" + b"q" * 100_000), 414),
        (get(b"http://inventory.internal/x", *[b"X-Fill: " + b"f" * 1000] * 3), 200),
        (get(b"http://inventory.internal/x", *[b"X-Fill: " + b"f" * 1000] * 5), 431),
        (get(b"http://inventory.internal/x", b"X-Big: " + b"b" * 5000), 431),
        (get(b"http://inventory.internal/x", *[b"X-N: 1"] * 19), 200),
        (get(b"http://inventory.internal/x", *[b"X-N: 1"] * 20), 431),
        (get(b"http://inventory.internal/x", *[b"X-N: 1"] * 5000), 431),
        (post(b"Content-Length: 1000", body=b"b" * 1000), 200),
        (
            post(b"Transfer-Encoding: chunked", body=b"3e8\r\n" + b"b" * 1000 + b"\r\n0\r\n\r\n"),
            200,
        ),
    ],
    ids=[
        "line-under",
        "line-over",
        "line-100k",
        "headers-under",
        "headers-over",
        "one-header-over",
        "count-at-limit",
        "count-over",
        "count-5000",
        "body-at-limit",
        "chunked-at-limit",
    ],
)
async def test_request_size_limits(
    limited: Limited, upstream: Upstream, raw: bytes, status: int
) -> None:
    app, baseline = await limited()
    before = len(upstream.received)
    response, _ = await roundtrip(app.port, raw, close_within=0)
    assert response.status == status
    if status == 200:
        assert len(upstream.received) == before + 1
    else:
        assert response.error == "bad_request"
        assert response.header("Connection") == "close"
        assert len(upstream.received) == before
    await baseline.check()


async def test_the_connection_is_closed_after_a_limit_error(limited: Limited) -> None:
    # A long header timeout, so that the sweeper does not close it instead.
    app, baseline = await limited(LimitsConfig(max_request_line=1024, header_timeout=30.0))
    response, closed = await roundtrip(
        app.port, get(b"http://inventory.internal/" + b"a" * 2000), close_within=AT_ONCE
    )
    assert response.status == 414
    assert closed
    await baseline.check()


async def test_an_endless_header_field_is_431_long_before_the_header_timeout(
    limited: Limited,
) -> None:
    app, baseline = await limited(LimitsConfig(max_header_size=4096, header_timeout=30.0))
    async with await RawClient.connect(app.port) as client:
        client.send(b"GET http://inventory.internal/x HTTP/1.1\r\nHost: inventory.internal\r\n")
        client.send(b"X-Endless: ")
        sent = 0
        started = time.monotonic()
        while not client.received and time.monotonic() - started < 3.0 and sent < 4 << 20:
            await client.send_drained(b"e" * 16384)
            sent += 16384
            await client.silent_for(0.001)
        response = await client.response(within=1.0)
        assert response.status == 431
        assert await client.closed(2.0)
    assert sent < 1 << 20
    await baseline.check()


async def test_an_oversized_head_arriving_in_one_read_is_431_at_once(limited: Limited) -> None:
    app, baseline = await limited(
        LimitsConfig(max_request_line=1024, max_header_size=4096, header_timeout=30.0)
    )
    # An unfinished head of four times the limits, small enough to arrive in one read.
    raw = get(b"http://inventory.internal/x", b"X-Endless: " + b"e" * 20_000)[:-4]
    response, closed = await roundtrip(app.port, raw, within=AT_ONCE, close_within=AT_ONCE)
    assert response.status == 431
    assert closed
    await baseline.check()


async def test_pipelined_requests_filling_a_read_are_not_taken_for_a_large_head(
    limited: Limited, upstream: Upstream
) -> None:
    app, baseline = await limited(LimitsConfig(max_header_size=4096, max_request_line=1024))
    one = get(b"http://inventory.internal/x", b"X-Fill: " + b"f" * 3000)
    with_body = post(b"Content-Length: 6000", body=b"b" * 6000)
    pipeline = (one + with_body) * 4 + one
    before = len(upstream.received)
    async with await RawClient.connect(app.port) as client:
        client.send(pipeline[:-100])  # the last head ends in the next read
        client.send(pipeline[-100:])
        statuses = [(await client.final_response()).status for _ in range(9)]
    assert statuses == [200] * 9
    assert len(upstream.received) == before + 9
    await baseline.check()


@pytest.mark.parametrize(
    "raw",
    [
        post(b"Content-Length: 1001", body=b"b" * 1001),
        post(b"Content-Length: 1000000000"),
        post(b"Content-Length: 1001", b"Expect: 100-continue"),
    ],
    ids=["sent", "declared-only", "expect-continue"],
)
async def test_a_declared_body_over_the_limit_is_413_before_anything_is_sent(
    evil_proxy: EvilProxy, raw: bytes
) -> None:
    app, evil, baseline = await evil_proxy(stall(), upstream_timeout=30.0)
    async with await RawClient.connect(app.port) as client:
        client.send(raw)
        response = await client.response(within=AT_ONCE)
        assert response.status == 413
        assert response.error == "bad_request"
        assert await client.closed(AT_ONCE)
    assert len(evil.connections) == 1  # only the warm-up
    await baseline.check()


@pytest.mark.parametrize("arrival", ["with-the-head", "after-the-head"])
async def test_a_chunked_body_over_the_limit_is_413_at_once_and_nothing_is_sent(
    evil_proxy: EvilProxy, arrival: str
) -> None:
    app, evil, baseline = await evil_proxy(stall(), upstream_timeout=30.0)
    first = b"258\r\n" + b"b" * 600 + b"\r\n"
    rest = b"258\r\n" + b"b" * 600 + b"\r\n0\r\n\r\n"
    async with await RawClient.connect(app.port) as client:
        if arrival == "after-the-head":
            # Within the limit so far, with a token at hand: the request is held (its
            # size is known at its end only), nothing goes upstream yet.
            client.send(post(b"Transfer-Encoding: chunked", body=first))
            assert await client.silent_for(0.3)
            client.send(rest)
        else:
            client.send(post(b"Transfer-Encoding: chunked", body=first + rest))
        response = await client.response(within=AT_ONCE)
        assert response.status == 413
        assert response.error == "bad_request"
        assert await client.closed(AT_ONCE)
    assert len(evil.connections) == 1  # only the warm-up: no head, no token went upstream
    await baseline.check()


async def test_a_chunked_body_over_the_limit_is_413_while_the_token_endpoint_hangs(
    start_proxy: StartProxy, token_server: TokenServer, upstream: Upstream
) -> None:
    token_server.set_failing("hang")
    app = await start_inventory(
        start_proxy, token_server, upstream, proxy={"unknown_hosts": "deny", "limits": LIMITS}
    )
    body = b"400\r\n" + b"b" * 1024 + b"\r\n0\r\n\r\n"
    async with await RawClient.connect(app.port) as client:
        client.send(post(b"Transfer-Encoding: chunked", body=body))
        response = await client.response(within=AT_ONCE)
        assert response.status == 413
        assert await client.closed(AT_ONCE)
    assert upstream.received == []


async def test_a_held_chunked_body_is_sent_whole_once_complete(
    limited: Limited, upstream: Upstream
) -> None:
    app, baseline = await limited()
    before = len(upstream.received)
    async with await RawClient.connect(app.port) as client:
        client.send(post(b"Transfer-Encoding: chunked", b"Expect: 100-continue"))
        # The proxy holds the body, so it asks for it itself.
        interim = await client.response(within=AT_ONCE)
        assert interim.status == 100
        client.send(b"1f4\r\n" + b"a" * 500 + b"\r\n")
        assert await client.silent_for(0.3)
        assert len(upstream.received) == before
        client.send(b"1f4\r\n" + b"b" * 500 + b"\r\n0\r\n\r\n")
        response = await client.final_response()
        assert response.status == 200
    seen = upstream.last()
    assert seen.body_size == 1000
    assert seen.all("Expect") == []  # the body comes with the head: nothing to expect
    await baseline.check()


# -- slow clients ----------------------------------------------------------------------------


async def test_a_refused_head_behind_a_slow_answer_lets_that_answer_finish(
    limited: Limited, upstream: Upstream
) -> None:
    app, baseline = await limited()
    slow = get(b"http://inventory.internal/slow/1")  # answered once `release` is set
    too_long = get(b"http://inventory.internal/" + b"a" * 2000)
    async with await RawClient.connect(app.port) as client:
        client.send(slow + too_long)
        # The refused head is no longer arriving: past its header timeout and a sweep,
        # the answer in front of it is still awaited, the connection still open.
        assert await client.silent_for(LIMITS.header_timeout + SWEEP_SLACK)
        upstream.release.set()
        first = await client.final_response()
        second = await client.final_response(within=AT_ONCE)
        assert await client.closed(AT_ONCE)
    assert (first.status, second.status) == (200, 414)
    await baseline.check()


async def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(
    limited: Limited,
) -> None:
    app, baseline = await limited()
    started = time.monotonic()
    async with await RawClient.connect(app.port) as client:
        assert await client.closed(LIMITS.header_timeout + SWEEP_SLACK)
        assert client.received == b""
    assert time.monotonic() - started >= LIMITS.header_timeout * 0.9
    await baseline.check()


async def test_a_head_trickled_byte_by_byte_is_cut_off_at_the_header_timeout(
    limited: Limited,
) -> None:
    app, baseline = await limited()
    trickle = get(b"http://inventory.internal/x", *[b"X-Slow: 1"] * 10)
    started = time.monotonic()
    async with await RawClient.connect(app.port) as client:

        async def slowloris() -> None:
            for byte in trickle:
                client.send(bytes([byte]))
                await asyncio.sleep(0.05)

        sender = asyncio.create_task(slowloris())
        try:
            # Every byte is new activity; the head's deadline still holds from its start.
            assert await client.closed(LIMITS.header_timeout + SWEEP_SLACK)
            assert await healthz_seconds(app.admin_port) < HEALTHZ_FAST
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
    assert time.monotonic() - started < len(trickle) * 0.05
    await baseline.check()


async def test_an_idle_keep_alive_connection_is_closed_after_the_idle_timeout(
    limited: Limited, upstream: Upstream
) -> None:
    app, baseline = await limited()
    async with await RawClient.connect(app.port) as client:
        client.send(get())
        assert (await client.final_response()).status == 200
        assert not await client.closed(LIMITS.idle_timeout * 0.5)  # kept alive for a while
        assert await client.closed(LIMITS.idle_timeout + SWEEP_SLACK)
    await baseline.check()


async def test_a_body_that_stops_arriving_ends_with_the_upstream_timeout(
    limited: Limited, upstream: Upstream
) -> None:
    app, baseline = await limited(timeout=1.0)
    async with await RawClient.connect(app.port) as client:
        client.send(post(b"Content-Length: 100", body=b"0123456789"))
        response = await client.response(within=5.0)
        # The proxy has no request-body timeout of its own: the upstream waits for the
        # body, and the upstream timeout answers for both.
        assert response.status == 504
        assert await client.closed(2.0)
    await baseline.check()


async def test_the_connection_cap_refuses_extra_connections_and_frees_slots(
    limited: Limited, upstream: Upstream
) -> None:
    app, baseline = await limited()
    refused = get(b"http://elsewhere.example/x")  # 403, keep-alive: the slot stays taken
    clients = [await RawClient.connect(app.port) for _ in range(LIMITS.max_connections)]
    try:
        for client in clients:
            client.send(refused)
            assert (await client.final_response()).status == 403
        async with await RawClient.connect(app.port) as extra:
            extra.send(refused)
            assert await extra.closed(2.0)
            assert extra.received == b""
        assert await healthz_seconds(app.admin_port) < HEALTHZ_FAST
        await clients.pop().close()
        deadline = time.monotonic() + 5.0
        while True:
            async with await RawClient.connect(app.port) as again:
                again.send(get())
                try:
                    if (await again.final_response(within=2.0)).status == 200:
                        break
                except AssertionError:
                    pass  # refused: the freed slot is not counted free yet
            assert time.monotonic() < deadline, "a freed slot was never reused"
            await asyncio.sleep(0.05)
    finally:
        for client in clients:
            await client.close()
    await baseline.check()


# -- upstreams that do not answer --------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [b"", b"HTTP/1.1 200 OK\r\nX-Partial: 1\r\n"],
    ids=["nothing", "half-a-head"],
)
async def test_an_upstream_that_never_finishes_its_head_is_504(
    evil_proxy: EvilProxy, raw: bytes
) -> None:
    app, evil, baseline = await evil_proxy(stall(raw), upstream_timeout=1.0)
    started = time.monotonic()
    response, _ = await roundtrip(app.port, get(), within=5.0, close_within=0)
    assert response.status == 504
    assert response.error == "upstream_timeout"
    assert time.monotonic() - started < 4.0
    assert await (await evil.connection(1)).closed_by_proxy(2.0)
    await baseline.check()


def trickle_head(conn_delay: float = 0.1) -> Behaviour:
    """Answer with a response head one byte at a time, forever."""

    async def behaviour(conn: EvilConnection) -> None:
        await conn.read_head()
        conn.send(b"HTTP/1.1 200 OK\r\nX-Trickle: ")
        while not conn.writer.is_closing():
            conn.send(b"t")
            await conn.writer.drain()
            await asyncio.sleep(conn_delay)

    return behaviour


async def test_an_upstream_trickling_its_head_still_times_out(evil_proxy: EvilProxy) -> None:
    app, evil, baseline = await evil_proxy(trickle_head(), upstream_timeout=1.0)
    response, _ = await roundtrip(app.port, get(), within=4.0, close_within=0)
    assert response.status == 504
    assert await (await evil.connection(1)).closed_by_proxy(2.0)
    await baseline.check()


async def test_an_upstream_stalling_mid_body_cuts_the_client_off(evil_proxy: EvilProxy) -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789"
    app, evil, baseline = await evil_proxy(stall(head), upstream_timeout=1.0)
    async with await RawClient.connect(app.port) as client:
        client.send(get())
        response = await client.response(within=5.0)
        assert (response.status, response.complete, response.body) == (200, False, b"0123456789")
    assert await (await evil.connection(1)).closed_by_proxy(2.0)
    await baseline.check()


@pytest.mark.parametrize("path", ["general", "fast"])
async def test_a_client_that_resets_frees_the_upstream_connection_at_once(
    evil_proxy: EvilProxy, path: str
) -> None:
    behaviour = answer_then_stall() if path == "fast" else stall()
    app, evil, baseline = await evil_proxy(behaviour, upstream_timeout=30.0)
    if path == "fast":
        # A body-less request on a warm pooled connection is relayed in callbacks.
        response, _ = await roundtrip(app.port, get(), close_within=0)
        assert response.status == 200
    client = await RawClient.connect(app.port)
    client.send(get(b"http://inventory.internal/stalls"))
    conn = await evil.connection(1)
    await conn.until_heads(2 if path == "fast" else 1)
    client.reset()
    assert await conn.closed_by_proxy(AT_ONCE)
    await baseline.check()


def answer_then_stall() -> Behaviour:
    """Answer the first request (keep-alive, so the connection is pooled), then go silent."""

    async def behaviour(conn: EvilConnection) -> None:
        await conn.read_head()
        conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await conn.writer.drain()
        await conn.read_head(within=30.0)

    return behaviour


async def test_a_client_that_half_closes_is_still_answered_within_the_upstream_timeout(
    evil_proxy: EvilProxy,
) -> None:
    # A FIN may be a client that gave up or one that half-closed and still reads
    # (RFC 9112 §9.6 allows both): the proxy keeps the exchange until the upstream
    # answers or its timeout, so the upstream connection is held for at most `timeout`.
    app, evil, baseline = await evil_proxy(stall(), upstream_timeout=1.0)
    async with await RawClient.connect(app.port) as client:
        client.send(get())
        conn = await evil.connection(1)
        await conn.until_heads(1)
        client.half_close()
        response = await client.response(within=4.0)
        assert response.status == 504
        assert await client.closed(2.0)
    assert await conn.closed_by_proxy(2.0)
    await baseline.check()


def endless_stream(interval: float = 0.02) -> Behaviour:
    """A chunked response that never ends (server-sent events, say)."""

    async def behaviour(conn: EvilConnection) -> None:
        await conn.read_head()
        conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        while not conn.writer.is_closing():
            conn.send(b"6\r\nevent\n\r\n")
            await conn.writer.drain()
            await asyncio.sleep(interval)

    return behaviour


async def test_a_client_leaving_an_endless_stream_frees_the_upstream(
    evil_proxy: EvilProxy,
) -> None:
    app, evil, baseline = await evil_proxy(endless_stream(), upstream_timeout=30.0)
    async with await RawClient.connect(app.port) as client:
        client.send(get())
        response_started = await _first_bytes(client)
        assert response_started.startswith(b"HTTP/1.1 200")
    assert await (await evil.connection(1)).closed_by_proxy(2.0)
    await baseline.check()


def big_body(total: int, written: list[int]) -> Behaviour:
    """A `total`-byte response written as fast as the proxy takes it; counts in `written`."""

    async def behaviour(conn: EvilConnection) -> None:
        await conn.read_head()
        conn.send(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % total)
        block = b"z" * 65536
        while written[0] < total:
            conn.send(block)
            await conn.writer.drain()
            written[0] += len(block)
        conn.close()

    return behaviour


async def test_a_client_that_reads_late_holds_back_the_upstream(evil_proxy: EvilProxy) -> None:
    total, written = 64 << 20, [0]
    patient = LimitsConfig(idle_timeout=30.0)  # a client that reads late is not cut off
    app, _, baseline = await evil_proxy(
        big_body(total, written), upstream_timeout=30.0, limits=patient
    )
    async with await RawClient.connect(app.port) as client:
        client.send(get())
        # The client reads nothing; once the upstream's writes stall, back-pressure held:
        # what it could write is bounded by socket buffers, not by the response size.
        assert await _stops_growing(lambda: written[0], within=10.0)
        assert written[0] < 40 << 20
        response = await client.response(within=20.0)
        assert response.complete
        assert len(response.body) == total
    await baseline.check()


async def test_a_client_that_never_reads_is_cut_off_after_the_idle_timeout(
    evil_proxy: EvilProxy,
) -> None:
    total, written = 256 << 20, [0]
    app, evil, baseline = await evil_proxy(big_body(total, written), upstream_timeout=30.0)
    async with await RawClient.connect(app.port) as client:
        client.send(get())
        assert await _stops_growing(lambda: written[0], within=10.0)
        # Not reading at all: the proxy gives up on the client and frees the upstream.
        assert await (await evil.connection(1)).closed_by_proxy(
            LIMITS.idle_timeout + SWEEP_SLACK + 2.0
        )
    assert written[0] < total
    await baseline.check()


async def _first_bytes(client: RawClient) -> bytes:
    deadline = time.monotonic() + 5.0
    while not client.received and time.monotonic() < deadline:
        if await client.closed(0.05):
            break
    return bytes(client.received)


async def _stops_growing(measure: Callable[[], int], *, within: float) -> bool:
    """Whether `measure()` stays the same for 0.3 s at some point within `within` seconds."""
    deadline = time.monotonic() + within
    value, since = measure(), time.monotonic()
    while time.monotonic() < deadline:
        await asyncio.sleep(0.02)
        now = measure()
        if now != value:
            value, since = now, time.monotonic()
        elif value and time.monotonic() - since >= 0.3:
            return True
    return False
