"""HTTP/1.1 clients (curl, requests, httpx, a raw socket) whose requests the proxy sends
to the upstream in HTTP/2: through the forward port with TLS origination (`url:
https://...`) and through interception with an http/1.1 client. The token arrives in
`authorization`, bodies arrive whole both ways, a slow client slows the upstream down,
a refused token is replaced and the request replayed, and the `http2` setting decides."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import resource
import shutil
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import h11
import httpx
import pytest
import requests
import trustme

from proxy.app import ProxyApp
from proxy.config import DpopConfig, TlsClientConfig, TlsInterceptConfig, UpstreamConfig
from tests.support.certificates import client_certificate_files
from tests.support.configs import (
    CLIENT_ID,
    CLIENT_SECRET,
    StartProxy,
    proxy_config,
    token_config,
    upstream_config,
)
from tests.support.dpop_servers import DpopAuthority
from tests.support.h2_api import H2Api
from tests.support.token_server import TokenServer
from tests.support.upstream import Upstream
from tests.support.waiting import eventually

WITHIN = 20.0
MIB = 1024 * 1024
HOST = "inventory.internal"


async def _api(ca: trustme.CA, **options: Any) -> H2Api:
    api = H2Api(**options)
    await api.start(ca)
    return api


@pytest.fixture
async def h2_only(server_ca: trustme.CA) -> AsyncIterator[H2Api]:
    api = await _api(server_ca)
    yield api
    await api.close()


async def _intercepting(
    start_proxy: StartProxy, directory: Path, port: int, *upstreams: UpstreamConfig
) -> tuple[ProxyApp, ssl.SSLContext]:
    """A proxy intercepting CONNECTs to `port` for `upstreams`, and a client context
    trusting its CA."""
    ca_file = directory / "token-proxy-ca.pem"
    app = await start_proxy(
        proxy_config(
            *upstreams,
            connect_ports=(port,),
            tls_intercept=TlsInterceptConfig(write_ca_cert_to=ca_file),
        )
    )
    return app, ssl.create_default_context(cafile=str(ca_file))


@pytest.fixture
def originating(
    start_proxy: StartProxy, token_server: TokenServer, server_ca_file: Path
) -> Callable[..., Any]:
    """A proxy sending `inventory.internal` to `https://localhost:<port>` of an API."""

    async def start(api_port: int, **changes: Any) -> ProxyApp:
        inventory = upstream_config(
            "inventory",
            [HOST],
            token_config(token_server),
            url=f"https://localhost:{api_port}",
            tls=TlsClientConfig(ca_file=server_ca_file),
            **changes,
        )
        return await start_proxy(proxy_config(inventory))

    return start


def bearer(token_server: TokenServer, index: int = -1) -> str:
    assert token_server.issued, "no token was issued"
    return f"Bearer {token_server.issued[index]}"


def _environment() -> dict[str, str]:
    return {
        key: value
        for key, value in os.environ.items()
        if key.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
    }


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_curl_http11_to_an_h2_only_origin(
    originating: Callable[..., Any], h2_only: H2Api, token_server: TokenServer
) -> None:
    app = await originating(h2_only.port)
    process = await asyncio.create_subprocess_exec(
        "curl",
        "--silent",
        "--show-error",
        "--http1.1",
        "--include",
        "--proxy",
        f"http://127.0.0.1:{app.port}",
        f"http://{HOST}/api/stock?sku=1",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=_environment(),
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), WITHIN)
    assert process.returncode == 0, stderr.decode()
    head, _, body = stdout.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 200")
    assert "\r\nVia: 2 token-proxy" in head  # received from the upstream as HTTP/2
    seen = json.loads(body)
    assert seen["protocol"] == "h2"
    assert seen["path"] == "/api/stock?sku=1"
    assert seen["authorization"] == bearer(token_server)
    requests_total = app.metrics.registry.get_sample_value(
        "token_proxy_requests_total", {"upstream": "inventory", "code": "200"}
    )
    assert requests_total == 1


async def test_trailers_the_bridge_drops_are_not_announced(
    originating: Callable[..., Any], h2_only: H2Api
) -> None:
    app = await originating(h2_only.port)
    async with httpx.AsyncClient(
        proxy=f"http://127.0.0.1:{app.port}", trust_env=False, headers={"TE": "trailers"}
    ) as client:
        response = await client.get(f"http://{HOST}/trailers", timeout=WITHIN)
    assert response.status_code == 200
    assert response.json()["path"] == "/trailers"  # the whole body
    # An HTTP/1.1 client is sent no trailers here, so it must not be told of any.
    assert "trailer" not in response.headers
    assert "x-checksum" not in response.headers


async def test_requests_post_body_arrives_whole_over_h2(
    originating: Callable[..., Any], h2_only: H2Api, token_server: TokenServer
) -> None:
    app = await originating(h2_only.port)
    body = os.urandom(700_000)  # well over the upstream's initial stream window

    def post() -> requests.Response:
        with requests.Session() as session:
            session.trust_env = False
            return session.post(
                f"http://{HOST}/api/orders",
                data=body,
                proxies={"http": f"http://127.0.0.1:{app.port}"},
                timeout=WITHIN,
            )

    response = await asyncio.wait_for(asyncio.to_thread(post), WITHIN + 5)
    assert response.status_code == 200
    seen = response.json()
    assert seen["protocol"] == "h2"
    assert seen["method"] == "POST"
    assert seen["body_size"] == len(body)
    assert seen["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert seen["authorization"] == bearer(token_server)


async def test_httpx_chunked_upload_arrives_whole_over_h2(
    originating: Callable[..., Any], h2_only: H2Api, token_server: TokenServer
) -> None:
    app = await originating(h2_only.port)
    pieces = [os.urandom(50_000) for _ in range(10)]

    async def upload() -> AsyncIterator[bytes]:
        for piece in pieces:
            yield piece

    async with httpx.AsyncClient(proxy=f"http://127.0.0.1:{app.port}", trust_env=False) as client:
        response = await client.post(f"http://{HOST}/api/orders", content=upload(), timeout=WITHIN)
    assert response.http_version == "HTTP/1.1"
    assert response.status_code == 200
    seen = response.json()
    assert seen["protocol"] == "h2"
    assert seen["body_size"] == sum(map(len, pieces))
    assert seen["body_sha256"] == hashlib.sha256(b"".join(pieces)).hexdigest()
    assert seen["authorization"] == bearer(token_server)
    (received,) = h2_only.received
    assert "content-length" not in received.headers  # chunked: no length to give


async def test_intercepted_http11_client_reaches_an_h2_only_origin(
    start_proxy: StartProxy,
    token_server: TokenServer,
    h2_only: H2Api,
    server_ca_file: Path,
    tmp_path: Path,
) -> None:
    inventory = upstream_config(
        "inventory",
        [f"localhost:{h2_only.port}"],
        token_config(token_server),
        tls=TlsClientConfig(ca_file=server_ca_file),
    )
    app, trusting = await _intercepting(start_proxy, tmp_path, h2_only.port, inventory)
    async with httpx.AsyncClient(
        proxy=f"http://127.0.0.1:{app.port}", verify=trusting, http2=False, trust_env=False
    ) as client:
        for index in range(2):
            response = await client.get(
                f"https://localhost:{h2_only.port}/api/stock/{index}",
                headers={"Authorization": "Bearer the-applications-own"},
                timeout=WITHIN,
            )
            assert response.http_version == "HTTP/1.1"
            assert response.status_code == 200
            seen = response.json()
            assert seen["protocol"] == "h2"
            assert seen["path"] == f"/api/stock/{index}"
            assert seen["authorization"] == bearer(token_server)  # replaced (overwrite)
    assert len(h2_only.received) == 2


@pytest.mark.parametrize(("legacy_http2", "version"), [("auto", "HTTP/2"), ("off", "HTTP/1.1")])
async def test_interception_offers_h2_when_every_upstream_of_the_host_speaks_it(
    legacy_http2: str,
    version: str,
    start_proxy: StartProxy,
    token_server: TokenServer,
    server_ca: trustme.CA,
    server_ca_file: Path,
    tmp_path: Path,
) -> None:
    # Two upstreams share the host, each claiming a path; neither claims `/`. One TLS
    # session carries both: h2 is offered when both would send in HTTP/2.
    api = await _api(server_ca, alpn=("h2", "http/1.1"))
    try:
        host = f"localhost:{api.port}"
        tls = TlsClientConfig(ca_file=server_ca_file)
        token = token_config(token_server)
        app, trusting = await _intercepting(
            start_proxy,
            tmp_path,
            api.port,
            upstream_config("inventory", [host], token, tls=tls, path_prefix="/api"),
            upstream_config(
                "legacy", [host], token, tls=tls, path_prefix="/legacy", http2=legacy_http2
            ),
        )
        async with httpx.AsyncClient(
            proxy=f"http://127.0.0.1:{app.port}", verify=trusting, http2=True, trust_env=False
        ) as client:
            for path in ("/api/stock/1", "/legacy/stock/1"):
                response = await client.get(f"https://{host}{path}", timeout=WITHIN)
                assert response.status_code == 200
                assert response.http_version == version
                assert token_server.is_valid(
                    response.json()["authorization"].removeprefix("Bearer ")
                )
        protocol = "h2" if legacy_http2 == "auto" else "http/1.1"
        assert [request.protocol for request in api.received][-1] == protocol
    finally:
        await api.close()


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


async def test_a_large_download_to_a_slow_client_is_paced_not_buffered(
    originating: Callable[..., Any], h2_only: H2Api
) -> None:
    size = 64 * MIB
    app = await originating(h2_only.port)
    before = _rss()
    reader, writer = await asyncio.open_connection("127.0.0.1", app.port)
    try:
        writer.write(
            b"GET http://%b/download/%d HTTP/1.1\r\nHost: %b\r\n\r\n"
            % (HOST.encode(), size, HOST.encode())
        )

        last = [-1]

        async def upstream_held_back() -> bool:
            sent, last[0] = last[0], h2_only.sent
            return h2_only.blocked and sent == h2_only.sent

        # The client reads nothing: the upstream is soon held back by flow control (and
        # stays so), having sent what the windows and socket buffers on the way hold.
        await eventually(upstream_held_back, within=WITHIN)
        assert h2_only.sent < 24 * MIB
        peak = _rss()
        conn = h11.Connection(h11.CLIENT)
        received = 0
        response: h11.Response | None = None
        for _ in range(size // 1024 + 1000):
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await asyncio.wait_for(reader.read(256 * 1024), WITHIN)
                conn.receive_data(data)
                peak = max(peak, _rss())
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                received += len(event.data)
            elif isinstance(event, h11.EndOfMessage):
                break
        else:
            raise AssertionError("the download did not end")
    finally:
        writer.close()
    assert response is not None
    assert response.status_code == 200
    assert (b"transfer-encoding", b"chunked") in list(response.headers)  # no length given
    assert received == size
    assert h2_only.sent == size
    assert peak - before < 48 * MIB, f"RSS grew by {(peak - before) / MIB:.0f} MiB"


async def test_a_refused_token_is_replaced_and_the_request_replayed(
    originating: Callable[..., Any], server_ca: trustme.CA, token_server: TokenServer
) -> None:
    refused: list[str] = []

    def refuse(authorization: str | None) -> bool:
        if authorization is not None and not refused:
            refused.append(authorization)
        return authorization in refused

    api = await _api(server_ca, refuse=refuse)
    try:
        app = await originating(api.port)
        body = os.urandom(10_000)
        async with httpx.AsyncClient(
            proxy=f"http://127.0.0.1:{app.port}", trust_env=False
        ) as client:
            response = await client.put(f"http://{HOST}/api/stock/7", content=body, timeout=WITHIN)
        assert response.status_code == 200
        assert len(token_server.issued) == 2  # one new token fetched
        seen = response.json()
        assert seen["authorization"] == bearer(token_server, 1)
        assert seen["body_size"] == len(body)
        assert seen["body_sha256"] == hashlib.sha256(body).hexdigest()
        assert [request.headers.get("authorization") for request in api.received] == [
            bearer(token_server, 0),
            bearer(token_server, 1),
        ]
        retries = app.metrics.registry.get_sample_value(
            "token_proxy_upstream_unauthorized_retries_total", {"upstream": "inventory"}
        )
        assert retries == 1
    finally:
        await api.close()


@pytest.mark.parametrize(("mode", "protocol"), [("off", "http/1.1"), ("auto", "h2")])
async def test_the_http2_setting_decides_for_an_origin_offering_both(
    mode: str,
    protocol: str,
    originating: Callable[..., Any],
    server_ca: trustme.CA,
    token_server: TokenServer,
) -> None:
    api = await _api(server_ca, alpn=("h2", "http/1.1"))
    try:
        app = await originating(api.port, http2=mode)
        async with httpx.AsyncClient(
            proxy=f"http://127.0.0.1:{app.port}", trust_env=False
        ) as client:
            for _ in range(2):
                response = await client.get(f"http://{HOST}/api/stock/1", timeout=WITHIN)
                assert response.status_code == 200
                assert response.json()["authorization"] == bearer(token_server)
        assert [request.protocol for request in api.received] == [protocol, protocol]
    finally:
        await api.close()


async def test_required_http2_to_an_http11_only_origin_is_502(
    originating: Callable[..., Any], server_ca: trustme.CA, token_server: TokenServer
) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ca.issue_cert("localhost", "127.0.0.1").configure_cert(context)
    upstream = Upstream()
    await upstream.start(ssl_context=context)
    try:
        app = await originating(upstream.port, http2="required")
        async with httpx.AsyncClient(
            proxy=f"http://127.0.0.1:{app.port}", trust_env=False
        ) as client:
            response = await client.get(f"http://{HOST}/api/stock/1", timeout=WITHIN)
        assert response.status_code == 502
        assert response.headers["content-type"] == "application/json"
        answer = response.json()
        assert answer["error"] == "upstream_unreachable"
        assert answer["upstream"] == "inventory"
        assert "HTTP/2" in answer["detail"]
        assert upstream.received == []
    finally:
        await upstream.close()


async def test_required_http2_to_a_cleartext_http11_origin_is_502(
    start_proxy: StartProxy, token_server: TokenServer, upstream: Upstream
) -> None:
    inventory = upstream_config(
        "inventory", [HOST], token_config(token_server), url=upstream.url, http2="required"
    )
    app = await start_proxy(proxy_config(inventory))
    async with httpx.AsyncClient(proxy=f"http://127.0.0.1:{app.port}", trust_env=False) as client:
        response = await client.get(f"http://{HOST}/api/stock/1", timeout=WITHIN)
    assert response.status_code == 502
    answer = response.json()
    assert answer["error"] == "upstream_unreachable"
    assert "HTTP/2 with prior knowledge" in answer["detail"]
    assert upstream.received == []  # the preface is no HTTP/1.1 request


async def test_mutual_tls_to_an_origin_offering_h2_presents_the_client_certificate(
    start_proxy: StartProxy,
    token_server: TokenServer,
    server_ca: trustme.CA,
    server_ca_file: Path,
    client_ca: trustme.CA,
    tmp_path: Path,
) -> None:
    # `http2: auto` (the default) meets an origin that selects h2 and wants a client
    # certificate: the HTTP/2 connection must present the same identity HTTP/1.1 would.
    api = H2Api(alpn=("h2", "http/1.1"))
    await api.start(server_ca, client_ca=client_ca)
    try:
        cert, key = client_certificate_files(client_ca, "order-service.clients.test", tmp_path)
        url = f"https://localhost:{api.port}"
        with_identity = TlsClientConfig(
            ca_file=server_ca_file, client_cert_file=cert, client_key_file=key
        )
        token = token_config(token_server)
        config = proxy_config(
            upstream_config("inventory", [HOST], token, url=url, tls=with_identity),
            upstream_config(
                "anonymous",
                ["anonymous.internal"],
                token,
                url=url,
                tls=TlsClientConfig(ca_file=server_ca_file),
            ),
        )
        app = await start_proxy(config)
        async with httpx.AsyncClient(
            proxy=f"http://127.0.0.1:{app.port}", trust_env=False
        ) as client:
            for _ in range(2):
                response = await client.get(f"http://{HOST}/api/stock/1", timeout=WITHIN)
                assert response.status_code == 200
                seen = response.json()
                assert seen["protocol"] == "h2"
                assert token_server.is_valid(seen["authorization"].removeprefix("Bearer "))
            # The origin refuses a TLS client without a certificate.
            refused = await client.get("http://anonymous.internal/api/stock/1", timeout=WITHIN)
            assert refused.status_code == 502
            assert refused.json()["error"] == "upstream_unreachable"
        assert len(api.received) == 2
    finally:
        await api.close()


async def test_a_dpop_nonce_challenge_is_answered_over_h2(
    start_proxy: StartProxy, server_ca: trustme.CA, server_ca_file: Path
) -> None:
    authority = DpopAuthority()
    async with TokenServer(clients={CLIENT_ID: CLIENT_SECRET}, dpop=authority) as dpop_tokens:
        api = await _api(server_ca, dpop_nonce="n-1")
        try:
            inventory = upstream_config(
                "inventory",
                [HOST],
                token_config(dpop_tokens, dpop=DpopConfig()),
                url=f"https://localhost:{api.port}",
                tls=TlsClientConfig(ca_file=server_ca_file),
            )
            app = await start_proxy(proxy_config(inventory))
            async with httpx.AsyncClient(
                proxy=f"http://127.0.0.1:{app.port}", trust_env=False
            ) as client:
                response = await client.get(f"http://{HOST}/api/stock/1", timeout=WITHIN)
        finally:
            await api.close()
    assert response.status_code == 200
    assert response.json()["authorization"].startswith("DPoP ")
    first, second = api.received
    assert first.headers["authorization"] == second.headers["authorization"]  # same token
    assert first.headers["dpop"] != second.headers["dpop"]  # a new proof, with the nonce
    retries = app.metrics.registry.get_sample_value(
        "token_proxy_dpop_nonce_retries_total", {"upstream": "inventory", "server": "resource"}
    )
    assert retries == 1
