"""HTTP clients that speak HTTP/2 (httpx with `http2=True`, `curl --http2`) through the
proxy's interception, to an upstream that speaks only HTTP/2: the token arrives, and
the answer comes back in HTTP/2. And h2c with prior knowledge to an upstream's port."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trustme

from proxy.app import ProxyApp
from proxy.config import TlsClientConfig, TlsInterceptConfig
from tests.support.configs import StartProxy, proxy_config, token_config, upstream_config
from tests.support.h2_upstream import H2Upstream
from tests.support.token_server import TokenServer

WITHIN = 20.0


@pytest.fixture
async def h2_upstream(server_ca: trustme.CA) -> AsyncIterator[H2Upstream]:
    upstream = H2Upstream()
    await upstream.start(server_ca)
    yield upstream
    await upstream.close()


@pytest.fixture
async def intercepting(
    start_proxy: StartProxy,
    token_server: TokenServer,
    h2_upstream: H2Upstream,
    server_ca_file: Path,
    tmp_path: Path,
) -> tuple[ProxyApp, Path]:
    ca_file = tmp_path / "token-proxy-ca.pem"
    inventory = upstream_config(
        "inventory",
        [f"localhost:{h2_upstream.port}"],
        token_config(token_server),
        tls=TlsClientConfig(ca_file=server_ca_file),
    )
    config = proxy_config(
        inventory,
        connect_ports=(h2_upstream.port,),
        tls_intercept=TlsInterceptConfig(write_ca_cert_to=ca_file),
    )
    return await start_proxy(config), ca_file


def bearer(token_server: TokenServer) -> str:
    assert token_server.issued, "no token was issued"
    return f"Bearer {token_server.issued[-1]}"


async def test_httpx_http2_through_interception(
    intercepting: tuple[ProxyApp, Path], h2_upstream: H2Upstream, token_server: TokenServer
) -> None:
    app, ca_file = intercepting
    trusting = ssl.create_default_context(cafile=str(ca_file))
    async with httpx.AsyncClient(
        proxy=f"http://127.0.0.1:{app.port}", verify=trusting, http2=True, trust_env=False
    ) as client:
        for index in range(3):
            response = await client.post(
                f"https://localhost:{h2_upstream.port}/api/stock/{index}",
                content=b"x" * 100_000,
                headers={"Authorization": "Bearer the-applications-own"},
                timeout=WITHIN,
            )
            assert response.http_version == "HTTP/2"
            assert response.status_code == 200
            seen = response.json()
            assert seen["path"] == f"/api/stock/{index}"
            assert seen["body_size"] == 100_000
            assert seen["authorization"] == bearer(token_server)  # replaced (overwrite)
    assert [request.headers.get("authorization") for request in h2_upstream.received] == [
        bearer(token_server)
    ] * 3
    requests = app.metrics.registry.get_sample_value(
        "token_proxy_requests_total", {"upstream": "inventory", "code": "200"}
    )
    assert requests == 3


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_curl_http2_through_interception(
    intercepting: tuple[ProxyApp, Path], h2_upstream: H2Upstream, token_server: TokenServer
) -> None:
    app, ca_file = intercepting
    environment = {
        key: value
        for key, value in os.environ.items()
        if key.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
    }
    process = await asyncio.create_subprocess_exec(
        "curl",
        "--silent",
        "--show-error",
        "--fail",
        "--http2",
        "--write-out",
        "\n%{http_version}",
        "--proxy",
        f"http://127.0.0.1:{app.port}",
        "--cacert",
        str(ca_file),
        f"https://localhost:{h2_upstream.port}/api/stock?sku=1",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=environment,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), WITHIN)
    assert process.returncode == 0, stderr.decode()
    body, _, version = stdout.decode().rpartition("\n")
    assert version == "2"
    seen = json.loads(body)
    assert seen["path"] == "/api/stock?sku=1"
    assert seen["authorization"] == bearer(token_server)
