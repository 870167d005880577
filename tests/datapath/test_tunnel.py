"""CONNECT on the forward-proxy port without interception: tunnels and refusals.

A host no upstream matches is tunnelled byte for byte (both directions, half-close,
idle timeout); a configured host is refused with an explanation, because a tunnel
would carry its requests without the token. Real servers on 127.0.0.1, real clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import ipaddress
import json
import os
import socket
import ssl
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import trustme
from cryptography import x509

from proxy.app import ProxyApp
from proxy.config import LimitsConfig, ProxyConfig
from proxy.datapath.planning import Plan
from proxy.datapath.tunnel import _open as open_tunnel
from proxy.datapath.upstream_connection import Origin
from proxy.errors import HostNotAllowed
from tests.support.configs import StartProxy, proxy_config, proxy_url, token_config, upstream_config
from tests.support.token_server import TokenServer
from tests.support.upstream import Upstream


@dataclasses.dataclass
class ProxyReply:
    """A response the proxy itself wrote to a raw CONNECT."""

    status: int
    head: bytes
    body: bytes

    def json(self) -> dict[str, object]:
        document = json.loads(self.body)
        assert isinstance(document, dict)
        return document


async def send_connect(
    proxy_port: int, target: bytes
) -> tuple[ProxyReply, asyncio.StreamReader, asyncio.StreamWriter]:
    """Send `CONNECT target` on a fresh connection and read the proxy's response head."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port)
    writer.write(b"CONNECT " + target + b" HTTP/1.1\r\nHost: " + target + b"\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    status = int(head.split(b" ", 2)[1])
    body = b""
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            body = await asyncio.wait_for(reader.readexactly(int(value)), 10)
    return ProxyReply(status, head, body), reader, writer


async def refused(proxy_port: int, target: bytes) -> ProxyReply:
    """A CONNECT the proxy must answer itself; also checks it closes the connection."""
    reply, reader, writer = await send_connect(proxy_port, target)
    try:
        assert await asyncio.wait_for(reader.read(), 10) == b""
    finally:
        writer.close()
        await writer.wait_closed()
    return reply


class EchoServer:
    """A plain TCP server that echoes, and after the client's EOF reports what it got."""

    def __init__(self) -> None:
        self.connections = 0
        self.server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def __aenter__(self) -> EchoServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        digest = hashlib.sha256()
        size = 0
        try:
            while data := await reader.read(65536):
                digest.update(data)
                size += len(data)
                writer.write(data)
                await writer.drain()
            # The client's half-close arrived; this direction is still open.
            writer.write(b"|eof-seen %d %s" % (size, digest.hexdigest().encode()))
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


@pytest.fixture
async def echo() -> AsyncIterator[EchoServer]:
    async with EchoServer() as server:
        yield server


@pytest.fixture
def server_ca() -> trustme.CA:
    return trustme.CA()


def tunnel_config(token_server: TokenServer, *ports: int, **changes: Any) -> ProxyConfig:
    # One configured upstream, so that 127.0.0.1 is an *unmatched* host.
    inventory = upstream_config(
        "inventory", ["inventory.internal"], token_config(token_server), url="http://127.0.0.1:9"
    )
    return proxy_config(inventory, connect_ports=ports, **changes)


def tunnels(app: ProxyApp, upstream: str, outcome: str) -> float:
    value = app.metrics.registry.get_sample_value(
        "token_proxy_tunnels_total", {"upstream": upstream, "outcome": outcome}
    )
    return value or 0.0


async def test_unmatched_host_is_tunnelled_byte_for_byte_with_half_close(
    start_proxy: StartProxy, token_server: TokenServer, echo: EchoServer
) -> None:
    app = await start_proxy(tunnel_config(token_server, echo.port))
    reply, reader, writer = await send_connect(app.port, b"127.0.0.1:%d" % echo.port)
    assert reply.status == 200
    assert reply.head.startswith(b"HTTP/1.1 200 ")
    # Every byte value, HTTP-looking lines and more than the socket buffers hold.
    payload = bytes(range(256)) * 64 + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + os.urandom(3 << 20)

    async def send() -> None:
        writer.write(payload)
        await writer.drain()
        writer.write_eof()  # half-close: the answer must still come back

    sender = asyncio.create_task(send())
    received = await asyncio.wait_for(reader.read(-1), 30)  # until the server closes
    await sender
    writer.close()
    await writer.wait_closed()
    trailer = b"|eof-seen %d %s" % (len(payload), hashlib.sha256(payload).hexdigest().encode())
    assert received == payload + trailer
    assert tunnels(app, "unmatched", "opened") == 1


async def test_tunnel_carries_the_clients_own_tls_without_a_token(
    start_proxy: StartProxy,
    token_server: TokenServer,
    server_ca: trustme.CA,
    client_ca: trustme.CA,
) -> None:
    # The upstream demands a client certificate that only the client holds: the request
    # can only succeed if the TLS session runs between the client and the upstream.
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ca.issue_cert("127.0.0.1", "localhost").configure_cert(server_context)
    server_context.verify_mode = ssl.CERT_REQUIRED
    client_ca.configure_trust(server_context)
    upstream = Upstream()
    await upstream.start(ssl_context=server_context)
    try:
        app = await start_proxy(tunnel_config(token_server, upstream.port))
        client_context = ssl.create_default_context()
        server_ca.configure_trust(client_context)
        client_ca.issue_cert("client@example.test").configure_cert(client_context)
        async with aiohttp.ClientSession() as session:
            for _ in range(2):
                async with session.get(
                    f"https://127.0.0.1:{upstream.port}/api/items",
                    proxy=proxy_url(app),
                    ssl=client_context,
                ) as response:
                    assert response.status == 200
                    assert json.loads(await response.read())["path"] == "/api/items"
        assert [seen.header("Authorization") for seen in upstream.received] == [None, None]
        # The certificate the client sees is the upstream's own.
        reply, _, writer = await send_connect(app.port, b"127.0.0.1:%d" % upstream.port)
        assert reply.status == 200
        await writer.start_tls(client_context, server_hostname="127.0.0.1")
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.close()
        await writer.wait_closed()
        seen_cert = x509.load_der_x509_certificate(der)
        server_ca_cert = x509.load_pem_x509_certificate(server_ca.cert_pem.bytes())
        assert seen_cert.issuer == server_ca_cert.subject
        # aiohttp's two requests shared one tunnel; the raw check opened the second.
        assert tunnels(app, "unmatched", "opened") == 2
    finally:
        await upstream.close()


async def test_connect_to_a_port_not_allowed_is_refused(
    start_proxy: StartProxy, token_server: TokenServer, echo: EchoServer
) -> None:
    app = await start_proxy(tunnel_config(token_server, 443))
    reply = await refused(app.port, b"127.0.0.1:%d" % echo.port)
    assert reply.status == 403
    assert reply.json()["error"] == "host_not_allowed"
    assert str(echo.port) in str(reply.json()["detail"])
    assert echo.connections == 0
    assert tunnels(app, "unmatched", "refused") == 1


@pytest.mark.parametrize(
    "target",
    [
        b"127.0.0.1",  # no port: required for CONNECT (RFC 9110 section 9.3.6)
        b"127.0.0.1:",
        b"127.0.0.1:99999",
        b"127.0.0.1:0",
        b"user@127.0.0.1:443",
        b"[::1:443",
        b"exa%6dple.com:443",
        b"/path",
    ],
)
async def test_malformed_connect_target_is_a_bad_request(
    start_proxy: StartProxy, token_server: TokenServer, target: bytes
) -> None:
    app = await start_proxy(tunnel_config(token_server, 443))
    reply = await refused(app.port, target)
    assert reply.status == 400
    assert reply.json()["error"] == "bad_request"


async def test_unknown_hosts_deny_refuses_the_tunnel(
    start_proxy: StartProxy, token_server: TokenServer, echo: EchoServer
) -> None:
    config = tunnel_config(token_server, echo.port, unknown_hosts="deny")
    app = await start_proxy(config)
    reply = await refused(app.port, b"127.0.0.1:%d" % echo.port)
    assert reply.status == 403
    assert reply.json() == {
        "error": "host_not_allowed",
        "upstream": None,
        "detail": "127.0.0.1 matches no configured upstream (unknown_hosts: deny)",
    }
    assert echo.connections == 0


async def test_configured_host_without_interception_is_refused_with_an_explanation(
    start_proxy: StartProxy, token_server: TokenServer, upstream: Upstream
) -> None:
    inventory = upstream_config(
        "inventory", ["inventory.internal"], token_config(token_server), url=upstream.url
    )
    app = await start_proxy(proxy_config(inventory))
    await token_server.wait_for_issued(1)  # a token is at hand, and still never sent
    # Port 443 carries TLS: refused before any tunnel, with what to do instead.
    reply = await refused(app.port, b"inventory.internal:443")
    assert reply.status == 403
    body = reply.json()
    assert body["error"] == "host_not_allowed"
    assert body["upstream"] == "inventory"
    detail = str(body["detail"])
    assert "tls_intercept" in detail
    assert "url: https://" in detail
    assert upstream.received == []
    assert tunnels(app, "inventory", "refused") == 1


async def test_tls_inside_a_tunnel_to_a_configured_port_without_interception_is_closed(
    start_proxy: StartProxy,
    token_server: TokenServer,
    upstream: Upstream,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Another port may carry plain HTTP, so the tunnel opens; a ClientHello then ends it.
    inventory = upstream_config(
        "inventory", [f"127.0.0.1:{upstream.port}"], token_config(token_server)
    )
    app = await start_proxy(proxy_config(inventory, connect_ports=(upstream.port,)))
    reply, _, writer = await send_connect(app.port, b"127.0.0.1:%d" % upstream.port)
    assert reply.status == 200
    client_context = ssl.create_default_context()
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await asyncio.wait_for(writer.start_tls(client_context, server_hostname="x"), 10)
    writer.close()
    assert upstream.received == []
    assert tunnels(app, "inventory", "refused") == 1
    assert "cannot carry a token without tls_intercept" in caplog.text


async def test_plain_http_inside_a_tunnel_to_a_configured_host_gets_the_token(
    start_proxy: StartProxy, token_server: TokenServer, upstream: Upstream
) -> None:
    # undici's proxy agent, WebSocket clients and `curl -p` tunnel even http:// requests.
    inventory = upstream_config(
        "inventory", [f"127.0.0.1:{upstream.port}"], token_config(token_server)
    )
    app = await start_proxy(proxy_config(inventory, connect_ports=(upstream.port,)))
    authority = b"127.0.0.1:%d" % upstream.port
    reply, reader, writer = await send_connect(app.port, authority)
    assert reply.status == 200
    for index in range(2):  # keep-alive inside the tunnel
        writer.write(b"GET /api/%d HTTP/1.1\r\nHost: %s\r\n\r\n" % (index, authority))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200 ")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        assert json.loads(await reader.readexactly(length))["path"] == f"/api/{index}"
    # A Host naming another host inside this tunnel is refused.
    writer.write(b"GET /x HTTP/1.1\r\nHost: elsewhere.example\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 400 ")
    writer.close()
    assert [seen.header("Authorization") for seen in upstream.received] == [
        f"Bearer {token_server.issued[-1]}"
    ] * 2
    assert tunnels(app, "inventory", "plain_http") == 1


async def test_curl_through_a_tunnel_to_a_configured_host_gets_the_token(
    start_proxy: StartProxy, token_server: TokenServer, upstream: Upstream
) -> None:
    inventory = upstream_config(
        "inventory", [f"127.0.0.1:{upstream.port}"], token_config(token_server)
    )
    app = await start_proxy(proxy_config(inventory, connect_ports=(upstream.port,)))
    process = await asyncio.create_subprocess_exec(
        "curl",
        "-sS",
        "-p",
        "-x",
        proxy_url(app),
        f"http://127.0.0.1:{upstream.port}/api/c",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err
    assert json.loads(out)["path"] == "/api/c"
    assert upstream.received[-1].header("Authorization") == f"Bearer {token_server.issued[-1]}"


async def test_neither_tls_nor_http_inside_a_tunnel_is_refused(
    start_proxy: StartProxy, token_server: TokenServer, upstream: Upstream
) -> None:
    inventory = upstream_config(
        "inventory", [f"127.0.0.1:{upstream.port}"], token_config(token_server)
    )
    app = await start_proxy(proxy_config(inventory, connect_ports=(upstream.port,)))
    reply, reader, writer = await send_connect(app.port, b"127.0.0.1:%d" % upstream.port)
    assert reply.status == 200
    writer.write(b"\x00\x01binary")
    # Closed with the bytes unread: an end or a reset, and nothing else.
    with contextlib.suppress(ConnectionResetError):
        assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()
    assert upstream.received == []
    assert tunnels(app, "inventory", "refused") == 1


async def test_unreachable_tunnel_target_is_502(
    start_proxy: StartProxy, token_server: TokenServer
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    app = await start_proxy(tunnel_config(token_server, closed_port))
    reply = await refused(app.port, b"127.0.0.1:%d" % closed_port)
    assert reply.status == 502
    assert reply.json()["error"] == "upstream_unreachable"


async def test_idle_tunnel_is_closed_after_the_tunnel_idle_timeout(
    start_proxy: StartProxy, token_server: TokenServer, echo: EchoServer
) -> None:
    limits = LimitsConfig(tunnel_idle_timeout=1.0)
    app = await start_proxy(tunnel_config(token_server, echo.port, limits=limits))
    reply, reader, writer = await send_connect(app.port, b"127.0.0.1:%d" % echo.port)
    assert reply.status == 200
    writer.write(b"ping")
    assert await asyncio.wait_for(reader.readexactly(4), 10) == b"ping"
    # Nothing more is sent either way: the proxy ends the tunnel by itself.
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()
    await writer.wait_closed()


def link_local_address() -> str | None:
    """An IPv6 link-local address of this machine with its zone (`fe80::…%eth0`), if any."""
    try:
        with open("/proc/net/if_inet6") as table:
            lines = table.read().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) == 6 and fields[3] == "20":  # scope: link
            groups = [fields[0][i : i + 4] for i in range(0, 32, 4)]
            return f"{ipaddress.IPv6Address(':'.join(groups))}%{fields[5]}"
    return None


@pytest.mark.skipif(link_local_address() is None, reason="no IPv6 link-local address here")
async def test_a_passthrough_connection_whose_peer_is_link_local_is_refused(
    start_proxy: StartProxy, token_server: TokenServer
) -> None:
    # A DNS name may resolve to a link-local or metadata address: the connected peer's
    # address is checked too. (The address is given with its zone, which a request
    # could not name: the connection is opened here as a resolved name would be.)
    address = link_local_address()
    assert address is not None
    accepted: list[object] = []

    def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        writer.close()

    server = await asyncio.start_server(accept, address, 0)
    port = server.sockets[0].getsockname()[1]
    app = await start_proxy(tunnel_config(token_server, port))
    try:
        with pytest.raises(HostNotAllowed, match="allow_link_local_targets"):
            await open_tunnel(address, port, guard_peer=True)
        plan = Plan(None, Origin("http", address, port), b"h", b"/", True, guard_peer=True)
        with pytest.raises(HostNotAllowed, match="allow_link_local_targets"):
            await app.forwarder._connection(plan, fresh=True)
        transport = await open_tunnel(address, port, guard_peer=False)  # the setting's way
        transport.close()
    finally:
        server.close()
        await server.wait_closed()
