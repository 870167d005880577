"""Parsing and smuggling: ambiguous framing is refused, never forwarded and re-framed.

The proxy parses requests and responses with llhttp and writes its own framing for
each hop, so a message it forwards can only mean one thing to the next parser. These
cases throw the classic desynchronisation inputs at it (Content-Length with
Transfer-Encoding, duplicate or malformed lengths, obfuscated codings, bad chunks,
whitespace before the colon, obs-fold, bare CR/LF, NUL) in requests from the client
and in responses from a scripted upstream, and assert the answer, what the upstream
received, and which connections were closed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from proxy.app import ProxyApp
from tests.support.configs import (
    StartProxy,
    proxy_config,
    scripted_inventory,
    token_config,
    upstream_config,
)
from tests.support.rawhttp import (
    Behaviour,
    EvilConnection,
    EvilUpstream,
    RawClient,
    answer,
    answer_each,
    has_header,
    reset_after_head,
    roundtrip,
    stall,
)
from tests.support.token_server import TokenServer
from tests.support.upstream import Upstream

pytestmark = pytest.mark.timeout(60)

TARGET = b"http://inventory.internal/x"
# What the proxy answers itself, from what it already has, comes within this.
AT_ONCE = 1.0


def head(*lines: bytes, method: bytes = b"POST", version: bytes = b"HTTP/1.1") -> bytes:
    """A request head to the configured host with `lines` as its header lines, raw."""
    start = method + b" " + TARGET + b" " + version
    return b"\r\n".join([start, b"Host: inventory.internal", *lines]) + b"\r\n\r\n"


@pytest.fixture
async def named(start_proxy: StartProxy, token_server: TokenServer, upstream: Upstream) -> ProxyApp:
    return await start_proxy(
        proxy_config(
            upstream_config(
                "inventory", ["inventory.internal"], token_config(token_server), url=upstream.url
            ),
            unknown_hosts="deny",
            shutdown_grace_period=0.5,
        )
    )


EvilProxy = Callable[..., Awaitable[tuple[ProxyApp, EvilUpstream]]]


@pytest.fixture
async def evil_proxy(
    start_proxy: StartProxy, token_server: TokenServer
) -> AsyncIterator[EvilProxy]:
    """Start a scripted upstream with `behaviours` and a proxy sending inventory.internal to it."""
    evils: list[EvilUpstream] = []

    async def start(
        *behaviours: Behaviour, upstream_timeout: float = 30.0
    ) -> tuple[ProxyApp, EvilUpstream]:
        evil = EvilUpstream(*behaviours)
        await evil.__aenter__()
        evils.append(evil)
        app = await start_proxy(
            scripted_inventory(token_server, evil.url, upstream_timeout=upstream_timeout)
        )
        return app, evil

    yield start
    for evil in evils:
        await evil.close()


# -- request heads llhttp refuses: 400 before anything is sent --------------------------

REFUSED_HEADS = {
    # Content-Length and Transfer-Encoding together: the CL.TE / TE.CL desync.
    "cl-te": head(b"Content-Length: 5", b"Transfer-Encoding: chunked") + b"0\r\n\r\n",
    "te-cl": head(b"Transfer-Encoding: chunked", b"Content-Length: 5") + b"0\r\n\r\n",
    "cl-te-0": head(b"Content-Length: 0", b"Transfer-Encoding: chunked") + b"0\r\n\r\n",
    # Duplicate or malformed Content-Length.
    "cl-twice-same": head(b"Content-Length: 5", b"Content-Length: 5") + b"hello",
    "cl-twice-different": head(b"Content-Length: 5", b"Content-Length: 6") + b"hello!",
    "cl-list": head(b"Content-Length: 5, 5") + b"hello",
    "cl-plus": head(b"Content-Length: +5") + b"hello",
    "cl-negative": head(b"Content-Length: -5") + b"hello",
    "cl-hex": head(b"Content-Length: 0x5") + b"hello",
    "cl-inner-space": head(b"Content-Length: 1 5") + b"hello",
    "cl-overflow": head(b"Content-Length: 184467440737095516160") + b"hello",
    "cl-empty": head(b"Content-Length: ") + b"hello",
    # Obfuscated Transfer-Encoding.
    "te-not-last": head(b"Transfer-Encoding: chunked, identity") + b"0\r\n\r\n",
    "te-twice": head(b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked") + b"0\r\n\r\n",
    "te-space-before-colon": head(b"Transfer-Encoding : chunked") + b"0\r\n\r\n",
    "te-vertical-tab": head(b"Transfer-Encoding:\x0bchunked") + b"0\r\n\r\n",
    "te-obs-fold": head(b"Transfer-Encoding:", b" chunked") + b"0\r\n\r\n",
    "te-nul": head(b"Transfer-Encoding: chunked\x00") + b"0\r\n\r\n",
    # Field syntax (RFC 9112 §5).
    "space-before-colon": head(b"X-Test : 1"),
    "tab-before-colon": head(b"X-Test\t: 1"),
    "obs-fold": head(b"X-Test: a", b" b"),
    "leading-whitespace-field": head(b" X-Test: 1"),
    "no-colon": head(b"X-Test 1"),
    "empty-name": head(b": 1"),
    "bad-name-char": head(b"X(Test): 1"),
    "nul-in-value": head(b"X-Test: a\x00b"),
    "cr-in-value": head(b"X-Test: a\rb"),
    "del-in-value": head(b"X-Test: a\x7fb"),
    "ctl-in-value": head(b"X-Test: a\x01b"),
    "bare-lf": b"GET http://inventory.internal/x HTTP/1.1\nHost: inventory.internal\n\n",
    "bare-lf-field": head(b"X-Test: 1\nX-Other: 2"),
    "bare-cr-line": b"GET http://inventory.internal/x HTTP/1.1\rHost: inventory.internal\r\n\r\n",
    # Request lines.
    "method-lowercase": b"get http://inventory.internal/x HTTP/1.1\r\nHost: a\r\n\r\n",
    "method-unknown": b"FOO http://inventory.internal/x HTTP/1.1\r\nHost: a\r\n\r\n",
    "method-tab": b"GET\thttp://inventory.internal/x HTTP/1.1\r\nHost: a\r\n\r\n",
    "version-1.2": b"GET http://inventory.internal/x HTTP/1.2\r\nHost: a\r\n\r\n",
    "version-lowercase": b"GET http://inventory.internal/x http/1.1\r\nHost: a\r\n\r\n",
    "version-garbage": b"GET http://inventory.internal/x HTTP/x.y\r\nHost: a\r\n\r\n",
    "target-space": b"GET http://inventory.internal/x y HTTP/1.1\r\nHost: a\r\n\r\n",
    "target-nul": b"GET http://inventory.internal/x\x00 HTTP/1.1\r\nHost: a\r\n\r\n",
    "target-non-ascii": b"GET http://inventory.internal/\xff HTTP/1.1\r\nHost: a\r\n\r\n",
    "target-backslash": b"GET http://inventory.internal\\x HTTP/1.1\r\nHost: a\r\n\r\n",
    "target-authority-form": b"GET inventory.internal:80 HTTP/1.1\r\nHost: a\r\n\r\n",
    # Ports.
    "port-zero": b"GET http://inventory.internal:0/x HTTP/1.1\r\nHost: a\r\n\r\n",
    "port-too-big": b"GET http://inventory.internal:65536/x HTTP/1.1\r\nHost: a\r\n\r\n",
    "port-huge": b"GET http://inventory.internal:99999999999/x HTTP/1.1\r\nHost: a\r\n\r\n",
    "port-letters": b"GET http://inventory.internal:80a/x HTTP/1.1\r\nHost: a\r\n\r\n",
    "port-negative": b"GET http://inventory.internal:-1/x HTTP/1.1\r\nHost: a\r\n\r\n",
    "port-empty-host": b"GET http://:80/x HTTP/1.1\r\nHost: a\r\n\r\n",
    "connect-no-port": b"CONNECT inventory.internal HTTP/1.1\r\nHost: a\r\n\r\n",
    "connect-bad-port": b"CONNECT inventory.internal:443x HTTP/1.1\r\nHost: a\r\n\r\n",
}


@pytest.mark.parametrize("raw", REFUSED_HEADS.values(), ids=REFUSED_HEADS.keys())
async def test_ambiguous_or_malformed_requests_are_refused_with_400(
    named: ProxyApp, upstream: Upstream, raw: bytes
) -> None:
    response, _ = await roundtrip(named.port, raw, close_within=0)
    assert response.status == 400
    assert response.error == "bad_request"
    assert response.header("Connection") == "close"
    assert upstream.received == []


@pytest.mark.parametrize("case", ["cl-te", "obs-fold", "bare-lf", "target-authority-form"])
async def test_the_connection_is_closed_after_a_parse_error(
    named: ProxyApp, upstream: Upstream, case: str
) -> None:
    response, closed = await roundtrip(named.port, REFUSED_HEADS[case], close_within=AT_ONCE)
    assert response.status == 400
    assert closed
    assert upstream.received == []


PATCHED_HEADS = {
    # RFC 9112 §6.1: Transfer-Encoding in HTTP/1.0 means faulty framing.
    "te-in-http10": (
        head(b"Transfer-Encoding: chunked", version=b"HTTP/1.0") + b"5\r\nhello\r\n0\r\n\r\n",
        400,
    ),
    # llhttp accepts a coding before chunked; re-framing would silently drop it.
    "te-gzip-chunked": (head(b"Transfer-Encoding: gzip, chunked") + b"0\r\n\r\n", 501),
    # llhttp calls these invalid only after the head was handed over (and forwarded).
    "te-xchunked": (head(b"Transfer-Encoding: xchunked") + b"0\r\n\r\n", 501),
    "te-parameter": (head(b"Transfer-Encoding: chunked;q=1") + b"0\r\n\r\n", 501),
    "te-identity": (head(b"Transfer-Encoding: identity") + b"0\r\n\r\n", 501),
    "te-two-fields": (
        head(b"Transfer-Encoding: gzip", b"Transfer-Encoding: chunked") + b"0\r\n\r\n",
        501,
    ),
    # llhttp accepts any one-digit major version and HTTP/0.9-style request lines.
    "version-2.0": (head(method=b"GET", version=b"HTTP/2.0"), 505),
    "version-0.9": (b"GET http://inventory.internal/x\r\n\r\n", 505),
}


@pytest.mark.parametrize(("raw", "status"), PATCHED_HEADS.values(), ids=PATCHED_HEADS.keys())
async def test_framing_the_proxy_cannot_forward_faithfully_is_refused(
    evil_proxy: EvilProxy, raw: bytes, status: int
) -> None:
    app, evil = await evil_proxy(stall())
    response, closed = await roundtrip(app.port, raw, within=AT_ONCE, close_within=AT_ONCE)
    assert response.status == status
    assert response.error == "bad_request"
    assert closed
    assert evil.heads == []


async def test_a_refused_head_request_is_answered_with_a_head_only(
    evil_proxy: EvilProxy,
) -> None:
    app, evil = await evil_proxy(stall())
    reader, writer = await asyncio.open_connection("127.0.0.1", app.port)
    try:
        writer.write(head(method=b"HEAD", version=b"HTTP/2.0"))
        received = await asyncio.wait_for(reader.read(-1), timeout=AT_ONCE)  # until the close
    finally:
        writer.close()
    assert received.startswith(b"HTTP/1.1 505 ")
    assert received.endswith(b"\r\n\r\n")  # no content after a response to HEAD
    assert evil.heads == []


# -- bad bodies: refused before the head goes upstream, or cut off after it ----------------

BAD_CHUNKED_BODIES = {
    "size-not-hex": b"zz\r\nhello\r\n0\r\n\r\n",
    "size-0x": b"0x5\r\nhello\r\n0\r\n\r\n",
    "size-overflow": b"fffffffffffffffff\r\nhello\r\n0\r\n\r\n",
    "size-17-digits": b"00000000000000005\r\nhello\r\n0\r\n\r\n",
    "size-17-digits-later": b"5\r\nhello\r\n000000000000000005;x=y\r\nhello\r\n0\r\n\r\n",
    "size-trailing-space": b"5 \r\nhello\r\n0\r\n\r\n",
    "size-bare-lf": b"5\nhello\r\n0\r\n\r\n",
    "data-longer-than-size": b"3\r\nhello\r\n0\r\n\r\n",
    "extension-bare-lf": b"5;a\nb\r\nhello\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("body", BAD_CHUNKED_BODIES.values(), ids=BAD_CHUNKED_BODIES.keys())
async def test_a_malformed_chunked_body_with_the_head_never_reaches_the_upstream(
    evil_proxy: EvilProxy, body: bytes
) -> None:
    app, evil = await evil_proxy(stall())
    raw = head(b"Transfer-Encoding: chunked") + body
    response, closed = await roundtrip(app.port, raw, within=AT_ONCE, close_within=AT_ONCE)
    assert response.status == 400
    assert response.error == "bad_request"
    assert closed
    # What arrived with the head is checked before the head (and its token) is sent.
    assert evil.connections == []


@pytest.mark.parametrize("body", BAD_CHUNKED_BODIES.values(), ids=BAD_CHUNKED_BODIES.keys())
async def test_a_malformed_chunked_body_after_the_head_is_400_at_once_and_never_completed(
    evil_proxy: EvilProxy, body: bytes
) -> None:
    app, evil = await evil_proxy(stall())
    async with await RawClient.connect(app.port) as client:
        client.send(head(b"Transfer-Encoding: chunked"))
        conn = await evil.connection(0)
        await conn.until_heads(1)
        client.send(body)
        response = await client.response(within=AT_ONCE)
        assert response.status == 400
        assert response.error == "bad_request"
        assert await client.closed(AT_ONCE)
    assert await conn.closed_by_proxy(AT_ONCE)
    # The part of the request that went upstream never became a complete message.
    assert b"0\r\n\r\n" not in bytes(conn.rest)


@pytest.mark.parametrize("split", [1, 5, 19, 30], ids=lambda size: f"pieces-of-{size}")
async def test_a_long_chunk_size_split_across_reads_is_refused(
    evil_proxy: EvilProxy, split: int
) -> None:
    app, evil = await evil_proxy(stall())
    body = b"5\r\nhello\r\n0000000000000000005\r\nhello\r\n0\r\n\r\n"
    async with await RawClient.connect(app.port) as client:
        client.send(head(b"Transfer-Encoding: chunked"))
        conn = await evil.connection(0)
        await conn.until_heads(1)
        for start in range(0, len(body), split):
            await client.send_drained(body[start : start + split])
            if client.received:
                break
        response = await client.response(within=AT_ONCE)
        assert response.status == 400
    assert await conn.closed_by_proxy(AT_ONCE)
    assert b"0\r\n\r\n" not in bytes(conn.rest)


async def test_a_chunked_request_pipelined_behind_others_has_its_sizes_checked(
    named: ProxyApp, upstream: Upstream
) -> None:
    ok = head(b"Content-Length: 3") + b"abc"
    chunked = head(b"Transfer-Encoding: chunked")
    fine = chunked + b"0000000000000003\r\nabc\r\n0\r\nX-T: 1\r\n\r\n"
    bad = chunked + b"00000000000000003\r\nabc\r\n0\r\n\r\n"
    before = len(upstream.received)
    async with await RawClient.connect(named.port) as client:
        client.send(ok + fine + head(method=b"GET") + fine + bad + ok)
        statuses = [(await client.response()).status for _ in range(5)]
        assert await client.closed(AT_ONCE)
    assert statuses == [200, 200, 200, 200, 400]
    assert [seen.body_size for seen in upstream.received[before:]] == [3, 3, 0, 3]


# -- what the proxy accepts, and how it re-frames it -------------------------------------


async def test_chunked_body_is_reframed_without_extensions_or_trailers(
    evil_proxy: EvilProxy,
) -> None:
    seen = bytearray()

    async def record_chunked_body(conn: EvilConnection) -> None:
        await conn.read_head()
        seen.extend(await asyncio.wait_for(conn.reader.readuntil(b"0\r\n\r\n"), 10))
        conn.send(b"HTTP/1.1 204 No Content\r\n\r\n")

    app, evil = await evil_proxy(record_chunked_body)
    raw = head(b"Transfer-Encoding: Chunked") + (
        b"2;name=value\r\nhe\r\n3;x\r\nllo\r\n0;last\r\nX-Trailer: t\r\n\r\n"
    )
    response, _ = await roundtrip(app.port, raw, close_within=0)
    assert response.status == 204
    assert bytes(seen) == b"2\r\nhe\r\n3\r\nllo\r\n0\r\n\r\n"
    assert has_header(evil.heads[0], b"transfer-encoding")


@pytest.mark.parametrize(
    ("raw", "body"),
    [
        (head(b"Transfer-Encoding:\tchunked") + b"5\r\nhello\r\n0\r\n\r\n", "hello"),
        (head(b"Content-Length: 5 ") + b"hello", "hello"),
        (head(b"Content-Length:5") + b"hello", "hello"),
        (head(b"Content-Length: 05") + b"hello", "hello"),
        (head(b"Content-Length: 0"), ""),
        (head(b"Content-Length: 5", method=b"GET") + b"hello", "hello"),
        (b"\r\n" + head(b"Content-Length: 5") + b"hello", "hello"),  # RFC 9112 §2.2
        (
            head(b"Transfer-Encoding: chunked") + b"0000000000000005\r\nhello\r\n0\r\n\r\n",
            "hello",
        ),
        (
            b"POST  http://inventory.internal/x  HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
            "",
        ),
    ],
    ids=[
        "te-tab",
        "cl-trailing-space",
        "cl-no-space",
        "cl-leading-zero",
        "cl-zero",
        "get-body",
        "leading-crlf",
        "size-16-digits",
        "double-spaces",
    ],
)
async def test_tolerated_variants_are_forwarded_with_clean_framing(
    named: ProxyApp, upstream: Upstream, raw: bytes, body: str
) -> None:
    response, _ = await roundtrip(named.port, raw, close_within=0)
    assert response.status == 200
    assert response.json()["body"] == body
    seen = upstream.last()
    framing = seen.all("Content-Length") + seen.all("Transfer-Encoding")
    assert framing in ([str(len(body))], ["chunked"])


async def test_obs_text_in_a_value_is_forwarded_byte_for_byte(
    named: ProxyApp, upstream: Upstream
) -> None:
    raw = head(b"X-Test: caf\xe9 \xff", method=b"GET")
    response, _ = await roundtrip(named.port, raw, close_within=0)
    assert response.status == 200
    assert upstream.last().all("X-Test") == ["caf\xe9 \xff"]


# -- pipelining and bodies that look like requests ---------------------------------------


async def test_a_bad_request_in_a_pipeline_stops_the_pipeline(
    named: ProxyApp, upstream: Upstream
) -> None:
    good = head(b"Content-Length: 0", method=b"GET")
    bad = head(b"Content-Length: 5", b"Transfer-Encoding: chunked") + b"0\r\n\r\n"
    async with await RawClient.connect(named.port) as client:
        client.send(good + bad + good)
        first = await client.final_response()
        second = await client.final_response()
        assert (first.status, second.status) == (200, 400)
        assert second.header("Connection") == "close"
        assert await client.silent_for(0.3) or client.eof
    assert len(upstream.received) == 1


# Requests of either HTTP version, each with the answer that only its version gets: an
# HTTP/1.0 client asking for keep-alive is told so, an HTTP/1.1 one must send Host.
VERSIONED = [
    (
        b"\r\nGET http://inventory.internal/a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        200,
        "keep-alive",
    ),
    (b"GET http://inventory.internal/b HTTP/1.1\r\nHost: inventory.internal\r\n\r\n", 200, None),
    (
        b"GET http://inventory.internal/c HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        200,
        "keep-alive",
    ),
    (b"GET http://inventory.internal/HTTP/1.0 HTTP/1.1\r\n\r\n", 400, "close"),
]


@pytest.mark.parametrize("delivery", ["one-by-one", "pipelined", "byte-by-byte"])
async def test_each_request_is_read_at_its_own_http_version(
    named: ProxyApp, upstream: Upstream, delivery: str
) -> None:
    async with await RawClient.connect(named.port) as client:
        if delivery == "pipelined":
            client.send(b"".join(raw for raw, _, _ in VERSIONED))
        answers = []
        for raw, _, _ in VERSIONED:
            if delivery == "one-by-one":
                client.send(raw)
            elif delivery == "byte-by-byte":
                for index in range(len(raw)):
                    await client.send_drained(raw[index : index + 1])
            response = await client.final_response()
            answers.append((response.status, response.header("Connection")))
    assert answers == [(status, connection) for _, status, connection in VERSIONED]
    assert [seen.path for seen in upstream.received] == ["/a", "/b", "/c"]


async def test_a_head_read_together_with_a_long_body_is_read_at_its_version(
    named: ProxyApp, upstream: Upstream
) -> None:
    body = b"b" * 20000  # one read of head and body, longer than any request line
    raw = head(b"Content-Length: 20000", b"Connection: keep-alive", version=b"HTTP/1.0") + body
    async with await RawClient.connect(named.port) as client:
        client.send(raw)
        response = await client.final_response()
    assert (response.status, response.header("Connection")) == (200, "keep-alive")
    assert response.json()["body"] == body.decode()


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_request_inside_a_body_stays_a_body(
    named: ProxyApp, upstream: Upstream, framing: str
) -> None:
    inner = b"GET http://inventory.internal/smuggled HTTP/1.1\r\nHost: inventory.internal\r\n\r\n"
    if framing == "chunked":
        raw = head(b"Transfer-Encoding: chunked") + b"%x\r\n%b\r\n0\r\n\r\n" % (len(inner), inner)
    else:
        raw = head(b"Content-Length: %d" % len(inner)) + inner
    async with await RawClient.connect(named.port) as client:
        client.send(raw)
        response = await client.final_response()
        assert response.status == 200
        assert response.json()["body"] == inner.decode()
        assert await client.silent_for(0.3)
    assert [seen.path for seen in upstream.received] == ["/x"]


# -- Expect: 100-continue ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "status", "error"),
    [
        (b"http://evil.example/x", 403, "host_not_allowed"),
        (b"/x", 400, "bad_request"),
        (b"http://inventory.internal:8080/x", 403, "host_not_allowed"),
    ],
)
async def test_expect_100_continue_on_a_refused_request_gets_the_final_answer_at_once(
    named: ProxyApp, upstream: Upstream, target: bytes, status: int, error: str
) -> None:
    raw = (
        b"POST " + target + b" HTTP/1.1\r\nHost: inventory.internal\r\n"
        b"Expect: 100-continue\r\nContent-Length: 5\r\n\r\n"
    )
    async with await RawClient.connect(named.port) as client:
        client.send(raw)  # and no body: a client waits for 100 before sending it
        response = await client.response(within=3.0)
        assert (response.status, response.error) == (status, error)
        assert response.header("Connection") == "close"
        assert await client.closed(3.0)
    assert upstream.received == []


async def test_expect_100_continue_when_no_token_can_be_had(
    start_proxy: StartProxy, token_server: TokenServer, upstream: Upstream
) -> None:
    token_server.set_failing("500")
    app = await start_proxy(
        proxy_config(
            upstream_config(
                "inventory", ["inventory.internal"], token_config(token_server), url=upstream.url
            )
        )
    )
    async with await RawClient.connect(app.port) as client:
        client.send(head(b"Expect: 100-continue", b"Content-Length: 5"))
        response = await client.response(within=8.0)
        assert response.status == 503
        assert response.error == "token_unavailable"
        assert int(response.header("Retry-After") or "0") >= 1
        assert await client.closed(3.0)
    assert upstream.received == []


async def test_expect_100_continue_is_relayed_for_a_forwarded_request(
    named: ProxyApp, upstream: Upstream
) -> None:
    async with await RawClient.connect(named.port) as client:
        client.send(head(b"Expect: 100-continue", b"Content-Length: 5"))
        interim = await client.response()
        assert interim.status == 100
        client.send(b"hello")
        final = await client.final_response()
        assert final.status == 200
        assert final.json()["body"] == "hello"


# -- malformed upstream responses ----------------------------------------------------------

MALFORMED_RESPONSES = {
    "not-http": b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
    "status-four-digits": b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n",
    "status-two-digits": b"HTTP/1.1 20 OK\r\nContent-Length: 0\r\n\r\n",
    "status-letters": b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n",
    "version-1.2": b"HTTP/1.2 200 OK\r\nContent-Length: 0\r\n\r\n",
    "cl-te": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te-cl": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n0\r\n\r\n",
    "cl-twice-different": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc",
    "cl-negative": b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    "cl-list": b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\nab",
    "obs-fold": b"HTTP/1.1 200 OK\r\nX-Test: a\r\n b\r\nContent-Length: 0\r\n\r\n",
    "nul-in-value": b"HTTP/1.1 200 OK\r\nX-Test: a\x00b\r\nContent-Length: 0\r\n\r\n",
    "cr-in-value": b"HTTP/1.1 200 OK\r\nX-Test: a\rb\r\nContent-Length: 0\r\n\r\n",
    "bare-lf": b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",
    "space-before-colon": b"HTTP/1.1 200 OK\r\nContent-Length : 0\r\n\r\n",
    "cr-in-reason": b"HTTP/1.1 200 O\rK\r\nContent-Length: 0\r\n\r\n",
}


@pytest.mark.parametrize("raw", MALFORMED_RESPONSES.values(), ids=MALFORMED_RESPONSES.keys())
async def test_a_malformed_response_is_502_and_its_connection_closed(
    evil_proxy: EvilProxy, raw: bytes
) -> None:
    app, evil = await evil_proxy(answer(raw))
    response, _ = await roundtrip(app.port, head(method=b"GET"), close_within=0)
    assert response.status == 502
    assert response.error == "upstream_unreachable"
    assert response.json()["upstream"] == "inventory"
    assert await (await evil.connection(0)).closed_by_proxy()


PATCHED_RESPONSES = {
    "status-below-100": b"HTTP/1.1 099 Odd\r\nContent-Length: 0\r\n\r\n",
    "status-000": b"HTTP/1.1 000 Odd\r\nContent-Length: 0\r\n\r\n",
    "status-600": b"HTTP/1.1 600 Odd\r\nContent-Length: 0\r\n\r\n",
    "status-999": b"HTTP/1.1 999 Odd\r\nContent-Length: 0\r\n\r\n",
    "huge-field": b"HTTP/1.1 200 OK\r\nX-Big: "
    + b"a" * (1 << 20)
    + b"\r\nContent-Length: 0\r\n\r\n",
    "many-fields": b"HTTP/1.1 200 OK\r\n"
    + b"X-Many: a\r\n" * 100_000
    + b"Content-Length: 0\r\n\r\n",
    "huge-reason": b"HTTP/1.1 200 " + b"O" * (1 << 20) + b"\r\nContent-Length: 0\r\n\r\n",
    # llhttp takes these status lines too; they are not HTTP.
    "rtsp": b"RTSP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
    "ice": b"ICE/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
}


@pytest.mark.parametrize("raw", PATCHED_RESPONSES.values(), ids=PATCHED_RESPONSES.keys())
async def test_an_invalid_status_or_oversized_response_head_is_502(
    evil_proxy: EvilProxy, raw: bytes
) -> None:
    app, evil = await evil_proxy(answer(raw))
    response, _ = await roundtrip(app.port, head(method=b"GET"), close_within=0)
    assert response.status == 502
    assert response.error == "upstream_unreachable"
    assert await (await evil.connection(0)).closed_by_proxy()


@pytest.mark.parametrize(
    "behaviour",
    [
        answer(b"", then_close=True),
        answer(b"HTTP/1.1 200 OK\r\nContent-Le", then_close=True),
        reset_after_head(),
        reset_after_head(b"HTTP/1.1 200 OK\r\n"),
    ],
    ids=["close-before-answer", "close-mid-head", "reset-before-answer", "reset-mid-head"],
)
async def test_an_upstream_that_hangs_up_before_the_head_is_502(
    evil_proxy: EvilProxy, behaviour: Behaviour
) -> None:
    app, evil = await evil_proxy(behaviour)
    response, _ = await roundtrip(app.port, head(method=b"GET"), close_within=0)
    assert response.status == 502
    assert response.error == "upstream_unreachable"
    assert len(evil.connections) == 1  # a fresh connection's failure is not retried


@pytest.mark.parametrize(
    "behaviour",
    [
        answer(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789", then_close=True),
        answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\nzz\r\n"),
        answer(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n",
            then_close=True,
        ),
        reset_after_head(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789"),
    ],
    ids=["short-content-length", "bad-chunk", "missing-last-chunk", "reset-mid-body"],
)
async def test_a_body_that_breaks_off_is_passed_on_as_broken(
    evil_proxy: EvilProxy, behaviour: Behaviour
) -> None:
    app, evil = await evil_proxy(behaviour)
    async with await RawClient.connect(app.port) as client:
        client.send(head(method=b"GET"))
        response = await client.response(within=5.0)
        # Too late for a 502: the client must see a cut-short body and a closed connection,
        # never a complete-looking message.
        assert response.status == 200
        assert not response.complete
        assert response.body == b"0123456789"
        assert client.eof
    assert await (await evil.connection(0)).closed_by_proxy()


async def test_hop_by_hop_response_fields_are_not_relayed(evil_proxy: EvilProxy) -> None:
    raw = (
        b"HTTP/1.1 200 OK\r\nConnection: X-Secret, keep-alive\r\nX-Secret: s\r\n"
        b"Keep-Alive: timeout=5\r\nProxy-Authenticate: Basic\r\nTrailer: X-T\r\n"
        b"Upgrade: h2c\r\nX-Kept: k\r\nContent-Length: 2\r\n\r\nok"
    )
    app, _ = await evil_proxy(answer(raw))
    response, _ = await roundtrip(app.port, head(method=b"GET"), close_within=0)
    assert response.status == 200
    assert response.body == b"ok"
    names = {name.lower() for name, _ in response.headers}
    assert b"x-kept" in names
    assert not names & {b"x-secret", b"keep-alive", b"proxy-authenticate", b"trailer", b"upgrade"}


@pytest.mark.parametrize(
    ("status_line", "reason"),
    [(b"HTTP/1.1 302", b"Found"), (b"HTTP/1.1 302 ", b"Found"), (b"HTTP/1.1 302 Elsewhere", None)],
    ids=["no-space", "empty", "own"],
)
async def test_a_status_line_without_a_reason_is_relayed_with_one(
    evil_proxy: EvilProxy, status_line: bytes, reason: bytes | None
) -> None:
    raw = status_line + b"\r\nLocation: /there\r\nContent-Length: 0\r\n\r\n"
    app, _ = await evil_proxy(answer(raw))
    response, _ = await roundtrip(app.port, head(method=b"GET"), close_within=0)
    assert response.status == 302
    assert response.reason == (reason or status_line[13:])
    assert response.headers[0] == (b"Location", b"/there")


def answer_in_pieces(raw: bytes, size: int) -> Behaviour:
    """Read one request head, send `raw` `size` bytes at a time, each on its own."""

    async def behaviour(conn: EvilConnection) -> None:
        await conn.read_head()
        for start in range(0, len(raw), size):
            conn.send(raw[start : start + size])
            await conn.writer.drain()
            await asyncio.sleep(0.001)  # pacing: let each piece leave in a packet of its own

    return behaviour


SPLIT_RESPONSE = (
    b"HTTP/1.1 100 Continue\r\n\r\n"
    b"HTTP/1.1 200 Fine Thanks\r\nX-First: 1\r\nCONNECTION: X-Listed, Keep-Alive\r\n"
    b"x-listed: gone\r\nSet-Cookie: a=1\r\ncontent-LENGTH: 2\r\nX-Padded: v \t\r\n"
    b"Set-Cookie: b=2\r\nTransfer-encoding-not: kept\r\nKeep-Alive: timeout=5\r\n\r\nok"
)


@pytest.mark.parametrize("size", [1, 7, len(SPLIT_RESPONSE)], ids=["bytes", "pieces", "whole"])
async def test_a_response_head_is_relayed_the_same_however_it_is_split(
    evil_proxy: EvilProxy, size: int
) -> None:
    app, _ = await evil_proxy(answer_in_pieces(SPLIT_RESPONSE, size))
    async with await RawClient.connect(app.port) as client:
        client.send(head(method=b"GET"))
        assert (await client.response(within=10.0)).status == 100
        response = await client.response(within=10.0)
    assert (response.status, response.reason, response.body) == (200, b"Fine Thanks", b"ok")
    # Kept fields in their order, case and bytes; hop-by-hop ones (and the field that
    # Connection names) cut out; the proxy's own framing after them.
    assert response.headers == [
        (b"X-First", b"1"),
        (b"Set-Cookie", b"a=1"),
        (b"X-Padded", b"v \t"),
        (b"Set-Cookie", b"b=2"),
        (b"Transfer-encoding-not", b"kept"),
        (b"Via", b"1.1 token-proxy"),
        (b"Content-Length", b"2"),
    ]


async def test_response_trailers_are_not_promoted_to_header_fields(evil_proxy: EvilProxy) -> None:
    raw = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nok\r\n0\r\nX-Trailer: t\r\nSet-Cookie: session=stolen\r\n\r\n"
    )
    app, _ = await evil_proxy(answer(raw))
    response, _ = await roundtrip(app.port, head(method=b"GET"), close_within=0)
    assert response.status == 200
    assert response.body == b"ok"
    assert response.all("X-Trailer") == []
    assert response.all("Set-Cookie") == []


async def test_an_extra_response_makes_the_upstream_connection_unusable(
    evil_proxy: EvilProxy,
) -> None:
    one = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\none"
    extra = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nextra"
    app, evil = await evil_proxy(answer_each(one + extra))
    async with await RawClient.connect(app.port) as client:
        for _ in range(2):
            client.send(head(method=b"GET"))
            response = await client.final_response()
            assert (response.status, response.body) == (200, b"one")
        assert await client.silent_for(0.2)
    assert await (await evil.connection(0)).closed_by_proxy(AT_ONCE)
    assert len(evil.connections) == 2


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
    ],
    ids=["connection-close", "http10"],
)
async def test_a_connection_the_upstream_means_to_close_is_not_reused(
    evil_proxy: EvilProxy, raw: bytes
) -> None:
    # The upstream says it will close but has not yet: the next request, a POST that
    # cannot be retried, must go on a new connection.
    app, evil = await evil_proxy(answer_each(raw))
    async with await RawClient.connect(app.port) as client:
        client.send(head(method=b"GET"))
        assert (await client.final_response()).status == 200
        client.send(head(b"Content-Length: 2") + b"hi")
        assert (await client.final_response()).status == 200
    assert await (await evil.connection(0)).closed_by_proxy(AT_ONCE)
    assert len(evil.connections) == 2
    assert [len(conn.heads) for conn in evil.connections] == [1, 1]


async def test_interim_responses_reach_http11_clients_only(evil_proxy: EvilProxy) -> None:
    raw = (
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    )
    app, _ = await evil_proxy(answer_each(raw))
    async with await RawClient.connect(app.port) as client:
        client.send(head(method=b"GET"))
        statuses = [(await client.response()).status for _ in range(3)]
        assert statuses == [100, 103, 200]
    async with await RawClient.connect(app.port) as client:
        client.send(head(method=b"GET", version=b"HTTP/1.0"))
        assert (await client.response()).status == 200


async def test_an_unsolicited_101_is_not_relayed(evil_proxy: EvilProxy) -> None:
    raw = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\nPRI *"
    app, evil = await evil_proxy(answer(raw), upstream_timeout=2.0)
    response, _ = await roundtrip(app.port, head(method=b"GET"), within=8.0, close_within=0)
    assert response.status == 502
    assert response.error == "upstream_unreachable"
    assert await (await evil.connection(0)).closed_by_proxy()


H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def h2_frames(data: bytes) -> list[tuple[int, bytes]]:
    """(type, payload) of each HTTP/2 frame in `data` (RFC 9113 §4.1)."""
    frames = []
    while len(data) >= 9:
        length = int.from_bytes(data[:3], "big")
        frames.append((data[3], data[9 : 9 + length]))
        data = data[9 + length :]
    assert data == b"", "a partial frame"
    return frames


async def test_an_http2_preface_gets_an_http2_goaway_and_a_log_line(
    named: ProxyApp, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    # gRPC and `curl --http2-prior-knowledge` start with the HTTP/2 preface: they get a
    # server preface and GOAWAY(HTTP_1_1_REQUIRED) with the reason, not parser internals.
    reader, writer = await asyncio.open_connection("127.0.0.1", named.port)
    writer.write(H2_PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
    try:
        frames = h2_frames(await asyncio.wait_for(reader.read(), 5))  # read until closed
    finally:
        writer.close()
    assert [kind for kind, _ in frames] == [0x4, 0x7]  # SETTINGS, GOAWAY
    goaway = frames[1][1]
    assert int.from_bytes(goaway[4:8], "big") == 0xD  # HTTP_1_1_REQUIRED
    assert b"HTTP/2 is not supported on this port" in goaway[8:]
    assert "HTTP/2 is not supported on this port" in caplog.text
    assert "Pause on PRI" not in caplog.text
    assert upstream.received == []
