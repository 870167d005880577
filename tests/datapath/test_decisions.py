"""What an upstream's answer means, on both request paths.

The proxy serves a request on one of two paths that must conclude the same:

* the fast path (callbacks only) takes a body-less request when the provider holds a
  token and the pool an idle keep-alive connection to the upstream. Each `fast` case
  first sends one request that the scripted upstream answers on the connection it then
  keeps, so that the request under test finds it idle in the pool;
* the coroutine path takes everything else. Each `coroutine` case forces it by what
  the fast path never takes: no idle connection yet (the request under test is the
  first one), a request body, or TRACE (which carries no token).

Every case is parametrised over both and says, in its id, which one it drives. The
upstream is a scripted TCP server (`EvilUpstream`); the token endpoint is real.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from proxy.app import ProxyApp
from tests.support.configs import StartProxy, scripted_inventory
from tests.support.rawhttp import (
    Behaviour,
    EvilConnection,
    EvilUpstream,
    RawClient,
    RawResponse,
    answer,
    answer_each,
    close_at_once,
    roundtrip,
    stall,
)
from tests.support.token_server import TokenServer

pytestmark = pytest.mark.timeout(60)

PATHS = ["fast", "coroutine"]
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
UNAUTHORIZED = b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 6\r\n\r\nrefuse"


def request(
    method: bytes = b"GET",
    path: bytes = b"/x",
    *lines: bytes,
    body: bytes = b"",
    version: bytes = b"HTTP/1.1",
) -> bytes:
    """A request to the configured host through the forward-proxy port."""
    start = method + b" http://inventory.internal" + path + b" " + version
    if body:
        lines = (*lines, b"Content-Length: %d" % len(body))
    return b"\r\n".join([start, b"Host: inventory.internal", *lines]) + b"\r\n\r\n" + body


def authorization(head: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.lower() == b"authorization":
            return value.strip()
    return None


def on_path(path: str, behaviour: Behaviour) -> Behaviour:
    """`behaviour` for the request under test; on the fast path, the first request on
    the connection is answered with 200 first and the connection kept for it."""
    if path == "coroutine":
        return behaviour

    async def warmed(conn: EvilConnection) -> None:
        await conn.read_head()
        conn.send(OK)
        await conn.writer.drain()
        await behaviour(conn)

    return warmed


Scenario = Callable[..., Awaitable[tuple[ProxyApp, EvilUpstream]]]


@pytest.fixture
async def scenario(start_proxy: StartProxy, token_server: TokenServer) -> AsyncIterator[Scenario]:
    """A scripted upstream and a proxy sending inventory.internal to it, ready for `path`:
    on the fast path the warm-up request has been answered (a token is held and the
    upstream connection sits idle in the pool)."""
    evils: list[EvilUpstream] = []

    async def start(
        path: str, *behaviours: Behaviour, upstream_timeout: float = 30.0
    ) -> tuple[ProxyApp, EvilUpstream]:
        first, *rest = behaviours
        evil = EvilUpstream(on_path(path, first), *rest)
        await evil.__aenter__()
        evils.append(evil)
        app = await start_proxy(
            scripted_inventory(token_server, evil.url, upstream_timeout=upstream_timeout)
        )
        if path == "fast":
            warm_up, _ = await roundtrip(app.port, request(path=b"/warm-up"), close_within=0)
            assert warm_up.status == 200
        return app, evil

    yield start
    for evil in evils:
        await evil.close()


async def exchange(app: ProxyApp, data: bytes, within: float = 10.0) -> RawResponse:
    response, _ = await roundtrip(app.port, data, within, close_within=0)
    return response


# -- 101 without an upgrade -------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
async def test_a_101_nobody_asked_for_is_502_and_its_connection_dropped(
    scenario: Scenario, path: str
) -> None:
    switch = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n"
    app, evil = await scenario(path, answer(switch))
    response = await exchange(app, request())
    assert (response.status, response.error) == (502, "upstream_unreachable")
    assert await (await evil.connection(0)).closed_by_proxy()


# -- 401 to our token: drop it, replay once with a new one ----------------------------------


@pytest.mark.parametrize("path", PATHS)
async def test_a_401_to_our_token_is_replayed_once_with_a_new_token(
    scenario: Scenario, path: str, token_server: TokenServer
) -> None:
    app, evil = await scenario(path, answer(UNAUTHORIZED), answer_each(OK))
    response = await exchange(app, request())
    assert (response.status, response.body) == (200, b"ok")
    refused, replayed = evil.connections[0].heads[-1], evil.connections[1].heads[0]
    assert authorization(refused) == b"Bearer " + token_server.issued[0].encode()
    assert authorization(replayed) == b"Bearer " + token_server.issued[1].encode()
    assert (
        app.metrics.registry.get_sample_value(
            "token_proxy_upstream_unauthorized_retries_total", {"upstream": "inventory"}
        )
        == 1.0
    )


@pytest.mark.parametrize("path", PATHS)
async def test_a_401_to_the_replay_is_relayed(scenario: Scenario, path: str) -> None:
    app, evil = await scenario(path, answer(UNAUTHORIZED), answer(UNAUTHORIZED))
    response = await exchange(app, request())
    assert (response.status, response.body) == (401, b"refuse")
    assert len(evil.heads) == (3 if path == "fast" else 2)  # (the warm-up's, then) two


@pytest.mark.parametrize("path", PATHS)
async def test_a_401_to_a_post_is_relayed_not_replayed(scenario: Scenario, path: str) -> None:
    # POST is not idempotent (RFC 9110 §9.2.2): it is sent once. The fast path takes a
    # POST without a body; one with a body takes the coroutine path.
    app, evil = await scenario(path, answer(UNAUTHORIZED), answer_each(OK))
    body = b"" if path == "fast" else b"order=1"
    response = await exchange(app, request(b"POST", body=body))
    assert (response.status, response.body) == (401, b"refuse")
    assert len(evil.connections) == 1


@pytest.mark.parametrize("path", PATHS)
async def test_a_replay_that_cannot_reach_the_upstream_is_answered_502(
    scenario: Scenario, path: str
) -> None:
    app, _ = await scenario(path, answer(UNAUTHORIZED), close_at_once())
    async with await RawClient.connect(app.port) as client:
        client.send(request())
        response = await client.final_response()
        assert (response.status, response.error) == (502, "upstream_unreachable")


# -- a stale keep-alive connection: send again on a fresh one ------------------------------


def close_on_next_request() -> Behaviour:
    """Answer one request, keep the connection, then close it on reading the next head,
    answering nothing (an upstream whose keep-alive timeout struck as the request came)."""

    async def behaviour(conn: EvilConnection) -> None:
        await conn.read_head()
        conn.send(OK)
        await conn.writer.drain()
        await conn.read_head(within=30.0)
        conn.close()

    return behaviour


async def _through_stale_connection(app: ProxyApp, data: bytes) -> RawResponse:
    """Pool the upstream connection with one request, then send `data` on it."""
    first = await exchange(app, request(path=b"/pools-the-connection"))
    assert first.status == 200
    return await exchange(app, data)


@pytest.mark.parametrize(
    ("path", "method"), [("fast", b"GET"), ("coroutine", b"TRACE")], ids=["fast", "coroutine"]
)
async def test_a_stale_keep_alive_connection_is_retried_on_a_fresh_one(
    scenario: Scenario, path: str, method: bytes
) -> None:
    # Both paths start cold here; TRACE never takes the fast path.
    app, evil = await scenario("coroutine", close_on_next_request(), answer_each(OK))
    response = await _through_stale_connection(app, request(method))
    assert (response.status, response.body) == (200, b"ok")
    assert [len(conn.heads) for conn in evil.connections] == [2, 1]


@pytest.mark.parametrize("path", PATHS)
async def test_a_stale_keep_alive_connection_is_not_retried_for_a_post(
    scenario: Scenario, path: str
) -> None:
    # On the fast path, a POST without a body; on the coroutine path, one with a body.
    app, evil = await scenario("coroutine", close_on_next_request(), answer_each(OK))
    body = b"" if path == "fast" else b"order=1"
    response = await _through_stale_connection(app, request(b"POST", body=body))
    assert (response.status, response.error) == (502, "upstream_unreachable")
    assert len(evil.connections) == 1


@pytest.mark.parametrize("path", PATHS)
async def test_an_upstream_that_answered_part_of_a_head_is_not_retried(
    scenario: Scenario, path: str
) -> None:
    async def half_a_head_then_reset(conn: EvilConnection) -> None:
        await conn.read_head()
        conn.send(b"HTTP/1.1 200 OK\r\nContent-")
        await conn.writer.drain()
        conn.reset()

    app, evil = await scenario(path, half_a_head_then_reset, answer_each(OK))
    response = await exchange(app, request())
    assert (response.status, response.error) == (502, "upstream_unreachable")
    assert len(evil.connections) == 1


# -- the client goes away, or the response is cut short -----------------------------------


def endless_stream() -> Behaviour:
    """A chunked response that never ends (server-sent events, say)."""

    async def behaviour(conn: EvilConnection) -> None:
        await conn.read_head()
        conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        while not conn.writer.is_closing():
            conn.send(b"6\r\nevent\n\r\n")
            await conn.writer.drain()
            await asyncio.sleep(0.02)

    return behaviour


@pytest.mark.parametrize("path", PATHS)
async def test_a_client_leaving_mid_response_frees_the_upstream(
    scenario: Scenario, path: str
) -> None:
    app, evil = await scenario(path, endless_stream())
    async with await RawClient.connect(app.port) as client:
        client.send(request())
        while b"event" not in client.received:  # the response has begun
            assert not await client.closed(0.05)
        assert client.received.startswith(b"HTTP/1.1 200 OK\r\n")
    assert await (await evil.connection(0)).closed_by_proxy(2.0)


@pytest.mark.parametrize("path", PATHS)
async def test_an_upstream_stalling_mid_body_cuts_the_response_short(
    scenario: Scenario, path: str
) -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789"
    app, evil = await scenario(path, stall(head), upstream_timeout=1.0)
    async with await RawClient.connect(app.port) as client:
        client.send(request())
        response = await client.response(within=5.0)
        assert (response.status, response.complete, response.body) == (200, False, b"0123456789")
        assert await client.closed(2.0)
    assert await (await evil.connection(0)).closed_by_proxy(2.0)


# -- framing for the client: re-chunking and keep-alive -------------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "upstream_body",
    [
        b"Transfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nX-Trailer: t\r\n\r\n",
        b"Connection: close\r\n\r\nhello",
    ],
    ids=["chunked", "close-delimited"],
)
async def test_a_body_without_a_length_is_rechunked_for_http11_clients(
    scenario: Scenario, path: str, upstream_body: bytes
) -> None:
    app, _ = await scenario(path, answer(b"HTTP/1.1 200 OK\r\n" + upstream_body, then_close=True))
    async with await RawClient.connect(app.port) as client:
        client.send(request())
        response = await client.response()
        assert (response.status, response.body, response.complete) == (200, b"hello", True)
        assert response.header("Transfer-Encoding") == "chunked"
        assert response.header("Content-Length") is None


@pytest.mark.parametrize("path", PATHS)
async def test_a_body_without_a_length_is_close_delimited_for_http10_clients(
    scenario: Scenario, path: str
) -> None:
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    app, _ = await scenario(path, answer(chunked))
    async with await RawClient.connect(app.port) as client:
        client.send(request(b"GET", b"/x", b"Connection: keep-alive", version=b"HTTP/1.0"))
        response = await client.response()
        assert (response.status, response.body) == (200, b"hello")
        assert response.header("Transfer-Encoding") is None
        assert response.header("Connection") == "close"
        assert await client.closed(2.0)


@pytest.mark.parametrize("path", PATHS)
async def test_a_length_delimited_body_keeps_the_client_connection(
    scenario: Scenario, path: str
) -> None:
    # Two requests on one client connection: the second is answered, so the first left
    # it open. (After the first, the pool is warm: a body keeps PUT on the coroutine path.)
    app, _ = await scenario(path, answer_each(OK))
    data = request() if path == "fast" else request(b"PUT", body=b"1")
    async with await RawClient.connect(app.port) as client:
        for _ in range(2):
            client.send(data)
            response = await client.response()
            assert (response.status, response.body) == (200, b"ok")
            assert response.header("Content-Length") == "2"
            assert response.header("Connection") is None
