"""Fixtures of the HTTP/2 server-side tests: a real grpcio upstream behind a proxy that
intercepts CONNECTs to it (TLS, the client trusting the proxy's CA), and the same
upstream in cleartext behind an upstream's own `listen` port (h2c)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import trustme

from proxy.app import ProxyApp
from proxy.config import Address, LimitsConfig, TlsClientConfig, TlsInterceptConfig
from tests.support.configs import StartProxy, proxy_config, token_config, upstream_config
from tests.support.grpc_server import SERVICE, GrpcServer
from tests.support.token_server import TokenServer

CALL_TIMEOUT = 20.0


def _validator(token_server: TokenServer) -> Callable[[str | None], bool]:
    def validate(authorization: str | None) -> bool:
        if authorization is None or not authorization.startswith("Bearer "):
            return True  # recorded, not refused: the tests look at what arrived
        return token_server.is_valid(authorization.removeprefix("Bearer "))

    return validate


@pytest.fixture
def tls_grpc_server(server_ca: trustme.CA, token_server: TokenServer) -> Iterator[GrpcServer]:
    with GrpcServer(ca=server_ca, validate=_validator(token_server)) as server:
        yield server


@pytest.fixture
def plain_grpc_server(token_server: TokenServer) -> Iterator[GrpcServer]:
    with GrpcServer(validate=_validator(token_server)) as server:
        yield server


@dataclass
class GrpcProxy:
    """A running proxy and how a grpcio client reaches the upstream through it."""

    app: ProxyApp
    target: str  # what the client dials
    credentials: grpc.ChannelCredentials | None  # None: cleartext (h2c)
    options: list[tuple[str, Any]]

    def channel(self) -> grpc.Channel:
        if self.credentials is None:
            return grpc.insecure_channel(self.target, options=self.options)
        return grpc.secure_channel(self.target, self.credentials, options=self.options)

    def metric(self, name: str, **labels: str) -> float:
        value = self.app.metrics.registry.get_sample_value(name, labels)
        return value or 0.0


StartGrpcProxy = Callable[..., Awaitable[GrpcProxy]]


@pytest.fixture
def start_intercepting_grpc(
    start_proxy: StartProxy,
    token_server: TokenServer,
    tls_grpc_server: GrpcServer,
    server_ca_file: Path,
    tmp_path: Path,
) -> StartGrpcProxy:
    """A proxy that intercepts CONNECT localhost:<grpc port>; the client goes through
    it with grpc's `grpc.http_proxy` option and trusts the proxy's CA."""

    async def start(
        *,
        limits: LimitsConfig | None = None,
        proxy: dict[str, Any] | None = None,
        **changes: Any,
    ) -> GrpcProxy:
        ca_file = tmp_path / "token-proxy-ca.pem"
        port = tls_grpc_server.port
        inventory = upstream_config(
            "inventory",
            [f"localhost:{port}"],
            token_config(token_server),
            tls=TlsClientConfig(ca_file=server_ca_file),
            **changes,
        )
        config = proxy_config(
            inventory,
            connect_ports=(port,),
            tls_intercept=TlsInterceptConfig(write_ca_cert_to=ca_file),
            limits=limits or LimitsConfig(),
            **(proxy or {}),
        )
        app = await start_proxy(config)
        credentials = grpc.ssl_channel_credentials(root_certificates=ca_file.read_bytes())
        options = [("grpc.http_proxy", f"http://127.0.0.1:{app.port}"), ("grpc.enable_retries", 0)]
        return GrpcProxy(app, f"localhost:{port}", credentials, options)

    return start


@pytest.fixture
def start_reverse_grpc(
    start_proxy: StartProxy, token_server: TokenServer, plain_grpc_server: GrpcServer
) -> StartGrpcProxy:
    """A proxy whose upstream `inventory` has its own port, sending to the cleartext
    grpcio server; the client dials that port in h2c (prior knowledge)."""

    async def start(
        *, limits: LimitsConfig | None = None, url: str | None = None, **changes: Any
    ) -> GrpcProxy:
        inventory = upstream_config(
            "inventory",
            ["inventory.internal"],
            token_config(token_server),
            url=url or f"http://127.0.0.1:{plain_grpc_server.port}",
            listen=Address("127.0.0.1", 0),
            **changes,
        )
        app = await start_proxy(proxy_config(inventory, limits=limits or LimitsConfig()))
        port = app.reverse_listeners["inventory"].port
        options = [("grpc.enable_http_proxy", 0), ("grpc.enable_retries", 0)]
        return GrpcProxy(app, f"127.0.0.1:{port}", None, options)

    return start


def method(name: str) -> str:
    return f"/{SERVICE}/{name}"


async def in_thread(function: Callable[[], Any]) -> Any:
    """Run a blocking grpcio call off the event loop the proxy runs on."""
    return await asyncio.wait_for(asyncio.to_thread(function), CALL_TIMEOUT + 5)


@pytest.fixture
async def grpc_channels() -> AsyncIterator[list[grpc.Channel]]:
    """Channels to close after the test."""
    channels: list[grpc.Channel] = []
    yield channels
    for channel in channels:
        channel.close()
