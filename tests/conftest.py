"""Shared fixtures: a real token endpoint, a real upstream API and a running proxy."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from proxy import data_path_build
from proxy.app import ProxyApp
from proxy.config import (
    Address,
    HostMatch,
    MatchConfig,
    ProxyConfig,
    Secret,
    TargetUrl,
    TokenConfig,
    UpstreamConfig,
)
from proxy.ops.metrics import Metrics
from tests.support.token_server import TokenServer
from tests.support.upstream import Upstream


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


CLIENT_ID = "order-service"
CLIENT_SECRET = "s3cret:with+odd%chars"


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


def token_config(server: TokenServer, **changes: Any) -> TokenConfig:
    base = TokenConfig(
        client_id=CLIENT_ID,
        token_url=server.url,
        client_secret=Secret(CLIENT_SECRET),
        timeout=5.0,
        retry_initial=0.2,
        retry_max=1.0,
    )
    return dataclasses.replace(base, **changes)


def upstream_config(
    name: str,
    hosts: list[str],
    token: TokenConfig,
    *,
    url: str | None = None,
    **changes: Any,
) -> UpstreamConfig:
    matches = []
    for entry in hosts:
        host, _, port = entry.rpartition(":") if entry.count(":") == 1 else (entry, "", "")
        matches.append(HostMatch(host or entry, int(port) if port else None))
    target = None
    if url is not None:
        scheme, _, rest = url.partition("://")
        host, _, port = rest.partition(":")
        target = TargetUrl(scheme, host, int(port) if port else (443 if scheme == "https" else 80))  # type: ignore[arg-type]
    return UpstreamConfig(
        name=name,
        match=MatchConfig(tuple(matches), changes.pop("path_prefix", None)),
        token=token,
        url=target,
        **changes,
    )


def proxy_config(*upstreams: UpstreamConfig, **changes: Any) -> ProxyConfig:
    return ProxyConfig(
        upstreams=tuple(upstreams),
        listen=Address("127.0.0.1", 0),
        admin_listen=Address("127.0.0.1", 0),
        **changes,
    )


StartProxy = Callable[[ProxyConfig], Awaitable[ProxyApp]]


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


async def start_inventory(
    start_proxy: StartProxy,
    token_server: TokenServer,
    upstream: Upstream,
    *,
    proxy: dict[str, Any] | None = None,
    **upstream_changes: Any,
) -> ProxyApp:
    """A proxy with one upstream, `inventory`: inventory.internal, sent to `upstream`."""
    upstream_changes.setdefault("url", upstream.url)  # url=None: no url
    token = upstream_changes.pop("token", None) or token_config(token_server)
    return await start_proxy(
        proxy_config(
            upstream_config("inventory", ["inventory.internal"], token, **upstream_changes),
            **(proxy or {}),
        )
    )


def upstream_entry(host: str, url: str, token_server: TokenServer, **token: Any) -> dict[str, Any]:
    """One upstream in the YAML form a proxy process reads (see tests/support/process.py)."""
    return {
        "match": {"hosts": [host]},
        "url": url,
        "token": {
            "token_url": token_server.url,
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            **token,
        },
    }


def proxy_url(app: ProxyApp) -> str:
    return f"http://127.0.0.1:{app.port}"
