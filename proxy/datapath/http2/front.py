"""What the application wires to serve HTTP/2, and how connections get to it.

`Http2Front` is built once per proxy (`proxy.app`): the planners, the accounting
(`Outcomes`) and the upstream streams (`Http2Upstreams`) every HTTP/2 connection
shares. It makes the server connection (`server.py`) of

* an intercepted TLS session whose client chose h2 (`serve_tunnelled`, called by
  `proxy.tls.intercept`, which first asks `upstream_speaks_h2` whether to offer it);
* a connection to an upstream's own `listen` port that began with the HTTP/2 preface
  (`attach_reverse` sets the port's `prior_knowledge` hook, which `ClientConnection`
  calls on such a preface; the forward port has none and refuses it).
"""

from __future__ import annotations

from functools import partial

from proxy.datapath.client_connection import ClientConnection, ConnectionOwner
from proxy.datapath.http2.guards import PREFACE
from proxy.datapath.http2.server import Http2ServerConnection
from proxy.datapath.http2.upstream import Http2Upstreams
from proxy.datapath.outcomes import Outcomes
from proxy.datapath.planning import Planners, origin_for
from proxy.datapath.routing import Target
from proxy.datapath.runtime import RuntimeHolder, upstream_timeouts
from proxy.errors import ProxyError
from proxy.ops.metrics import Metrics


class Http2Front:
    """Serves HTTP/2 for one proxy: the planners, the accounting, the upstream streams.

    Built once by the application; `proxy.tls.intercept` hands it the intercepted TLS
    sessions whose client chose h2, and `attach_reverse` lets an upstream's `listen`
    port take h2c with prior knowledge.
    """

    def __init__(self, holder: RuntimeHolder, metrics: Metrics, upstreams: Http2Upstreams) -> None:
        self.planners = Planners(holder)
        self._holder = holder
        self.outcomes = Outcomes(holder, metrics)
        self.metrics = metrics
        self.upstreams = upstreams
        self._reverse_ports: set[ConnectionOwner] = set()

    def serve_tunnelled(
        self, handle: ClientConnection, host: str, port: int
    ) -> Http2ServerConnection:
        """The protocol for an intercepted `CONNECT host:port` whose client chose h2.
        `handle` is the tunnel's plain connection: it stays in its listener meanwhile."""
        planner = partial(self.planners.plan_tunnelled, "https", host, port)
        return Http2ServerConnection(self, handle, planner)

    async def upstream_speaks_h2(self, host: str, port: int) -> bool:
        """Whether a client intercepted on its way to `host:port` may be offered h2.

        One TLS session carries every request of the tunnel, whichever upstream claims
        its path and method, and its streams go to their upstreams in HTTP/2. So h2 is
        offered only if every upstream that claims `host:port` speaks it: none with
        `http2: off`; with `auto`, an origin (its `url`, or the host itself, asked with
        the upstream's own TLS settings) that selects h2 in ALPN, asked here once and
        then remembered by `Http2Upstreams` (the connection opened to ask is the first
        one the streams use). An origin that cannot be reached at all, or whose requests
        are refused anyway (a cleartext `url`), is no reason to refuse h2: its clients
        get the proxy's answer in either version.
        """
        runtime = self._holder.current
        claimants = runtime.router.claimants(host, port)
        if not claimants:
            return False  # no longer intercepted (a reload): HTTP/1.1 goes anywhere
        target = Target("https", host, port, b"/")
        for upstream in claimants:
            if upstream.http2 != "auto":
                if upstream.http2 == "off":
                    return False
                continue
            route = runtime.routes[upstream.name]
            origin = origin_for(route, target)
            if origin.ssl is None:
                continue
            try:
                connection = await self.upstreams.connect(
                    origin, connect_timeout=upstream_timeouts(route)[0]
                )
            except ProxyError:
                continue
            if connection is None:
                return False
        return True

    def serves_h2c(self, upstream_name: str) -> bool:
        """Whether `upstream_name`'s `listen` port takes h2c now (not with `http2: off`)."""
        route = self._holder.current.routes.get(upstream_name)
        return route is not None and route.config.http2 != "off"

    def attach_reverse(self, listener: ConnectionOwner, upstream_name: str) -> None:
        """Let `listener` (the `listen` port of `upstream_name`) serve h2c."""
        listener.prior_knowledge = _PriorKnowledgePort(self, upstream_name)
        self._reverse_ports.add(listener)

    def detach_reverse(self, listener: ConnectionOwner) -> None:
        listener.prior_knowledge = None
        self._reverse_ports.discard(listener)

    async def close(self) -> None:
        for listener in list(self._reverse_ports):
            self.detach_reverse(listener)
        await self.upstreams.close()


class _PriorKnowledgePort:
    """What serves h2c with prior knowledge on one upstream's own `listen` port."""

    def __init__(self, front: Http2Front, upstream_name: str) -> None:
        self._front = front
        self._upstream_name = upstream_name

    def __call__(self, conn: ClientConnection, early: bytes | None) -> bool:
        """Take over `conn`, which began with the HTTP/2 preface.

        `early` is what the connection had read of it: the read the preface began, as
        `ClientConnection` keeps it (at most `max_request_line` + 64 bytes). False (and
        the connection is refused as on the forward port) with the upstream's
        `http2: off`, and for a first read that may have been cut there. `conn` must
        have stopped parsing.
        """
        transport = conn.transport
        if transport is None or early is None or conn.closed:
            return False
        # ClientConnection keeps at most `max_request_line` + 64 bytes of a read: one
        # that long may have been longer, and what was cut off is gone.
        kept_at_most = conn.listener.limits.max_request_line + 64
        if not early.startswith(PREFACE[:16]) or len(early) >= kept_at_most:
            return False
        front, upstream_name = self._front, self._upstream_name
        if not front.serves_h2c(upstream_name):
            return False
        planner = partial(front.planners.plan_reverse, upstream_name)
        server = Http2ServerConnection(front, conn, planner)
        # What the rest of the current read brings still comes through `conn`.
        tail = conn.take_over(_Forwarding(server))
        transport.set_protocol(server)
        server.connection_made(transport)
        server.data_received(early + tail)
        return True


class _Forwarding:
    """The `RawSink` of the handle on a port's own socket: passes on the bytes that
    reached it before the server connection became the transport's protocol."""

    def __init__(self, server: Http2ServerConnection) -> None:
        self._server = server

    def data_from_client(self, data: bytes) -> None:
        self._server.data_received(data)

    def client_eof(self) -> None:
        pass

    def client_lost(self) -> None:
        pass
