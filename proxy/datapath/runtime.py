"""The state requests are served from, built once per configuration.

A `Runtime` is everything derived from a `ProxyConfig` that the request path needs,
computed at start-up (or reload) so the hot path only looks things up: the router,
and per upstream a `Route` with its token provider, the token it holds, its `Injector`,
target origin and Host value. `RuntimeHolder.current` is swapped in one assignment on
reload, so a request sees either the old or the new configuration, never a mix.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.config import ProxyConfig, UpstreamConfig
from proxy.datapath.injector import Injector
from proxy.datapath.routing import Router
from proxy.datapath.timeouts import PASSTHROUGH_CONNECT_TIMEOUT, PASSTHROUGH_TIMEOUT
from proxy.datapath.upstream_connection import Origin
from proxy.tls.client_context import client_ssl_context, http2_context
from proxy.tokens import TokenProvider
from proxy.tokens.held_token import HeldToken


@dataclass(frozen=True, slots=True)
class Route:
    """A configured upstream, ready for the request path."""

    name: str  # config.name, read for every request (a native attribute when compiled)
    config: UpstreamConfig
    provider: TokenProvider
    # provider.held: the one way the request path reads a token (never waits); only
    # when it holds none does a request wait on provider.get().
    held_token: HeldToken
    injector: Injector  # header, scheme and overwrite: how the token goes in
    # Set when the upstream has a `url`: every matched request goes there.
    origin: Origin | None
    host_header: bytes | None
    # config.purge_on_status: answers with these statuses drop the token they refused.
    purge_on_status: frozenset[int]
    # config.connect_timeout and config.timeout, read for every request (native).
    connect_timeout: float
    timeout: float


def upstream_timeouts(route: Route | None) -> tuple[float, float]:
    """How long a request for `route` may take to connect, and then wait in silence for
    the upstream (`connect_timeout`, `timeout`); the proxy's own for a host no upstream
    matches. Read per request: a reload changes them for connections already open."""
    if route is None:
        return PASSTHROUGH_CONNECT_TIMEOUT, PASSTHROUGH_TIMEOUT
    return route.connect_timeout, route.timeout


def build_route(upstream: UpstreamConfig, provider: TokenProvider) -> Route:
    origin: Origin | None = None
    host_header: bytes | None = None
    if upstream.url is not None:
        url = upstream.url
        tls = client_ssl_context(upstream.tls) if url.scheme == "https" else None
        if tls is not None and upstream.http2 != "off":
            # The context offering h2, read from the same files now rather than at the
            # first HTTP/2 connection, when they may have changed or gone.
            http2_context(tls)
        origin = Origin(url.scheme, url.host, url.port, tls)
        host_header = url.authority.encode("ascii")
    return Route(
        name=upstream.name,
        config=upstream,
        provider=provider,
        held_token=provider.held,
        injector=Injector(upstream.header, upstream.overwrite, provider.dpop, provider.held),
        origin=origin,
        host_header=host_header,
        purge_on_status=frozenset(upstream.purge_on_status),
        connect_timeout=upstream.connect_timeout,
        timeout=upstream.timeout,
    )


@dataclass(frozen=True)
class Runtime:
    """One configuration's router and routes."""

    config: ProxyConfig
    router: Router
    routes: dict[str, Route]
    access_log: bool  # config.access_log, read for every request
    via: bool  # config.via, read for every request
    allow_link_local: bool  # config.allow_link_local_targets, read for passthrough requests

    @classmethod
    def build(cls, config: ProxyConfig, providers: dict[str, TokenProvider]) -> Runtime:
        routes = {u.name: build_route(u, providers[u.name]) for u in config.upstreams}
        return cls(
            config=config,
            router=Router(config.upstreams),
            routes=routes,
            access_log=config.access_log,
            via=config.via,
            allow_link_local=config.allow_link_local_targets,
        )

    def route_for(self, upstream: UpstreamConfig | None) -> Route | None:
        return None if upstream is None else self.routes[upstream.name]


class RuntimeHolder:
    """The current `Runtime`; replaced whole on reload."""

    def __init__(self, runtime: Runtime) -> None:
        self.current = runtime
