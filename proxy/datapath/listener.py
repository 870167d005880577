"""A listening proxy port: accepting, counting, timing out and draining connections.

`Listener` owns an `asyncio.Server` and the set of its `ClientConnection`s. A sweeper
runs once a second and closes connections whose header or idle deadline has passed
(slowloris and forgotten keep-alives), which keeps timers off the per-request path.
On shutdown it stops accepting, closes idle keep-alive connections at once and waits
for busy ones up to the grace period.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Sequence
from typing import Any, cast

from proxy.config import Address, LimitsConfig
from proxy.datapath.client_connection import ClientConnection, PriorKnowledge, RequestHandler
from proxy.datapath.timeouts import CLIENT_SWEEP_INTERVAL, DRAIN_POLL_INTERVAL
from proxy.errors import RequestTimeout
from proxy.ops.metrics import Metrics

log = logging.getLogger("token_proxy.listener")


class Listener:
    """One proxy port (forward or reverse) and the client connections it accepted."""

    def __init__(
        self,
        name: str,
        address: Address,
        handler: RequestHandler,
        limits: LimitsConfig,
        metrics: Metrics,
    ) -> None:
        self.name = name
        self.address = address
        self.handler = handler
        self.limits = limits
        self._metrics = metrics
        self.connections: set[ClientConnection] = set()
        self.draining = False
        # Set (by `proxy.datapath.http2`) on an upstream's own port: h2c is served there.
        self.prior_knowledge: PriorKnowledge | None = None
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._all_closed: asyncio.Event = asyncio.Event()
        self._all_closed.set()

    @property
    def port(self) -> int:
        """The bound port (useful when configured as 0)."""
        assert self._server is not None
        # Typed as a tuple, but uvloop's servers return a list: keep it untyped, so that
        # the compiled build does not check it.
        sockets: Sequence[socket.socket] = cast(Any, self._server).sockets
        assert sockets
        return int(sockets[0].getsockname()[1])

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: ClientConnection(self, self.handler, self.limits),
            host=self.address.host,
            port=self.address.port,
            reuse_address=True,
            backlog=1024,
            family=socket.AF_INET6 if ":" in self.address.host else socket.AF_UNSPEC,
        )
        self._sweeper = loop.create_task(self._sweep())
        log.info(
            "listening",
            extra={
                "event": "listen",
                "listener": self.name,
                "address": f"{self.address.host}:{self.port}",
            },
        )

    def connection_opened(self, conn: ClientConnection) -> None:
        if self.draining or len(self.connections) >= self.limits.max_connections:
            conn.abort()
            return
        self.connections.add(conn)
        self._all_closed.clear()
        self._metrics.open_connections.inc()

    def connection_closed(self, conn: ClientConnection) -> None:
        if conn in self.connections:
            self.connections.discard(conn)
            self._metrics.open_connections.dec()
        if not self.connections:
            self._all_closed.set()

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(CLIENT_SWEEP_INTERVAL)
            now = loop.time()
            stalled_before = now - self.limits.idle_timeout
            for conn in list(self.connections):
                if conn.header_deadline and now > conn.header_deadline:
                    if conn.busy:
                        conn.abort()  # an answer is being written: a 408 cannot go in between
                    else:
                        # RFC 9110 §15.5.9: say why before closing.
                        conn.send_error(
                            RequestTimeout("request head not received in time"), keep_alive=False
                        )
                        conn.close()
                elif conn.idle_deadline and now > conn.idle_deadline and not conn.busy:
                    conn.close()
                elif conn.write_paused_at and conn.write_paused_at < stalled_before:
                    # A client that stopped reading would otherwise hold its upstream forever.
                    conn.abort()

    async def stop_accepting(self) -> None:
        """Close the listening socket; existing connections carry on."""
        self.draining = True
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def close_idle(self) -> None:
        for conn in list(self.connections):
            conn.close_if_idle()

    async def drain(self, grace: float) -> bool:
        """Close idle connections, wait up to `grace` for busy ones; True if all finished."""
        self.close_idle()
        try:
            await asyncio.wait_for(self._wait_idle_closing(), timeout=grace)
            return True
        except TimeoutError:
            return False

    async def _wait_idle_closing(self) -> None:
        # A busy connection closes itself after its response once `draining` is set; one
        # that turns idle without closing (keep-alive) is closed here.
        while self.connections:
            self.close_idle()
            try:
                await asyncio.wait_for(self._all_closed.wait(), timeout=DRAIN_POLL_INTERVAL)
            except TimeoutError:
                continue

    async def close(self) -> None:
        """Abort whatever is still open and stop the sweeper."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        for conn in list(self.connections):
            conn.abort()
        if self._server is not None:
            self._server.close()
