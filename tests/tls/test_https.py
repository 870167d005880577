"""HTTPS: TLS interception of CONNECT, TLS to upstreams and to the token endpoint.

Everything runs for real on 127.0.0.1: an HTTPS upstream and an HTTPS token endpoint
with `trustme` certificates, the proxy with its local CA, and real clients (curl,
requests, aiohttp, and asyncio's own TLS where a test must look at the certificate).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import json
import logging
import os
import shutil
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
import requests
import trustme
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from proxy.app import ProxyApp
from proxy.config import (
    LimitsConfig,
    ProxyConfig,
    TlsClientConfig,
    TlsInterceptConfig,
    TokenConfig,
)
from proxy.ops.metrics import Metrics
from proxy.tls.intercept import TlsInterceptor
from tests.support.certificates import client_certificate_files, server_context
from tests.support.configs import (
    CLIENT_ID,
    CLIENT_SECRET,
    StartProxy,
    proxy_config,
    proxy_url,
    token_config,
    upstream_config,
)
from tests.support.token_server import TokenServer
from tests.support.upstream import Upstream
from tests.support.waiting import eventually

UTC = datetime.UTC


# ---------------------------------------------------------------------------
# Certificates and servers
# ---------------------------------------------------------------------------


@pytest.fixture
async def https_token_server(server_ca: trustme.CA) -> AsyncIterator[TokenServer]:
    async with TokenServer(
        clients={CLIENT_ID: CLIENT_SECRET}, ssl_context=server_context(server_ca)
    ) as server:
        yield server


def https_token(server: TokenServer, ca_file: Path, **changes: Any) -> TokenConfig:
    return token_config(server, tls=TlsClientConfig(ca_file=ca_file), **changes)


async def start_upstream(context: ssl.SSLContext | None, token_server: TokenServer) -> Upstream:
    """A recording upstream (HTTPS with `context`) that accepts the tokens `token_server` issued."""

    def validate(authorization: str | None) -> bool:
        if authorization is None or not authorization.startswith("Bearer "):
            return True
        return token_server.is_valid(authorization.removeprefix("Bearer "))

    upstream = Upstream(validate=validate)
    await upstream.start(ssl_context=context)
    return upstream


@pytest.fixture
async def https_upstream(
    server_ca: trustme.CA, https_token_server: TokenServer
) -> AsyncIterator[Upstream]:
    upstream = await start_upstream(server_context(server_ca), https_token_server)
    yield upstream
    await upstream.close()


# ---------------------------------------------------------------------------
# The intercepting proxy
# ---------------------------------------------------------------------------


def install_interceptor(app: ProxyApp, config: ProxyConfig) -> TlsInterceptor:
    """The app's interceptor, built from its config unless the app already wired one."""
    assert app.tunnels is not None
    assert app.forwarder is not None
    assert config.tls_intercept is not None
    if not isinstance(app.tunnels.interceptor, TlsInterceptor):
        app.tunnels.interceptor = TlsInterceptor.from_config(
            config.tls_intercept, app.forwarder, source=config.source
        )
    return app.tunnels.interceptor


class Intercepting:
    """A running proxy that intercepts CONNECTs to the HTTPS upstream."""

    def __init__(self, app: ProxyApp, interceptor: TlsInterceptor, ca_file: Path) -> None:
        self.app = app
        self.interceptor = interceptor
        self.ca_file = ca_file  # the local CA, as written for the application

    @property
    def url(self) -> str:
        return proxy_url(self.app)

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def intercepted(self) -> float:
        value = self.app.metrics.registry.get_sample_value(
            "token_proxy_tunnels_total", {"upstream": "inventory", "outcome": "intercepted"}
        )
        return value or 0.0


StartIntercepting = Callable[..., Awaitable[Intercepting]]


