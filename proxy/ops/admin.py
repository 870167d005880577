"""The admin server: ``/metrics``, ``/healthz``, ``/readyz`` and ``/status``.

It only reads: metrics from the `Metrics` registry, and the proxy's state through
a `HealthSource` (implemented by the application), asked afresh on every request
so that config reloads and draining show at once.

- ``/healthz`` is liveness: 200 while the process serves, draining included, so a
  pod being shut down is not killed early by its liveness probe.
- ``/readyz`` is readiness: 200 once every *required* upstream holds a valid token
  and the proxy is not draining; otherwise 503 naming what it waits for.
- ``/status`` describes each upstream from `TokenProvider.status()`, which never
  holds a token or a secret (including where its token came from: ``fetched`` or
  ``shared_cache``), and, when a fleet token cache is configured, its state under
  ``token_cache``. Readiness never depends on that cache.

Only GET and HEAD are served; responses are never cached. The admin server has no
access log: probes and scrapes every few seconds would drown the proxy's own. It has
the proxy ports' kind of limits (a connection cap, header and idle timeouts): see
`proxy.ops.admin_limits`.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler

from proxy import __version__
from proxy.config import Address, LimitsConfig
from proxy.ops.admin_limits import AdminConnectionGuard, admin_connection_cap
from proxy.ops.metrics import Metrics

if TYPE_CHECKING:
    from proxy.tokens import TokenProvider


@dataclass(frozen=True)
class UpstreamHealth:
    """One upstream as the admin endpoints see it: its token, and whether readiness waits for it."""

    provider: TokenProvider
    required: bool


class HealthSource(Protocol):
    """What the admin endpoints read from the running proxy (implemented by proxy/app.py)."""

    @property
    def draining(self) -> bool:
        """True from SIGTERM on."""
        ...

    def upstreams(self) -> Mapping[str, UpstreamHealth]:
        """The current upstreams by name (the set changes on a config reload)."""
        ...


HEALTH_KEY = web.AppKey[HealthSource]("health")
TOKEN_CACHE_KEY = web.AppKey["Callable[[], dict[str, object]] | None"]("token_cache")


def _json(body: object, *, status: int = 200) -> web.Response:
    return web.json_response(body, status=status, dumps=lambda obj: json.dumps(obj, indent=2))


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the event loop runs and answers."""
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    """Readiness: every required upstream has a valid token, and we are not draining."""
    health = request.app[HEALTH_KEY]
    draining = health.draining
    waiting_for: list[str] = []
    optional_not_ready: list[str] = []
    for name, upstream in health.upstreams().items():
        if upstream.provider.is_valid():
            continue
        (waiting_for if upstream.required else optional_not_ready).append(name)
    if not draining and not waiting_for:
        ready: dict[str, object] = {"ready": True}
        if optional_not_ready:
            ready["optional_not_ready"] = optional_not_ready
        return _json(ready)
    return _json(
        {
            "ready": False,
            "draining": draining,
            "waiting_for": waiting_for,
            "optional_not_ready": optional_not_ready,
        },
        status=503,
    )


async def status(request: web.Request) -> web.Response:
    """Each upstream's token state; built from `TokenProvider.status()`, never a token."""
    health = request.app[HEALTH_KEY]
    upstreams = {
        name: {**upstream.provider.status(), "required": upstream.required}
        for name, upstream in health.upstreams().items()
    }
    body: dict[str, object] = {
        "version": __version__,
        "draining": health.draining,
        "upstreams": upstreams,
    }
    token_cache = request.app[TOKEN_CACHE_KEY]
    if token_cache is not None:
        body["token_cache"] = token_cache()
    return _json(body)


async def _no_store(request: web.Request, response: web.StreamResponse) -> None:
    # Readiness and token state change by the second; no cache may hold them.
    response.headers["Cache-Control"] = "no-store"


def create_admin_app(
    metrics: Metrics,
    health: HealthSource,
    *,
    token_cache: Callable[[], dict[str, object]] | None = None,
) -> web.Application:
    """The admin application; serve it with `AdminServer`. `token_cache`, when the
    fleet token cache is configured, gives its state for /status."""
    app = web.Application()
    app[HEALTH_KEY] = health
    app[TOKEN_CACHE_KEY] = token_cache
    # add_get also answers HEAD; other methods get 405, other paths 404.
    app.router.add_get("/metrics", make_aiohttp_handler(metrics.registry))
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/status", status)
    app.on_response_prepare.append(_no_store)
    return app


class AdminServer:
    """Serves the admin app on its address, with the limits of `proxy.ops.admin_limits`."""

    def __init__(self, app: web.Application, address: Address, limits: LimitsConfig) -> None:
        self._address = address
        self._limits = limits
        # No access log (probes would drown the proxy's own), no signal handling (the
        # caller owns the lifecycle), and keep-alive bounded like the proxy ports'.
        self._runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            keepalive_timeout=limits.idle_timeout,
            max_field_size=limits.max_header_size,
        )
        self._server: asyncio.Server | None = None
        self.guard: AdminConnectionGuard | None = None

    async def start(self) -> None:
        await self._runner.setup()
        handler_factory = self._runner.server
        assert handler_factory is not None
        limits = self._limits
        self.guard = AdminConnectionGuard(
            handler_factory,
            max_connections=admin_connection_cap(limits.admin_max_connections),
            header_timeout=limits.header_timeout,
            idle_timeout=limits.idle_timeout,
            max_header_size=limits.max_header_size,
        )
        self._server = await asyncio.get_running_loop().create_server(
            self.guard,
            host=self._address.host,
            port=self._address.port,
            reuse_address=True,
            family=socket.AF_INET6 if ":" in self._address.host else socket.AF_UNSPEC,
        )

    @property
    def port(self) -> int:
        assert self._server is not None, "start() first"
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._runner.cleanup()
