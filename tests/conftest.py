"""Shared fixtures: a real token endpoint, a real upstream API and a running proxy.

The config builders they use are in tests/support/configs.py.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trustme
from hypothesis import settings

from proxy import data_path_build
from proxy.app import ProxyApp
from proxy.config import ProxyConfig
from proxy.ops.metrics import Metrics
from tests.support.configs import (
    CLIENT_ID,
    CLIENT_SECRET,
    StartProxy,
    proxy_config,
    token_config,
    upstream_config,
)
from tests.support.token_server import TokenServer
from tests.support.upstream import Upstream

# Property tests check results, not speed: no per-example deadline, which a loaded
# machine's stall would break.
settings.register_profile("token-proxy", deadline=None)
settings.load_profile("token-proxy")


def pytest_report_header() -> str:
    return f"token-proxy data path: {data_path_build()}"


def pytest_sessionstart(session: pytest.Session) -> None:
    # `make test` runs the suite once per build; a leftover or missing compiled module
    # must not let one run test the other build.
    expected = os.environ.get("TOKEN_PROXY_BUILD")
    if expected and expected != data_path_build():
        raise pytest.UsageError(
            f"TOKEN_PROXY_BUILD={expected}, but the data path is {data_path_build()}: "
            "run `make compile` or `make uncompile` first"
        )


@pytest.fixture
async def token_server() -> AsyncIterator[TokenServer]:
    async with TokenServer(clients={CLIENT_ID: CLIENT_SECRET}) as server:
        yield server


@pytest.fixture
async def upstream(token_server: TokenServer) -> AsyncIterator[Upstream]:
    def validate(authorization: str | None) -> bool:
        if authorization is None or not authorization.startswith("Bearer "):
            return True  # unauthenticated calls are recorded, not refused
        return token_server.is_valid(authorization.removeprefix("Bearer "))

    async with Upstream(validate=validate) as server:
        yield server


@pytest.fixture
async def start_proxy() -> AsyncIterator[StartProxy]:
    apps: list[ProxyApp] = []

    async def start(config: ProxyConfig) -> ProxyApp:
        app = ProxyApp(config, metrics=Metrics())
        await app.start()
        apps.append(app)
        return app

    yield start
    for app in apps:
        await app.shutdown()


@pytest.fixture
async def inventory_proxy(
    start_proxy: StartProxy, token_server: TokenServer, upstream: Upstream
) -> ProxyApp:
    """A proxy whose upstream `inventory` matches inventory.internal and sends to `upstream`."""
    config = proxy_config(
        upstream_config(
            "inventory",
            ["inventory.internal"],
            token_config(token_server),
            url=upstream.url,
        )
    )
    return await start_proxy(config)


@pytest.fixture(scope="module")
def server_ca() -> trustme.CA:
    """Signs the certificates of a module's HTTPS test servers (upstreams, token endpoint)."""
    return trustme.CA()


@pytest.fixture(scope="module")
def client_ca() -> trustme.CA:
    """Signs client certificates for mutual TLS."""
    return trustme.CA()


@pytest.fixture
def server_ca_file(server_ca: trustme.CA, tmp_path: Path) -> Path:
    """`server_ca` as a PEM file, for a proxy's `ca_file`."""
    path = tmp_path / "server-ca.pem"
    server_ca.cert_pem.write_to_path(str(path))
    return path
