"""The fast path: a body-less request on a warm connection, relayed entirely in callbacks.

Most sidecar traffic is small requests without a body to an upstream the proxy already
holds a token and an idle keep-alive connection for. For those, `Forwarder` skips the
coroutine of the general path: the client connection's parser callback plans the
request and writes it upstream, and this `FastExchange` writes the response to the
client from the upstream connection's parser callbacks - no task switch, no future and
no timer per request, and one write per batch of response bytes.

Anything unusual leaves the fast path for the general one (`proxy.datapath.forward`): a 401 to
our token (drop it, fetch another, replay), a stale keep-alive connection (send again on
a fresh one), or an error before the response head (the contract's error answer).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from proxy.datapath.messages import LAST_CHUNK, RequestHead, ResponseHead, chunk, frame_response
from proxy.datapath.upstream_pool import Exchange, UpstreamConnection
from proxy.errors import ProxyError, UpstreamUnreachable

if TYPE_CHECKING:
    from proxy.datapath.client_connection import ClientConnection
    from proxy.datapath.forward import Forwarder
    from proxy.datapath.planning import Plan

log = logging.getLogger("token_proxy.forward")


class FastExchange(Exchange):
    """Relays one response straight from the upstream's callbacks to the client."""

    __slots__ = (
        "_out",
        "conn",
        "forwarder",
        "handed_off",
        "head_sent",
        "injected",
        "keep_alive",
        "plan",
        "rechunk",
        "request",
        "reused",
        "started",
        "token",
        "upconn",
    )

    def __init__(
        self,
        forwarder: Forwarder,
        conn: ClientConnection,
        request: RequestHead,
        plan: Plan,
        upconn: UpstreamConnection,
        token: str | None,
        injected: bool,
        started: float,
    ) -> None:
        super().__init__(request.method == "HEAD")
        self.forwarder = forwarder
        self.conn = conn
        self.request = request
        self.plan = plan
        self.upconn = upconn
        self.token = token
        self.injected = injected
        self.started = started
        self.reused = upconn.exchanges > 0
        self.handed_off = False
        self.head_sent = False
        self.keep_alive = False
        self.rechunk = False
        self._out: list[bytes] = []
        # If the client goes away before the answer, stop waiting on the upstream.
        conn.on_resume_writing = self._client_resumed

    def on_interim(self, head: ResponseHead) -> None:
        if self.request.version == "1.1":
            self.forwarder.write_interim(self.conn, head)

    def on_head(self, head: ResponseHead) -> None:
        if head.status == 101:
            # No upgrade was asked for on this path (RFC 9110 §15.2.2): not HTTP any more.
            self.upconn.abort()
            self.fail(UpstreamUnreachable("the upstream switched protocols unasked"))
            return
        route = self.plan.route
        token = self.token
        if head.status == 401 and self.injected and route is not None and token is not None:
            route.provider.invalidate(token)
            if route.provider.current() != token:
                self._hand_off(after_401=True)
                return
        conn = self.conn
        request = self.request
        self.forwarder.record(conn, request, self.plan.label, head.status, self.started, head)
        keep_alive = request.keep_alive and not conn.listener.draining
        response_head, _, self.rechunk, self.keep_alive = frame_response(
            request, head, keep_alive=keep_alive
        )
        self._out.append(response_head)
        self.head_sent = True
        conn.on_resume_writing = self._client_resumed

    def on_body(self, data: bytes) -> None:
        if self.handed_off:
            return
        if self.conn.closed:
            self.upconn.abort()  # the client went away: stop the download
            return
        self._out.append(chunk(data) if self.rechunk else data)

    def after_data(self) -> None:
        out = self._out
        if not out:
            return
        conn = self.conn
        conn.write(out[0] if len(out) == 1 else b"".join(out))
        out.clear()
        if conn.write_paused:
            self.upconn.pause_reading()

    def on_complete(self) -> None:
        if self.handed_off:
            return
        if self.rechunk:
            self._out.append(LAST_CHUNK)
        self.after_data()
        conn = self.conn
        conn.on_resume_writing = None
        self.forwarder.pool.release(self.upconn)
        conn.fast_done(self.keep_alive)

    def on_error(self, error: ProxyError) -> None:
        if self.handed_off:
            return
        conn = self.conn
        conn.on_resume_writing = None
        self.forwarder.pool.discard(self.upconn)
        if conn.closed:
            conn.fast_done(False)  # the client went away: nobody to answer or retry for
        elif self.head_sent:
            # Too late for an error answer: the client sees a cut-short response.
            conn.abort()
            conn.fast_done(False)
        elif self.reused and not self.received_any:
            # The idle keep-alive connection had been closed by the upstream before it
            # read anything: send again on a fresh one (RFC 9110 §9.2.2, no body here).
            self._hand_off(after_401=False)
        else:
            conn.fast_done(
                self.forwarder.refuse(
                    conn, self.request, None, error, self.plan.label, started=self.started
                )
            )

    def _hand_off(self, *, after_401: bool) -> None:
        self.handed_off = True
        self.conn.on_resume_writing = None
        self.forwarder.pool.discard(self.upconn)
        self.forwarder.finish_slowly(
            self.conn, self.request, self.plan, self.token, self.started, after_401=after_401
        )

    def _client_resumed(self) -> None:
        if self.conn.closed:
            self.upconn.abort()
        else:
            self.upconn.resume_reading()
