"""The fast path: a body-less request on a warm connection, relayed entirely in callbacks.

Most sidecar traffic is small requests without a body to an upstream the proxy already
holds a token and an idle keep-alive connection for. For those, `Forwarder` skips the
coroutine of the general path: the client connection's parser callback plans the
request and writes it upstream, and this `FastExchange` writes the response to the
client from the upstream connection's parser callbacks - no task switch, no future and
no timer per request, and one write per batch of response bytes.

What an answer means is decided in `proxy.datapath.decisions`, as on the general path.
When the decision is to send the request again (a 401 to our token: drop it, fetch
another, replay; or a stale keep-alive connection: send again on a fresh one), the
request is handed to the general path (`SlowPath`), which can wait.
"""

from __future__ import annotations

from typing import Final, Protocol

from proxy.datapath.context import RequestContext
from proxy.datapath.decisions import (
    ANSWER_ERROR,
    CLIENT_GONE,
    CUT_SHORT,
    RELAY,
    REPLAY_WITH_NEW_TOKEN,
    REPLAY_WITH_NONCE,
    frame_for_client,
    on_failure,
    on_response_head,
    switched_unasked,
)
from proxy.datapath.messages import LAST_CHUNK, ResponseHead, chunk
from proxy.datapath.outcomes import Outcomes, write_interim
from proxy.datapath.upstream_connection import Exchange, UpstreamConnection
from proxy.datapath.upstream_pool import UpstreamPool
from proxy.errors import ProxyError

_HTTP11: Final = "1.1"


class SlowPath(Protocol):
    """Carries a request on where the fast path cannot (`proxy.datapath.forward.Forwarder`)."""

    def finish_slowly(self, ctx: RequestContext, how: int) -> None:
        """Send `ctx`'s request again as `how` (a `decisions` value) says, and answer it."""


class FastExchange(Exchange):
    """Relays one response straight from the upstream's callbacks to the client."""

    __slots__ = (
        "_out",
        "ctx",
        "handed_off",
        "head_sent",
        "keep_alive",
        "outcomes",
        "pool",
        "rechunk",
        "slow_path",
        "upconn",
    )

    def __init__(
        self,
        ctx: RequestContext,
        upconn: UpstreamConnection,
        pool: UpstreamPool,
        outcomes: Outcomes,
        slow_path: SlowPath,
    ) -> None:
        super().__init__(ctx.head.method == "HEAD")
        self.ctx = ctx
        self.upconn = upconn
        self.pool = pool
        self.outcomes = outcomes
        self.slow_path = slow_path
        self.handed_off = False
        self.head_sent = False
        self.keep_alive = False
        self.rechunk = False
        self._out: list[bytes] = []
        # If the client goes away before the answer, stop waiting on the upstream.
        ctx.conn.on_resume_writing = self._client_resumed

    def on_interim(self, head: ResponseHead) -> None:
        ctx = self.ctx
        plan = ctx.plan
        if ctx.head.version == _HTTP11 and plan is not None:
            write_interim(ctx.conn, plan.via, head)

    def on_head(self, head: ResponseHead) -> None:
        ctx = self.ctx
        how = on_response_head(ctx, head)
        if how != RELAY:
            if how in (REPLAY_WITH_NEW_TOKEN, REPLAY_WITH_NONCE):
                self._hand_off(how)
            else:
                # A switch of protocols (upgrade requests never take this path): what
                # follows on this connection is not HTTP any more.
                self.upconn.abort()
                self.fail(switched_unasked())
            return
        self.outcomes.record(ctx, head.status, head)
        response_head, _, self.rechunk, self.keep_alive = frame_for_client(ctx, head)
        self._out.append(response_head)
        self.head_sent = True
        ctx.conn.on_resume_writing = self._client_resumed

    def on_body(self, data: bytes) -> None:
        if self.handed_off:
            return
        ctx = self.ctx
        if ctx.conn.closed:
            self.upconn.abort()  # the client went away: stop the download
            return
        ctx.bytes_out += len(data)
        self._out.append(chunk(data) if self.rechunk else data)

    def after_data(self) -> None:
        out = self._out
        if not out:
            return
        conn = self.ctx.conn
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
        ctx = self.ctx
        conn = ctx.conn
        conn.on_resume_writing = None
        self.pool.release(self.upconn)
        self.outcomes.finish(ctx)
        conn.fast_done(self.keep_alive)

    def on_error(self, error: ProxyError) -> None:
        if self.handed_off:
            return
        ctx = self.ctx
        conn = ctx.conn
        conn.on_resume_writing = None
        self.pool.discard(self.upconn)
        how = on_failure(ctx, self, self.head_sent, error)
        if how == ANSWER_ERROR:
            conn.fast_done(self.outcomes.refuse(ctx, error))
        elif how == CUT_SHORT:
            # Too late for an error answer: the client sees a cut-short response.
            conn.abort()
            self.outcomes.finish(ctx)
            conn.fast_done(False)
        elif how == CLIENT_GONE:
            self.outcomes.finish(ctx)
            conn.fast_done(False)  # nobody to answer or retry for
        else:
            self._hand_off(how)

    def _hand_off(self, how: int) -> None:
        self.handed_off = True
        self.ctx.conn.on_resume_writing = None
        self.pool.discard(self.upconn)
        self.slow_path.finish_slowly(self.ctx, how)

    def _client_resumed(self) -> None:
        if self.ctx.conn.closed:
            self.upconn.abort()
        else:
            self.upconn.resume_reading()
