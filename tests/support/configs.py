"""Configs and helpers for tests that run a proxy in-process or as a process.

The client credentials every test token server knows, config builders with the test
defaults (short timeouts, loopback ports chosen by the system), and small helpers that
start a proxy with one upstream. The pytest fixtures that use them live in conftest.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any

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
from tests.support.token_server import TokenServer
from tests.support.upstream import Upstream

CLIENT_ID = "order-service"

CLIENT_SECRET = "s3cret:with+odd%chars"


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
        match=MatchConfig(
            tuple(matches), changes.pop("path_prefix", None), changes.pop("methods", ())
        ),
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


def scripted_inventory(
    token_server: TokenServer, url: str, *, upstream_timeout: float, **changes: Any
) -> ProxyConfig:
    """`inventory.internal` sent to a scripted upstream at `url`, everything else denied,
    with a short grace period (the adversarial suites' proxy)."""
    changes.setdefault("shutdown_grace_period", 0.5)
    return proxy_config(
        upstream_config(
            "inventory",
            ["inventory.internal"],
            token_config(token_server),
            url=url,
            timeout=upstream_timeout,
        ),
        unknown_hosts="deny",
        **changes,
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
