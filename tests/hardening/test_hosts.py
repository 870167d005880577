"""Token leaks and host confusion: a token reaches only the hosts its upstream matches.

Every case is sent over a raw socket, byte for byte, and asserts what the proxy
answered, what each upstream received (and with which credential), and whether the
connection was closed. The "other host" is a second recording upstream on another
127.0.0.1 port; look-alike names run under `unknown_hosts: deny`, so nothing is ever
resolved or sent off this machine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest

from proxy.app import ProxyApp
from proxy.config import Address, HostMatch, MatchConfig
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
from tests.support.rawhttp import EvilUpstream, RawClient, RawResponse, answer, roundtrip
from tests.support.token_server import TokenServer
from tests.support.upstream import Upstream

pytestmark = pytest.mark.timeout(60)


def request(
    target: str | bytes,
    *,
    method: str = "GET",
    host: str | None = "inventory.internal",
    headers: list[tuple[str, str]] | None = None,
    version: str = "1.1",
) -> bytes:
    """A request head in exactly the bytes given (no normalisation whatsoever)."""
    raw_target = target.encode("latin-1") if isinstance(target, str) else target
    lines = [f"{method} ".encode() + raw_target + f" HTTP/{version}".encode()]
    if host is not None:
        lines.append(b"Host: " + host.encode("latin-1"))
    lines += [f"{name}: {value}".encode("latin-1") for name, value in headers or []]
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def ask(port: int, data: bytes) -> RawResponse:
    """The proxy's answer to `data` on a fresh connection (the connection's fate unchecked)."""
    response, _ = await roundtrip(port, data, close_within=0)
    return response


def bearer(token_server: TokenServer) -> str:
    return f"Bearer {token_server.issued[-1]}"


def credentials(server: Upstream) -> list[list[str]]:
    """The Authorization fields of every request `server` received, request by request."""
    return [seen.all("Authorization") for seen in server.received]


@pytest.fixture
async def other() -> AsyncIterator[Upstream]:
    """The host no upstream matches: whatever reaches it must carry no token."""
    async with Upstream() as server:
        yield server


@pytest.fixture
async def named(start_proxy: StartProxy, token_server: TokenServer, upstream: Upstream) -> ProxyApp:
    """`inventory.internal` goes to `upstream` with a token; every other host is refused."""
    return await start_proxy(
        proxy_config(
            upstream_config(
                "inventory", ["inventory.internal"], token_config(token_server), url=upstream.url
            ),
            unknown_hosts="deny",
        )
    )


@pytest.fixture
async def literal(
    start_proxy: StartProxy, token_server: TokenServer, upstream: Upstream, other: Upstream
) -> ProxyApp:
    """`127.0.0.1:<upstream port>` (no url) gets a token; `other` passes through without."""
    return await start_proxy(
        proxy_config(
            upstream_config(
                "inventory", [f"127.0.0.1:{upstream.port}"], token_config(token_server)
            ),
        )
    )


# -- look-alike and malformed authorities ------------------------------------------------

REFUSED_AUTHORITIES = [
    # Names that only look like the configured one: no upstream matches, so 403.
    ("http://inventory.internal.evil.example/x", 403),
    ("http://INVENTORY.INTERNAL.EVIL.EXAMPLE/x", 403),
    ("http://inventory.internal.evil.example./x", 403),
    ("http://xinventory.internal/x", 403),
    ("http://inventory.internalx/x", 403),
    ("http://inventory-internal/x", 403),
    ("http://evil.example/inventory.internal", 403),
    ("http://evil.example?@inventory.internal/x", 403),
    ("http://0x7f000001/x", 403),
    # The configured name on a port it does not name (http's default is 80, not 443).
    ("http://inventory.internal:8080/x", 403),
    ("http://inventory.internal:443/x", 403),
    # Userinfo: whichever side a parser believes, it is refused (RFC 9110 §4.2.4).
    ("http://inventory.internal@evil.example/x", 400),
    ("http://evil.example@inventory.internal/x", 400),
    ("http://user:pass@inventory.internal/x", 400),
    ("http://inventory.internal%2F@evil.example/x", 400),
    ("http://inventory.internal:80@evil.example/x", 400),
    # Encoded or exotic separators are not guessed at.
    ("http://inventory%2Einternal/x", 400),
    ("http://inventory%2einternal/x", 400),
    ("http://inventory.internal%2e/x", 400),
    ("http://inventory%EF%BC%8Einternal/x", 400),
    (b"http://inventory\xef\xbc\x8einternal/x", 400),
    (b"http://inventory\xe3\x80\x82internal/x", 400),
    ("http://inventory.internal%00/x", 400),
    ("http://inventory.internal%00.evil.example/x", 400),
    ("http://inventory.internal;.evil.example/x", 400),
    ("http://inventory.internal\\.evil.example/x", 400),
    ("http://[inventory.internal]/x", 400),
    ("http://[::ffff:inventory.internal]/x", 400),
    # Empty labels and trailing dots beyond one.
    ("http://inventory..internal/x", 400),
    ("http://.inventory.internal/x", 400),
    ("http://inventory.internal../x", 400),
    # Ports that do not parse, or that wrap around to 80.
    ("http://inventory.internal:/x", 400),
    ("http://inventory.internal:+80/x", 400),
    ("http://inventory.internal:-80/x", 400),
    ("http://inventory.internal:0x50/x", 400),
    ("http://inventory.internal:65616/x", 400),
    ("http://inventory.internal:0/x", 400),
    ("http://inventory.internal:80:80/x", 400),
    # Fragments that would hide the real authority from a naive parser.
    ("http://inventory.internal#@evil.example/x", 400),
    ("http://evil.example#@inventory.internal/x", 400),
    # Not http(s) absolute-form.
    ("ftp://inventory.internal/x", 400),
    ("http:/inventory.internal/x", 400),
    ("http:inventory.internal/x", 400),
    ("//inventory.internal/x", 400),
    ("inventory.internal/x", 400),
    ("http://", 400),
    ("http:///x", 400),
]


@pytest.mark.parametrize(
    ("target", "status"),
    REFUSED_AUTHORITIES,
    ids=[str(target)[:60] for target, _ in REFUSED_AUTHORITIES],
)
async def test_look_alike_and_malformed_authorities_get_nothing(
    named: ProxyApp,
    upstream: Upstream,
    token_server: TokenServer,
    target: str | bytes,
    status: int,
) -> None:
    response = await ask(named.port, request(target))
    assert response.status == status
    assert response.error == ("host_not_allowed" if status == 403 else "bad_request")
    assert upstream.received == []
    for token in token_server.issued:
        assert token not in response.body.decode("latin-1")


@pytest.mark.parametrize(
    "target",
    [
        "http://inventory.internal/x",
        "http://INVENTORY.Internal/x",
        "HTTP://inventory.internal/x",
        "http://inventory.internal./x",
        "http://inventory.internal:80/x",
        "http://inventory.internal:080/x",
        "http://inventory.internal?@evil.example",
    ],
)
async def test_spellings_of_the_configured_host_get_the_token_once(
    named: ProxyApp, upstream: Upstream, token_server: TokenServer, target: str
) -> None:
    response = await ask(named.port, request(target))
    assert response.status == 200
    assert len(upstream.received) == 1
    seen = upstream.last()
    assert seen.all("Authorization") == [bearer(token_server)]
    # The upstream's url decides the Host it sees, whatever the client wrote.
    assert seen.all("Host") == [f"127.0.0.1:{upstream.port}"]


async def test_ipv6_literals_match_only_their_normal_form(
    start_proxy: StartProxy, token_server: TokenServer, upstream: Upstream
) -> None:
    config = upstream_config(
        "inventory", ["inventory.internal"], token_config(token_server), url=upstream.url
    )
    config = dataclasses.replace(config, match=MatchConfig((HostMatch("::1", 8080),)))
    app = await start_proxy(proxy_config(config, unknown_hosts="deny"))
    for target, status in [
        ("http://[::1]:8080/x", 200),
        ("http://[0:0:0:0:0:0:0:1]:8080/x", 200),
        ("http://[0000::0001]:8080/x", 200),
        ("http://[::2]:8080/x", 403),
        ("http://[::1]/x", 403),
        ("http://[::ffff:127.0.0.1]:8080/x", 403),
        ("http://[::1]8080/x", 400),
        ("http://::1:8080/x", 400),
        ("http://[::1:8080/x", 400),
    ]:
        before = len(upstream.received)
        response = await ask(app.port, request(target, host="v6.internal"))
        assert response.status == status, target
        assert len(upstream.received) == before + (status == 200), target
    assert credentials(upstream) == [[bearer(token_server)]] * 3


async def test_ipv6_zone_identifiers_are_refused(named: ProxyApp, upstream: Upstream) -> None:
    response = await ask(named.port, request("http://[::1%25lo]:8080/x"))
    assert response.status == 400
    assert response.error == "bad_request"
    assert upstream.received == []


# -- absolute URI, Host header and the forward port ------------------------------------


async def test_the_absolute_uri_decides_not_the_host_header(
    literal: ProxyApp, upstream: Upstream, other: Upstream, token_server: TokenServer
) -> None:
    matched, unmatched = f"127.0.0.1:{upstream.port}", f"127.0.0.1:{other.port}"
    response = await ask(literal.port, request(f"http://{unmatched}/a", host=matched))
    assert response.status == 200
    assert upstream.received == []
    assert other.last().all("Authorization") == []
    assert other.last().all("Host") == [unmatched]

    response = await ask(literal.port, request(f"http://{matched}/b", host=unmatched))
    assert response.status == 200
    assert upstream.last().all("Authorization") == [bearer(token_server)]
    assert upstream.last().all("Host") == [matched]
    assert len(other.received) == 1


@pytest.mark.parametrize(
    "hosts",
    [
        [("Host", "inventory.internal"), ("Host", "evil.example")],
        [("Host", "inventory.internal"), ("host", "inventory.internal")],
        [("Host", "evil.example"), ("HOST", "inventory.internal")],
    ],
)
async def test_two_host_headers_are_refused(
    named: ProxyApp, upstream: Upstream, hosts: list[tuple[str, str]]
) -> None:
    response, closed = await roundtrip(
        named.port, request("http://inventory.internal/x", host=None, headers=hosts)
    )
    assert response.status == 400  # RFC 9112 §3.2
    assert response.error == "bad_request"
    assert closed
    assert upstream.received == []


async def test_http11_without_host_is_refused(named: ProxyApp, upstream: Upstream) -> None:
    response, closed = await roundtrip(named.port, request("http://inventory.internal/", host=None))
    assert response.status == 400  # RFC 9112 §3.2: MUST respond 400
    assert closed
    assert upstream.received == []
    # HTTP/1.0 has no such requirement: the absolute URI is enough.
    response = await ask(
        named.port, request("http://inventory.internal/", host=None, version="1.0")
    )
    assert response.status == 200
    assert len(upstream.received) == 1


@pytest.mark.parametrize(
    "head",
    [
        request("/x"),
        request("/x", host="inventory.internal:80"),
        request("*", method="OPTIONS"),
    ],
    ids=["origin-form", "origin-form-port", "asterisk"],
)
async def test_non_absolute_targets_on_the_forward_port_are_refused(
    named: ProxyApp, upstream: Upstream, head: bytes
) -> None:
    response, closed = await roundtrip(named.port, head)
    assert response.status == 400
    assert response.error == "bad_request"
    assert closed
    assert upstream.received == []


async def test_pipelined_requests_for_different_hosts_keep_their_own_routing(
    literal: ProxyApp, upstream: Upstream, other: Upstream, token_server: TokenServer
) -> None:
    matched, unmatched = f"127.0.0.1:{upstream.port}", f"127.0.0.1:{other.port}"
    async with await RawClient.connect(literal.port) as client:
        client.send(
            request(f"http://{matched}/1", host=matched)
            + request(f"http://{unmatched}/2", host=matched)
            + request(f"http://{matched}/3", host=unmatched)
            + request(f"http://{unmatched}/4", host=unmatched)
        )
        paths = [(await client.final_response()).json()["path"] for _ in range(4)]
    assert paths == ["/1", "/2", "/3", "/4"]
    assert [seen.path for seen in upstream.received] == ["/1", "/3"]
    assert credentials(upstream) == [[bearer(token_server)]] * 2
    assert [seen.path for seen in other.received] == ["/2", "/4"]
    assert credentials(other) == [[], []]


async def test_a_refused_head_request_gets_no_body_and_the_next_answer_stays_framed(
    named: ProxyApp, upstream: Upstream
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", named.port)
    try:
        writer.write(
            request("http://evil.example/x", method="HEAD", host="evil.example")
            + request("http://evil.example/y", headers=[("Connection", "close")])
        )
        received = await asyncio.wait_for(reader.read(-1), timeout=10)  # until the close
    finally:
        writer.close()
    first, _, rest = received.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 403 ")
    assert b"\r\nContent-Length: " in first  # the size a GET would have had
    # Right after the HEAD answer's head comes the next answer, not a body.
    second_head, _, second_body = rest.partition(b"\r\n\r\n")
    assert second_head.startswith(b"HTTP/1.1 403 ")
    assert json.loads(second_body)["error"] == "host_not_allowed"
    assert upstream.received == []


# -- what the proxy does not do: follow redirects, echo credentials --------------------


async def test_a_redirect_to_another_host_is_passed_back_not_followed(
    start_proxy: StartProxy, token_server: TokenServer, other: Upstream
) -> None:
    location = f"http://127.0.0.1:{other.port}/landing"
    redirect = (
        f"HTTP/1.1 307 Temporary Redirect\r\nLocation: {location}\r\nContent-Length: 0\r\n\r\n"
    )
    async with EvilUpstream(answer(redirect.encode())) as evil:
        app = await start_proxy(
            proxy_config(
                upstream_config(
                    "inventory", ["inventory.internal"], token_config(token_server), url=evil.url
                )
            )
        )
        response = await ask(app.port, request("http://inventory.internal/x"))
        assert response.status == 307
        assert response.header("Location") == location
        assert len(evil.heads) == 1
    assert other.received == []


async def test_trace_never_carries_the_token(named: ProxyApp, upstream: Upstream) -> None:
    response = await ask(named.port, request("http://inventory.internal/t", method="TRACE"))
    assert response.status == 200
    seen = upstream.last()
    assert seen.method == "TRACE"
    assert seen.all("Authorization") == []  # RFC 9110 §9.3.8


# -- the application's own credentials -----------------------------------------------


async def test_overwrite_replaces_every_authorization_the_app_sent_with_one(
    named: ProxyApp, upstream: Upstream, token_server: TokenServer
) -> None:
    headers = [
        ("Authorization", "Basic YTpi"),
        ("authorization", "Bearer app"),
        ("AUTHORIZATION", "x"),
    ]
    response = await ask(named.port, request("http://inventory.internal/x", headers=headers))
    assert response.status == 200
    assert upstream.last().all("Authorization") == [bearer(token_server)]


@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        ([("Authorization", "Basic YTpi")], ["Basic YTpi"]),
        (
            [("Authorization", "Basic YTpi"), ("Authorization", "Basic Yzpk")],
            ["Basic YTpi", "Basic Yzpk"],
        ),
        ([], None),
        # The app marked its own Authorization hop-by-hop: it is not forwarded, ours is.
        ([("Connection", "Authorization"), ("Authorization", "Basic YTpi")], None),
    ],
    ids=["one", "two", "none", "hop-by-hop"],
)
async def test_without_overwrite_the_apps_authorization_is_kept_as_sent(
    start_proxy: StartProxy,
    token_server: TokenServer,
    upstream: Upstream,
    sent: list[tuple[str, str]],
    expected: list[str] | None,
) -> None:
    app = await start_inventory(start_proxy, token_server, upstream, overwrite=False)
    response = await ask(app.port, request("http://inventory.internal/x", headers=sent))
    assert response.status == 200
    want = expected if expected is not None else [bearer(token_server)]
    assert upstream.last().all("Authorization") == want


async def test_custom_header_is_replaced_and_authorization_left_alone(
    start_proxy: StartProxy, token_server: TokenServer, upstream: Upstream
) -> None:
    app = await start_inventory(start_proxy, token_server, upstream, header="X-Api-Token")
    headers = [
        ("x-api-token", "mine"),
        ("X-API-TOKEN", "mine too"),
        ("Authorization", "Basic YTpi"),
    ]
    response = await ask(app.port, request("http://inventory.internal/x", headers=headers))
    assert response.status == 200
    seen = upstream.last()
    assert seen.all("X-Api-Token") == [bearer(token_server)]
    assert seen.all("Authorization") == ["Basic YTpi"]


# -- trailers ------------------------------------------------------------------------------


def chunked_put(target: str, trailers: list[tuple[str, str]]) -> bytes:
    head = request(target, method="PUT", headers=[("Transfer-Encoding", "chunked")])
    fields = b"".join(f"{name}: {value}\r\n".encode() for name, value in trailers)
    return head + b"5\r\nhello\r\n0\r\n" + fields + b"\r\n"


TRAILER_ATTACKS = {
    "field": [("X-Smuggled", "1")],
    "authorization": [("Authorization", "Bearer not-the-token")],
    "host": [("Host", "evil.example")],
    "connection": [("Connection", "Authorization"), ("X-Smuggled", "1")],
}


@pytest.mark.parametrize(
    ("trailers", "overwrite"),
    [
        pytest.param(
            fields,
            overwrite,
            id=f"{name}-{'overwrite' if overwrite else 'keep'}",
            # With overwrite the promoted Authorization is replaced anyway.
        )
        for name, fields in TRAILER_ATTACKS.items()
        for overwrite in (True, False)
    ],
)
async def test_trailers_cannot_set_host_authorization_or_any_header(
    start_proxy: StartProxy,
    token_server: TokenServer,
    upstream: Upstream,
    trailers: list[tuple[str, str]],
    overwrite: bool,
) -> None:
    app = await start_inventory(start_proxy, token_server, upstream, overwrite=overwrite)
    response = await ask(app.port, chunked_put("http://inventory.internal/x", trailers))
    assert response.status == 200
    seen = upstream.last()
    assert seen.all("Authorization") == [bearer(token_server)]
    assert seen.all("Host") == [f"127.0.0.1:{upstream.port}"]
    assert seen.all("X-Smuggled") == []
    assert response.json()["body"] == "hello"


# -- two upstreams, two tokens ------------------------------------------------------------


async def test_two_upstreams_never_cross_their_tokens(
    start_proxy: StartProxy, token_server: TokenServer, upstream: Upstream, other: Upstream
) -> None:
    async with TokenServer(clients={CLIENT_ID: CLIENT_SECRET}) as second_token_server:
        app = await start_proxy(
            proxy_config(
                upstream_config(
                    "alpha",
                    ["alpha.internal"],
                    token_config(token_server),
                    url=upstream.url,
                    listen=Address("127.0.0.1", 0),
                ),
                upstream_config(
                    "beta",
                    ["beta.internal"],
                    token_config(second_token_server),
                    url=other.url,
                    listen=Address("127.0.0.1", 0),
                ),
                unknown_hosts="deny",
            )
        )

        async def through_forward_port(session: aiohttp.ClientSession, index: int) -> None:
            name = "alpha" if index % 2 else "beta"
            async with session.get(
                f"http://{name}.internal/{name}/{index}", proxy=proxy_url(app)
            ) as response:
                assert response.status == 200
                await response.read()

        async def through_reverse_port(session: aiohttp.ClientSession, index: int) -> None:
            name = "alpha" if index % 2 else "beta"
            port = app.reverse_listeners[name].port
            async with session.get(f"http://127.0.0.1:{port}/{name}/r{index}") as response:
                assert response.status == 200
                await response.read()

        async def pipelined() -> None:
            async with await RawClient.connect(app.port) as client:
                for index in range(10):
                    name = "alpha" if index % 3 else "beta"
                    client.send(
                        request(f"http://{name}.internal/{name}/p{index}", host=f"{name}.internal")
                    )
                for _ in range(10):
                    assert (await client.final_response()).status == 200

        async with aiohttp.ClientSession() as session:
            await asyncio.gather(
                *(through_forward_port(session, index) for index in range(40)),
                *(through_reverse_port(session, index) for index in range(20)),
                pipelined(),
                pipelined(),
            )

        alpha_tokens = {f"Bearer {token}" for token in token_server.issued}
        beta_tokens = {f"Bearer {token}" for token in second_token_server.issued}
        assert alpha_tokens
        assert beta_tokens
        assert not alpha_tokens & beta_tokens
        assert len(upstream.received) + len(other.received) == 40 + 20 + 20
        for seen in upstream.received:
            assert seen.path.startswith("/alpha/")
            assert len(seen.all("Authorization")) == 1
            assert seen.header("Authorization") in alpha_tokens
        for seen in other.received:
            assert seen.path.startswith("/beta/")
            assert len(seen.all("Authorization")) == 1
            assert seen.header("Authorization") in beta_tokens


@pytest.mark.parametrize(
    "path",
    ["/a/../b/secret", "/a/%2e%2e/b/secret", "/a/%2E%2e/b/secret", "/a/.%2e/b/secret", "/a/./x"],
)
async def test_dot_segments_cannot_move_a_token_across_path_prefixes(
    start_proxy: StartProxy, token_server: TokenServer, other: Upstream, path: str
) -> None:
    upstream = other  # records without checking tokens: both upstreams' are welcome
    host = f"127.0.0.1:{upstream.port}"
    async with TokenServer(clients={CLIENT_ID: CLIENT_SECRET}) as second_token_server:
        app = await start_proxy(
            proxy_config(
                upstream_config("a", [host], token_config(token_server), path_prefix="/a"),
                upstream_config("b", [host], token_config(second_token_server), path_prefix="/b"),
            )
        )
        response = await ask(app.port, request(f"http://{host}{path}", host=host))
    assert response.status == 400
    assert response.error == "bad_request"
    assert upstream.received == []


async def test_path_prefixes_on_one_host_each_get_their_own_token(
    start_proxy: StartProxy, token_server: TokenServer, other: Upstream
) -> None:
    upstream = other  # records without checking tokens: both upstreams' are welcome
    host = f"127.0.0.1:{upstream.port}"
    async with TokenServer(clients={CLIENT_ID: CLIENT_SECRET}) as second_token_server:
        app = await start_proxy(
            proxy_config(
                upstream_config("a", [host], token_config(token_server), path_prefix="/a"),
                upstream_config("b", [host], token_config(second_token_server), path_prefix="/b"),
            )
        )
        for path in ["/a/x", "/b/x", "/ab", "/c"]:
            response = await ask(app.port, request(f"http://{host}{path}", host=host))
            assert response.status == 200
        assert credentials(upstream) == [
            [bearer(token_server)],
            [bearer(second_token_server)],
            [],
            [],
        ]


# -- schemes and tunnels ---------------------------------------------------------------


async def test_https_absolute_form_is_not_sent_in_clear_to_a_plain_url(
    named: ProxyApp, upstream: Upstream
) -> None:
    response = await ask(named.port, request("https://inventory.internal/x"))
    assert response.status == 400
    assert response.error == "bad_request"
    assert response.json()["upstream"] == "inventory"
    assert upstream.received == []


async def test_https_absolute_form_without_url_speaks_tls_or_fails(
    literal: ProxyApp, upstream: Upstream
) -> None:
    # The matched upstream speaks plain HTTP: the proxy must try TLS and fail, never
    # fall back to sending the request (and its token) in clear.
    host = f"127.0.0.1:{upstream.port}"
    response = await ask(literal.port, request(f"https://{host}/x", host=host))
    assert response.status == 502
    assert response.error == "upstream_unreachable"
    assert upstream.received == []


@pytest.mark.parametrize(
    ("authority", "upstream_name"),
    [
        ("inventory.internal:443", "inventory"),
        ("INVENTORY.internal.:443", "inventory"),
        ("inventory.internal:8443", None),
        ("evil.example:443", None),
        ("inventory.internal@evil.example:443", None),
        ("inventory.internal", None),
    ],
)
async def test_connect_never_opens_an_unauthenticated_path_to_a_configured_host(
    named: ProxyApp, upstream: Upstream, authority: str, upstream_name: str | None
) -> None:
    response, closed = await roundtrip(
        named.port, request(authority, method="CONNECT", host=authority)
    )
    assert response.status in (400, 403)
    assert closed
    assert json.loads(response.body)["upstream"] == upstream_name
    assert upstream.received == []


async def test_reverse_port_sends_only_to_its_own_url(
    start_proxy: StartProxy,
    token_server: TokenServer,
    upstream: Upstream,
    other: Upstream,
) -> None:
    app = await start_inventory(start_proxy, token_server, upstream, listen=Address("127.0.0.1", 0))
    port = app.reverse_listeners["inventory"].port
    elsewhere = f"127.0.0.1:{other.port}"
    for head in [
        request("/x", host=elsewhere),
        request(f"http://{elsewhere}/y", host=elsewhere),
        request(f"http://{elsewhere}/z", host="inventory.internal"),
    ]:
        response = await ask(port, head)
        assert response.status == 200
    assert [seen.path for seen in upstream.received] == ["/x", "/y", "/z"]
    assert credentials(upstream) == [[bearer(token_server)]] * 3
    assert {seen.header("Host") for seen in upstream.received} == {f"127.0.0.1:{upstream.port}"}
    assert other.received == []


# -- every port a host claims, through every way of reaching it ------------------------


@pytest.mark.parametrize(
    ("entry", "claimed"),
    [
        # A host without a port: its scheme's default port in absolute form, and both
        # default ports through CONNECT, which names no scheme.
        ("vm.internal", {("http", 80), ("https", 443)}),
        ("vm.internal:80", {("http", 80), ("https", 80)}),
        ("vm.internal:443", {("http", 443), ("https", 443)}),
        ("vm.internal:8080", {("http", 8080), ("https", 8080)}),
    ],
)
async def test_a_configured_host_never_leaves_without_its_token_through_any_port_or_form(
    start_proxy: StartProxy,
    token_server: TokenServer,
    upstream: Upstream,
    entry: str,
    claimed: set[tuple[str, int]],
) -> None:
    # No interception: a claimed port through CONNECT is refused (443: the token cannot
    # go inside TLS) or serves the plain HTTP inside with the token; absolute form
    # must carry the token.
    # Unclaimed ports are refused under `unknown_hosts: deny`, so nothing is resolved.
    config = upstream_config("inventory", [entry], token_config(token_server), url=upstream.url)
    app = await start_proxy(
        proxy_config(config, unknown_hosts="deny", connect_ports=(80, 443, 8080))
    )
    for port in (80, 443, 8080):
        authority = f"vm.internal:{port}"
        tunnelled_to_claimed = any(port == claimed_port for _, claimed_port in claimed)
        before = len(upstream.received)
        if tunnelled_to_claimed and port != 443:
            # Plain HTTP inside the tunnel is served as requests to the host, with its token.
            reader, writer = await asyncio.open_connection("127.0.0.1", app.port)
            try:
                writer.write(request(authority, method="CONNECT", host=authority))
                connected = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                assert connected.startswith(b"HTTP/1.1 200 "), authority
                writer.write(request("/x", host=authority))
                answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                assert answer.startswith(b"HTTP/1.1 200 "), authority
            finally:
                writer.close()
            assert credentials(upstream)[before:] == [[bearer(token_server)]], authority
        else:
            # 443 without interception carries TLS: refused before any tunnel.
            tunnel = await ask(app.port, request(authority, method="CONNECT", host=authority))
            assert tunnel.status == 403, authority
            assert tunnel.json()["upstream"] == ("inventory" if tunnelled_to_claimed else None)
        for scheme in ("http", "https"):
            before = len(upstream.received)
            target = f"{scheme}://{authority}/x"
            response = await ask(app.port, request(target, host=authority))
            if (scheme, port) in claimed and scheme == "http":
                assert response.status == 200, target
                assert credentials(upstream)[before:] == [[bearer(token_server)]], target
            elif (scheme, port) in claimed:
                # https:// to an upstream whose url is http: refused, never downgraded.
                assert (response.status, response.json()["upstream"]) == (400, "inventory")
            else:
                assert (response.status, response.json()["upstream"]) == (403, None), target
    assert all(seen.header("Authorization") for seen in upstream.received)


async def test_a_port_refusal_names_the_upstream_and_the_setting(
    start_proxy: StartProxy, token_server: TokenServer, upstream: Upstream
) -> None:
    config = upstream_config("inventory", ["vm.internal"], token_config(token_server))
    app = await start_proxy(proxy_config(config))  # connect_ports: the default, 443 only
    reply = await ask(app.port, request("vm.internal:80", method="CONNECT", host=None))
    assert reply.status == 403
    body = reply.json()
    assert body["upstream"] == "inventory"
    assert "connect_ports" in body["detail"]
    sample = app.metrics.registry.get_sample_value(
        "token_proxy_tunnels_total", {"upstream": "inventory", "outcome": "refused"}
    )
    assert sample == 1


@pytest.mark.parametrize("host", ["127.evil.test", "127.0.0.1.evil.test", "localhost.evil.test"])
async def test_a_name_that_looks_like_loopback_gets_no_cleartext_token(
    start_proxy: StartProxy, token_server: TokenServer, host: str
) -> None:
    # No url and no allow_insecure_http: only a real loopback address may get the token
    # over plain http. A DNS name resolves wherever its owner wants.
    config = upstream_config("inventory", [f"{host}:8080"], token_config(token_server))
    app = await start_proxy(proxy_config(config))
    response = await ask(app.port, request(f"http://{host}:8080/x", host=f"{host}:8080"))
    assert response.status == 403
    assert response.error == "host_not_allowed"
    assert "cleartext" in response.json()["detail"]


# -- link-local and cloud-metadata targets ---------------------------------------------------

LINK_LOCAL_TARGETS = [
    "169.254.169.254",
    "169.254.1.1:8080",
    "[fe80::1]",
    "[fd00:ec2::254]",
    "100.100.100.200",
    "metadata.google.internal",
    "metadata",
    "Metadata.Google.Internal.",
    "[::ffff:169.254.169.254]",
    "2852039166",  # 169.254.169.254 as the system resolver reads it
    "0xa9fea9fe",
    "169.254.43518",
]


@pytest.mark.parametrize("authority", LINK_LOCAL_TARGETS)
async def test_link_local_and_metadata_targets_are_refused_under_passthrough(
    start_proxy: StartProxy, token_server: TokenServer, upstream: Upstream, authority: str
) -> None:
    app = await start_inventory(start_proxy, token_server, upstream)  # passthrough
    response = await ask(app.port, request(f"http://{authority}/latest/meta-data/", host=authority))
    assert response.status == 403
    assert response.error == "host_not_allowed"
    assert "allow_link_local_targets" in response.json()["detail"]
    connect = authority.removesuffix(":8080") + ":443"
    reply, closed = await roundtrip(app.port, request(connect, method="CONNECT", host=connect))
    assert reply.status == 403
    assert closed
    assert "allow_link_local_targets" in reply.json()["detail"]


async def test_link_local_targets_pass_when_allowed_and_configured_ones_always(
    start_proxy: StartProxy, token_server: TokenServer, upstream: Upstream
) -> None:
    # An upstream the operator named is reached whatever its address; with the setting,
    # a passthrough request to such an address is attempted (a link-local address
    # without a zone cannot be connected to: 502 at once).
    config = proxy_config(
        upstream_config(
            "metadata", ["169.254.169.254"], token_config(token_server), url=upstream.url
        ),
        allow_link_local_targets=True,
    )
    app = await start_proxy(config)
    response = await ask(app.port, request("http://169.254.169.254/x", host="169.254.169.254"))
    assert response.status == 200
    assert upstream.last().all("Authorization") == [bearer(token_server)]
    response = await ask(app.port, request("http://[fe80::1]:9/x", host="[fe80::1]:9"))
    assert response.status == 502
    assert response.error == "upstream_unreachable"


# -- the proxy's duties as an intermediary (RFC 9110 §7.6) ----------------------------------


async def test_via_is_appended_to_requests_and_responses(
    named: ProxyApp, upstream: Upstream
) -> None:
    raw = request(
        "http://inventory.internal/v", headers=[("Via", "1.0 fred"), ("Via", "1.1 nowhere")]
    )
    response = await ask(named.port, raw)
    assert response.status == 200
    assert upstream.last().all("Via") == ["1.0 fred", "1.1 nowhere", "1.1 token-proxy"]
    assert response.all("Via") == ["1.1 token-proxy"]
    old = await ask(named.port, request("http://inventory.internal/v", version="1.0"))
    assert old.status == 200
    assert upstream.last().all("Via") == ["1.0 token-proxy"]


async def test_via_can_be_turned_off(
    start_proxy: StartProxy, token_server: TokenServer, upstream: Upstream
) -> None:
    app = await start_inventory(start_proxy, token_server, upstream, proxy={"via": False})
    response = await ask(app.port, request("http://inventory.internal/v"))
    assert response.status == 200
    assert response.all("Via") == []
    assert upstream.last().all("Via") == []


async def test_trace_and_options_with_max_forwards_zero_are_answered_by_the_proxy(
    named: ProxyApp, upstream: Upstream
) -> None:
    sensitive = [
        ("Max-Forwards", "0"),
        ("Authorization", "Bearer the-apps-own"),
        ("authorization", "Basic dXNlcjpwYXNz"),
        ("Proxy-Authorization", "Basic cHJveHk6cGFzcw=="),
        ("Cookie", "session=secret"),
        ("X-Echo", "kept"),
    ]
    trace = await ask(
        named.port, request("http://inventory.internal/t", method="TRACE", headers=sensitive)
    )
    assert trace.status == 200
    assert trace.header("Content-Type") == "message/http"
    assert trace.body.startswith(b"TRACE http://inventory.internal/t HTTP/1.1\r\n")
    assert b"Host: inventory.internal\r\n" in trace.body
    assert b"X-Echo: kept\r\n" in trace.body
    assert b"Max-Forwards: 0\r\n" in trace.body
    for secret in (b"the-apps-own", b"dXNlcjpwYXNz", b"cHJveHk6cGFzcw==", b"session=secret"):
        assert secret not in trace.body
    assert trace.body.endswith(b"\r\n\r\n")
    options = await ask(
        named.port,
        request("http://inventory.internal/o", method="OPTIONS", headers=[("Max-Forwards", "0")]),
    )
    assert options.status == 200
    assert "OPTIONS" in (options.header("Allow") or "")
    assert options.body == b""
    assert upstream.received == []


async def test_max_forwards_is_decremented_for_trace_and_options_only(
    named: ProxyApp, upstream: Upstream
) -> None:
    for method in ("TRACE", "OPTIONS", "GET"):
        raw = request("http://inventory.internal/m", method=method, headers=[("Max-Forwards", "3")])
        response = await ask(named.port, raw)
        assert response.status == 200
        assert upstream.last().method == method
        assert upstream.last().all("Max-Forwards") == ["3" if method == "GET" else "2"]
