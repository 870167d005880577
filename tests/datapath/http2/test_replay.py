"""A 401 to the token an HTTP/2 stream from the application carried: the token is
replaced and the request sent again on a new upstream stream, as on HTTP/1.1, when its
method allows it and its body was kept; otherwise the 401 reaches the client."""

from __future__ import annotations

import hashlib
import os
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trustme

from proxy.app import ProxyApp
from proxy.config import TlsClientConfig, TlsInterceptConfig
from tests.support.configs import StartProxy, proxy_config, token_config, upstream_config
from tests.support.h2_api import H2Api
from tests.support.token_server import TokenServer

WITHIN = 20.0


class _RefuseFirst:
    """Refuses the first `authorization` it sees, and only that one."""

    def __init__(self) -> None:
        self.refused: list[str] = []

    def __call__(self, authorization: str | None) -> bool:
        if authorization is not None and not self.refused:
            self.refused.append(authorization)
        return authorization in self.refused


@pytest.fixture
async def refusing_api(server_ca: trustme.CA) -> AsyncIterator[H2Api]:
    api = H2Api(refuse=_RefuseFirst())
    await api.start(server_ca)
    yield api
    await api.close()


@pytest.fixture
async def intercepting(
    start_proxy: StartProxy,
    token_server: TokenServer,
    refusing_api: H2Api,
    server_ca_file: Path,
    tmp_path: Path,
) -> tuple[ProxyApp, ssl.SSLContext]:
    ca_file = tmp_path / "token-proxy-ca.pem"
    inventory = upstream_config(
        "inventory",
        [f"localhost:{refusing_api.port}"],
        token_config(token_server),
        tls=TlsClientConfig(ca_file=server_ca_file),
    )
    app = await start_proxy(
        proxy_config(
            inventory,
            connect_ports=(refusing_api.port,),
            tls_intercept=TlsInterceptConfig(write_ca_cert_to=ca_file),
        )
    )
    return app, ssl.create_default_context(cafile=str(ca_file))


def _retries(app: ProxyApp) -> float | None:
    return app.metrics.registry.get_sample_value(
        "token_proxy_upstream_unauthorized_retries_total", {"upstream": "inventory"}
    )


@pytest.mark.parametrize("size", [0, 20_000])
async def test_an_h2_request_is_replayed_with_a_new_token(
    size: int,
    intercepting: tuple[ProxyApp, ssl.SSLContext],
    refusing_api: H2Api,
    token_server: TokenServer,
) -> None:
    app, trusting = intercepting
    body = os.urandom(size)
    async with httpx.AsyncClient(
        proxy=f"http://127.0.0.1:{app.port}", verify=trusting, http2=True, trust_env=False
    ) as client:
        response = await client.put(
            f"https://localhost:{refusing_api.port}/api/stock/1", content=body, timeout=WITHIN
        )
    assert response.http_version == "HTTP/2"
    assert response.status_code == 200
    assert len(token_server.issued) == 2
    second = f"Bearer {token_server.issued[1]}"
    seen = response.json()
    assert seen["authorization"] == second
    assert seen["body_size"] == size
    assert seen["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert [request.headers.get("authorization") for request in refusing_api.received] == [
        f"Bearer {token_server.issued[0]}",
        second,
    ]
    assert _retries(app) == 1


async def test_an_h2_post_gets_the_401_and_drops_the_token(
    intercepting: tuple[ProxyApp, ssl.SSLContext],
    refusing_api: H2Api,
    token_server: TokenServer,
) -> None:
    app, trusting = intercepting
    async with httpx.AsyncClient(
        proxy=f"http://127.0.0.1:{app.port}", verify=trusting, http2=True, trust_env=False
    ) as client:
        url = f"https://localhost:{refusing_api.port}/api/orders"
        first = await client.post(url, content=b"order", timeout=WITHIN)
        assert first.status_code == 401  # not idempotent: not sent again
        second = await client.post(url, content=b"order", timeout=WITHIN)
    assert second.status_code == 200
    assert len(refusing_api.received) == 2
    assert len(token_server.issued) == 2  # the refused token was dropped
    assert second.json()["authorization"] == f"Bearer {token_server.issued[1]}"
    assert not _retries(app)