@pytest.fixture
def start_intercepting(
    start_proxy: StartProxy,
    https_token_server: TokenServer,
    https_upstream: Upstream,
    server_ca_file: Path,
    tmp_path: Path,
) -> StartIntercepting:
    async def start(
        *, upstream: Upstream | None = None, limits: LimitsConfig | None = None, **changes: Any
    ) -> Intercepting:
        target = upstream or https_upstream
        ca_file = tmp_path / "token-proxy-ca.pem"
        inventory = upstream_config(
            "inventory",
            [f"localhost:{target.port}", f"127.0.0.1:{target.port}"],
            https_token(https_token_server, server_ca_file),
            tls=TlsClientConfig(ca_file=server_ca_file),
            **changes,
        )
        config = proxy_config(
            inventory,
            connect_ports=(target.port,),
            tls_intercept=TlsInterceptConfig(write_ca_cert_to=ca_file),
            limits=limits or LimitsConfig(),
        )
        app = await start_proxy(config)
        return Intercepting(app, install_interceptor(app, config), ca_file)

    return start


async def connect_tls(
    proxy_port: int,
    authority: str,
    context: ssl.SSLContext,
    *,
    server_hostname: str,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """CONNECT through the proxy, then TLS inside the tunnel (asyncio's own client)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port)
    target = authority.encode()
    writer.write(b"CONNECT " + target + b" HTTP/1.1\r\nHost: " + target + b"\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 200 "), head
    try:
        await asyncio.wait_for(writer.start_tls(context, server_hostname=server_hostname), 10)
    except BaseException:
        writer.close()
        raise
    return reader, writer


async def exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> tuple[int, bytes, bytes]:
    """Send one HTTP/1.1 request; read a Content-Length-framed response."""
    writer.write(request)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    body = await asyncio.wait_for(reader.readexactly(length), 10)
    return int(head.split(b" ", 2)[1]), head, body


def peer_certificate(writer: asyncio.StreamWriter) -> x509.Certificate:
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der)


def bearer(token_server: TokenServer) -> str:
    assert token_server.issued, "no token was issued"
    return f"Bearer {token_server.issued[-1]}"


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    # The proxy may already have closed its side.
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        await writer.wait_closed()


def clean_env() -> dict[str, str]:
    """The environment without proxy settings, so only the explicit proxy is used."""
    return {
        key: value
        for key, value in os.environ.items()
        if key.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
    }


# ---------------------------------------------------------------------------
# Interception with real clients
# ---------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_curl_through_interception_gets_the_token_added(
    start_intercepting: StartIntercepting,
    https_upstream: Upstream,
    https_token_server: TokenServer,
    host: str,
) -> None:
    proxy = await start_intercepting()
    process = await asyncio.create_subprocess_exec(
        "curl",
        "--silent",
        "--show-error",
        "--fail",
        "--proxy",
        proxy.url,
        "--cacert",
        str(proxy.ca_file),
        f"https://{host}:{https_upstream.port}/api/stock?sku=1",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=clean_env(),
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, stderr.decode()
    assert json.loads(stdout)["path"] == "/api/stock?sku=1"
    seen = https_upstream.last()
    assert seen.all("Authorization") == [bearer(https_token_server)]
    assert seen.header("Host") == f"{host}:{https_upstream.port}"
    assert proxy.intercepted() == 1


async def test_requests_keeps_one_intercepted_connection_for_several_requests(
    start_intercepting: StartIntercepting,
    https_upstream: Upstream,
    https_token_server: TokenServer,
) -> None:
    proxy = await start_intercepting()
    base = f"https://localhost:{https_upstream.port}"

    def calls() -> list[int]:
        with requests.Session() as session:
            session.trust_env = False  # only the proxy given here
            session.proxies = {"https": proxy.url}
            session.verify = str(proxy.ca_file)
            statuses = [
                session.get(f"{base}/api/items/{n}", timeout=10).status_code for n in range(3)
            ]
            posted = session.post(f"{base}/api/orders", json={"sku": 7}, timeout=10)
            statuses.append(posted.status_code)
            assert json.loads(posted.json()["body"]) == {"sku": 7}
            return statuses

    assert await asyncio.to_thread(calls) == [200, 200, 200, 200]
    assert [r.path for r in https_upstream.received] == [
        "/api/items/0",
        "/api/items/1",
        "/api/items/2",
        "/api/orders",
    ]
    token = bearer(https_token_server)
    assert all(r.all("Authorization") == [token] for r in https_upstream.received)
    assert proxy.intercepted() == 1  # one CONNECT, one TLS session, four requests


async def test_aiohttp_sees_a_leaf_for_the_host_that_chains_to_the_local_ca(
    start_intercepting: StartIntercepting,
    https_upstream: Upstream,
    https_token_server: TokenServer,
) -> None:
    proxy = await start_intercepting()
    trusting = proxy.client_context()  # one context: aiohttp pools connections per context
    async with aiohttp.ClientSession() as session:
        for n in range(2):
            async with session.get(
                f"https://localhost:{https_upstream.port}/api/{n}",
                proxy=proxy.url,
                ssl=trusting,
            ) as response:
                assert response.status == 200
                assert json.loads(await response.read())["path"] == f"/api/{n}"
    assert [r.header("Authorization") for r in https_upstream.received] == [
        bearer(https_token_server)
    ] * 2
    assert proxy.intercepted() == 1

    ca = x509.load_pem_x509_certificate(proxy.ca_file.read_bytes())
    for host, expected in (
        ("localhost", x509.DNSName("localhost")),
        ("127.0.0.1", x509.IPAddress(ipaddress.ip_address("127.0.0.1"))),
    ):
        context = proxy.client_context()
        context.set_alpn_protocols(["h2", "http/1.1"])
        _, writer = await connect_tls(
            proxy.app.port, f"{host}:{https_upstream.port}", context, server_hostname=host
        )
        try:
            leaf = peer_certificate(writer)
            # An upstream that speaks only HTTP/1.1: h2 is not offered to the client.
            assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "http/1.1"
        finally:
            await close(writer)
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert list(san) == [expected]
        assert leaf.issuer == ca.subject
        leaf.verify_directly_issued_by(ca)
        usage = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
        assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
        assert lifetime <= datetime.timedelta(hours=25)  # short-lived


async def test_h2_is_offered_after_asking_the_origin_with_the_upstream_s_settings(
    start_intercepting: StartIntercepting,
    https_upstream: Upstream,
    https_token_server: TokenServer,
) -> None:
    # The upstream claims /api only and trusts a private CA; its origin speaks HTTP/1.1
    # only. A client that prefers h2 must get http/1.1, and its requests must work.
    proxy = await start_intercepting(path_prefix="/api")
    async with httpx.AsyncClient(
        proxy=proxy.url, verify=proxy.client_context(), http2=True, trust_env=False
    ) as client:
        response = await client.get(f"https://localhost:{https_upstream.port}/api/items")
    assert response.status_code == 200
    assert response.http_version == "HTTP/1.1"
    assert https_upstream.last().header("Authorization") == bearer(https_token_server)


@pytest.mark.parametrize("client", ["aiohttp", "curl"])
async def test_client_that_does_not_trust_the_ca_fails_cleanly(
    start_intercepting: StartIntercepting,
    https_upstream: Upstream,
    https_token_server: TokenServer,
    caplog: pytest.LogCaptureFixture,
    client: str,
) -> None:
    if client == "curl" and shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    proxy = await start_intercepting()
    url = f"https://localhost:{https_upstream.port}/api/secret"
    with caplog.at_level(logging.WARNING, logger="token_proxy.intercept"):
        if client == "aiohttp":
            untrusting = ssl.create_default_context()  # the system store only
            async with aiohttp.ClientSession() as session:
                with pytest.raises(aiohttp.ClientConnectorCertificateError):
                    await session.get(url, proxy=proxy.url, ssl=untrusting)
        else:
            process = await asyncio.create_subprocess_exec(
                "curl", "--silent", "--proxy", proxy.url, url, env=clean_env()
            )
            assert await asyncio.wait_for(process.wait(), 30) == 60  # peer certificate rejected
        await wait_until(lambda: _events(caplog, "intercept_handshake_failed"))
    (record,) = _events(caplog, "intercept_handshake_failed")
    assert "write_ca_cert_to" in getattr(record, "hint", "")
    if client == "curl":  # curl says why with a TLS alert
        assert "UNKNOWN_CA" in getattr(record, "error", "")
    assert https_upstream.received == []
    await wait_until(lambda: _open_connections(proxy.app) == 0)
    # The proxy carries on serving clients that do trust it.
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"https://localhost:{https_upstream.port}/api/fine",
            proxy=proxy.url,
            ssl=proxy.client_context(),
        ) as response,
    ):
        assert response.status == 200
    assert https_upstream.last().header("Authorization") == bearer(https_token_server)


async def test_sni_naming_another_host_is_refused(
    start_intercepting: StartIntercepting,
    https_upstream: Upstream,
    caplog: pytest.LogCaptureFixture,
) -> None:
    proxy = await start_intercepting()
    with caplog.at_level(logging.WARNING, logger="token_proxy.intercept"):
        # asyncio's TLS closes without flushing its alert: the client may only see a reset.
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await connect_tls(
                proxy.app.port,
                f"localhost:{https_upstream.port}",
                proxy.client_context(),
                server_hostname="bank.example",
            )
        await wait_until(lambda: _events(caplog, "intercept_handshake_failed"))
    assert _events(caplog, "intercept_sni_mismatch")
    assert https_upstream.received == []


async def test_request_naming_another_host_inside_the_tunnel_gets_no_token(
    start_intercepting: StartIntercepting, https_upstream: Upstream
) -> None:
    proxy = await start_intercepting()
    reader, writer = await connect_tls(
        proxy.app.port,
        f"localhost:{https_upstream.port}",
        proxy.client_context(),
        server_hostname="localhost",
    )
    try:
        status, _, body = await exchange(
            reader, writer, b"GET /api HTTP/1.1\r\nHost: elsewhere.example\r\n\r\n"
        )
    finally:
        await close(writer)
    assert status == 400
    assert json.loads(body)["error"] == "bad_request"
    assert https_upstream.received == []


async def test_a_closed_intercepted_websocket_leaves_no_asyncio_warning(
    start_intercepting: StartIntercepting,
    https_upstream: Upstream,
    https_token_server: TokenServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    proxy = await start_intercepting()
    url = f"wss://localhost:{https_upstream.port}/ws"
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(url, proxy=proxy_url(proxy.app), ssl=proxy.client_context()) as ws,
    ):
        hello = json.loads(await ws.receive_str())
        assert hello["authorization"] == f"Bearer {https_token_server.issued[-1]}"
        await ws.send_str("ping")
        assert await ws.receive_str() == "echo:ping"

    async def all_closed() -> bool:
        listener = proxy.app.forward_listener
        return listener is not None and not listener.connections

    await eventually(all_closed)
    assert "has no effect when using ssl" not in caplog.text


async def test_plain_http_inside_an_intercepting_tunnel_is_served_with_the_token(
    start_intercepting: StartIntercepting,
    https_upstream: Upstream,
    https_token_server: TokenServer,
) -> None:
    # undici's EnvHttpProxyAgent tunnels http:// too: the proxy sees HTTP, not a
    # ClientHello, and serves it (TLS onward to the upstream's url) instead of failing
    # the handshake.
    proxy = await start_intercepting(url=f"https://localhost:{https_upstream.port}")
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.app.port)
    target = b"localhost:%d" % https_upstream.port
    writer.write(b"CONNECT " + target + b" HTTP/1.1\r\nHost: " + target + b"\r\n\r\n")
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200 ")
        status, _, body = await exchange(
            reader, writer, b"GET /api/plain HTTP/1.1\r\nHost: " + target + b"\r\n\r\n"
        )
    finally:
        await close(writer)
    assert status == 200
    assert json.loads(body)["path"] == "/api/plain"
    seen = https_upstream.received[-1]
    assert seen.header("Authorization") == f"Bearer {https_token_server.issued[-1]}"
    assert tunnel_count(proxy.app, "plain_http") == 1


def tunnel_count(app: ProxyApp, outcome: str) -> float:
    value = app.metrics.registry.get_sample_value(
        "token_proxy_tunnels_total", {"upstream": "inventory", "outcome": outcome}
    )
    return value or 0.0


async def test_bytes_sent_before_the_connect_answer_are_refused(
    start_intercepting: StartIntercepting, https_upstream: Upstream
) -> None:
    proxy = await start_intercepting()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.app.port)
    target = b"localhost:%d" % https_upstream.port
    writer.write(b"CONNECT " + target + b" HTTP/1.1\r\nHost: " + target + b"\r\n\r\n\x16\x03\x01")
    try:
        response = await asyncio.wait_for(reader.read(), 10)
    finally:
        await close(writer)
    assert response.startswith(b"HTTP/1.1 400 ")
    assert https_upstream.received == []


# ---------------------------------------------------------------------------
# Upstream TLS: verification, origination, mutual TLS
# ---------------------------------------------------------------------------


async def test_upstream_with_an_untrusted_certificate_gets_502_and_no_token(
    start_intercepting: StartIntercepting, https_token_server: TokenServer
) -> None:
    # Signed by a CA that the upstream's ca_file does not name.
    impostor = await start_upstream(server_context(trustme.CA()), https_token_server)
    try:
        proxy = await start_intercepting(upstream=impostor)
        reader, writer = await connect_tls(
            proxy.app.port,
            f"localhost:{impostor.port}",
            proxy.client_context(),
            server_hostname="localhost",
        )
        try:
            request = b"GET /api HTTP/1.1\r\nHost: localhost:%d\r\n\r\n" % impostor.port
            status, _, body = await exchange(reader, writer, request)
        finally:
            await close(writer)
        assert status == 502
        document = json.loads(body)
        assert document["error"] == "upstream_unreachable"
        assert document["upstream"] == "inventory"
        assert impostor.received == []
        assert not any(token in body.decode() for token in https_token_server.issued)
    finally:
        await impostor.close()


async def test_tls_origination_for_clients_that_call_http(
    start_proxy: StartProxy,
    https_upstream: Upstream,
    https_token_server: TokenServer,
    server_ca_file: Path,
) -> None:
    inventory = upstream_config(
        "inventory",
        ["inventory.internal"],
        https_token(https_token_server, server_ca_file),
        url=f"https://127.0.0.1:{https_upstream.port}",
        tls=TlsClientConfig(ca_file=server_ca_file),
    )
    app = await start_proxy(proxy_config(inventory))
    async with (
        aiohttp.ClientSession() as session,
        session.get("http://inventory.internal/api/stock", proxy=proxy_url(app)) as response,
    ):
        assert response.status == 200
        assert json.loads(await response.read())["path"] == "/api/stock"
    # The upstream speaks only TLS: the request got there over HTTPS, with the token.
    assert https_upstream.last().header("Authorization") == bearer(https_token_server)


async def test_tls_origination_to_an_untrusted_upstream_is_502(
    start_proxy: StartProxy,
    https_token_server: TokenServer,
    server_ca_file: Path,
) -> None:
    impostor = await start_upstream(server_context(trustme.CA()), https_token_server)
    try:
        inventory = upstream_config(
            "inventory",
            ["inventory.internal"],
            https_token(https_token_server, server_ca_file),
            url=f"https://127.0.0.1:{impostor.port}",
            tls=TlsClientConfig(ca_file=server_ca_file),
        )
        app = await start_proxy(proxy_config(inventory))
        async with (
            aiohttp.ClientSession() as session,
            session.get("http://inventory.internal/api", proxy=proxy_url(app)) as response,
        ):
            assert response.status == 502
            assert (await response.json())["error"] == "upstream_unreachable"
        assert impostor.received == []
    finally:
        await impostor.close()


@pytest.mark.parametrize(
    "tls_version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["TLS1.2", "TLS1.3"]
)
async def test_mutual_tls_to_the_upstream(
    tls_version: ssl.TLSVersion,
    start_proxy: StartProxy,
    https_token_server: TokenServer,
    server_ca: trustme.CA,
    client_ca: trustme.CA,
    server_ca_file: Path,
    tmp_path: Path,
) -> None:
    # In TLS 1.2 the server asks for the certificate inside the handshake, so any
    # connection that leaves it out fails there (the ALPN probe of `http2: auto` too).
    context = server_context(server_ca, client_ca=client_ca)
    context.maximum_version = tls_version
    upstream = await start_upstream(context, https_token_server)
    try:
        cert, key = client_certificate_files(client_ca, "order-service.clients.test", tmp_path)
        with_identity = TlsClientConfig(
            ca_file=server_ca_file, client_cert_file=cert, client_key_file=key
        )
        token = https_token(https_token_server, server_ca_file)
        config = proxy_config(
            upstream_config(
                "inventory",
                ["inventory.internal"],
                token,
                url=f"https://127.0.0.1:{upstream.port}",
                tls=with_identity,
            ),
            upstream_config(
                "anonymous",
                ["anonymous.internal"],
                token,
                url=f"https://127.0.0.1:{upstream.port}",
                tls=TlsClientConfig(ca_file=server_ca_file),
            ),
        )
        app = await start_proxy(config)
        async with aiohttp.ClientSession() as session:
            async with session.get("http://inventory.internal/api", proxy=proxy_url(app)) as ok:
                assert ok.status == 200
            async with session.get("http://anonymous.internal/api", proxy=proxy_url(app)) as no:
                # The upstream refuses a TLS client without a certificate.
                assert no.status == 502
        assert len(upstream.received) == 1
        assert upstream.last().header("Authorization") is not None
    finally:
        await upstream.close()


# ---------------------------------------------------------------------------
# The token endpoint over TLS
# ---------------------------------------------------------------------------


async def test_https_token_endpoint_verified_with_its_ca_file(
    start_proxy: StartProxy, https_token_server: TokenServer, server_ca_file: Path
) -> None:
    upstream = await start_upstream(None, https_token_server)
    try:
        inventory = upstream_config(
            "inventory",
            ["inventory.internal"],
            https_token(https_token_server, server_ca_file),
            url=upstream.url,
        )
        app = await start_proxy(proxy_config(inventory))
        async with (
            aiohttp.ClientSession() as session,
            session.get("http://inventory.internal/x", proxy=proxy_url(app)) as response,
        ):
            assert response.status == 200
        assert https_token_server.url.startswith("https://")
        assert [r.outcome for r in https_token_server.requests] == ["issued"]
        assert upstream.last().header("Authorization") == bearer(https_token_server)
    finally:
        await upstream.close()


async def test_untrusted_token_endpoint_never_sees_the_client_secret(
    start_proxy: StartProxy, https_token_server: TokenServer
) -> None:
    # No ca_file: the system store does not know the endpoint's CA.
    inventory = upstream_config(
        "inventory",
        ["inventory.internal"],
        token_config(https_token_server),
        url="http://127.0.0.1:9",
    )
    app = await start_proxy(proxy_config(inventory))
    labels = {"upstream": "inventory", "reason": "connect"}
    await wait_until(
        lambda: app.metrics.registry.get_sample_value(
            "token_proxy_token_fetch_failures_total", labels
        )
    )
    assert https_token_server.requests == []  # the handshake failed before any request


async def test_tls_client_auth_at_the_token_endpoint(
    start_proxy: StartProxy,
    server_ca: trustme.CA,
    client_ca: trustme.CA,
    server_ca_file: Path,
    tmp_path: Path,
) -> None:
    # RFC 8705 §2: the client certificate, not a secret, authenticates the client.
    context = server_context(server_ca)
    client_ca.configure_trust(context)
    context.verify_mode = ssl.CERT_OPTIONAL
    cert, key = client_certificate_files(client_ca, "order-service.clients.test", tmp_path)
    async with TokenServer(
        clients={}, tls_clients={CLIENT_ID: "order-service.clients.test"}, ssl_context=context
    ) as server:
        upstream = await start_upstream(None, server)
        try:
            token = token_config(
                server,
                auth_method="tls_client_auth",
                client_secret=None,
                tls=TlsClientConfig(
                    ca_file=server_ca_file, client_cert_file=cert, client_key_file=key
                ),
            )
            inventory = upstream_config(
                "inventory", ["inventory.internal"], token, url=upstream.url
            )
            app = await start_proxy(proxy_config(inventory))
            async with (
                aiohttp.ClientSession() as session,
                session.get("http://inventory.internal/x", proxy=proxy_url(app)) as response,
            ):
                assert response.status == 200
            assert [(r.auth_method, r.outcome) for r in server.requests] == [
                ("tls_client_auth", "issued")
            ]
            assert upstream.last().header("Authorization") == bearer(server)
        finally:
            await upstream.close()


# ---------------------------------------------------------------------------
# The decrypted connection lives by the listener's rules
# ---------------------------------------------------------------------------


async def test_intercepted_connection_is_counted_and_idles_out(
    start_intercepting: StartIntercepting, https_upstream: Upstream
) -> None:
    proxy = await start_intercepting(limits=LimitsConfig(idle_timeout=2.0))
    listener = proxy.app.forward_listener
    assert listener is not None
    reader, writer = await connect_tls(
        proxy.app.port,
        f"localhost:{https_upstream.port}",
        proxy.client_context(),
        server_hostname="localhost",
    )
    try:
        request = b"GET /a HTTP/1.1\r\nHost: localhost:%d\r\n\r\n" % https_upstream.port
        status, _, _ = await exchange(reader, writer, request)
        assert status == 200
        # The decrypted connection replaced the plain one in the listener.
        assert len(listener.connections) == 1
        assert _open_connections(proxy.app) == 1
        # Idle keep-alive: closed by the listener's sweeper, with a TLS close_notify.
        assert await asyncio.wait_for(reader.read(), 10) == b""
    finally:
        await close(writer)
    await wait_until(lambda: not listener.connections)
    assert _open_connections(proxy.app) == 0


async def test_shutdown_closes_idle_intercepted_connections_at_once(
    https_token_server: TokenServer,
    https_upstream: Upstream,
    server_ca_file: Path,
    tmp_path: Path,
) -> None:
    config = proxy_config(
        upstream_config(
            "inventory",
            [f"localhost:{https_upstream.port}"],
            https_token(https_token_server, server_ca_file),
            tls=TlsClientConfig(ca_file=server_ca_file),
        ),
        connect_ports=(https_upstream.port,),
        tls_intercept=TlsInterceptConfig(write_ca_cert_to=tmp_path / "ca.pem"),
        shutdown_grace_period=30.0,
    )
    app = ProxyApp(config, metrics=Metrics())
    await app.start()
    try:
        install_interceptor(app, config)
        context = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        reader, writer = await connect_tls(
            app.port, f"localhost:{https_upstream.port}", context, server_hostname="localhost"
        )
        request = b"GET /a HTTP/1.1\r\nHost: localhost:%d\r\n\r\n" % https_upstream.port
        assert (await exchange(reader, writer, request))[0] == 200
    finally:
        # Far quicker than the 30 s grace period: the connection was idle.
        await asyncio.wait_for(app.shutdown(), 10)
    try:
        assert await asyncio.wait_for(reader.read(), 10) == b""
    finally:
        await close(writer)


def test_interception_on_uvloop(
    server_ca: trustme.CA, server_ca_file: Path, tmp_path: Path
) -> None:
    """`token-proxy run` prefers uvloop: start_tls and the hand-over must work there too."""
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> tuple[int, str, str]:
        async with TokenServer(
            clients={CLIENT_ID: CLIENT_SECRET}, ssl_context=server_context(server_ca)
        ) as token_server:
            upstream = await start_upstream(server_context(server_ca), token_server)
            config = proxy_config(
                upstream_config(
                    "inventory",
                    [f"localhost:{upstream.port}"],
                    https_token(token_server, server_ca_file),
                    tls=TlsClientConfig(ca_file=server_ca_file),
                ),
                connect_ports=(upstream.port,),
                tls_intercept=TlsInterceptConfig(write_ca_cert_to=tmp_path / "ca.pem"),
            )
            app = ProxyApp(config, metrics=Metrics())
            await app.start()
            try:
                install_interceptor(app, config)
                context = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
                async with aiohttp.ClientSession() as session:
                    for _ in range(2):
                        async with session.get(
                            f"https://localhost:{upstream.port}/api",
                            proxy=proxy_url(app),
                            ssl=context,
                        ) as response:
                            status = response.status
                            await response.read()
                seen = upstream.last().header("Authorization") or ""
                return status, seen, bearer(token_server)
            finally:
                await app.shutdown()
                await upstream.close()

    status, seen, expected = uvloop.run(scenario())
    assert status == 200
    assert seen == expected


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _events(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == event]


def _open_connections(app: ProxyApp) -> float:
    value = app.metrics.registry.get_sample_value("token_proxy_client_connections")
    return value or 0.0


async def wait_until(predicate: Callable[[], object], within: float = 10.0) -> None:
    """Poll `predicate` until it holds, failing after `within` seconds."""
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)
