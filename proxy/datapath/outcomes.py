"""How every request is accounted for, and the answers the proxy gives itself.

`Outcomes.record` counts a request's answer in the metrics when its head goes out;
`Outcomes.finish` writes its access-log line once it has ended; `Outcomes.refuse`
answers a `ProxyError` with the contract's JSON body (see `proxy.errors`) and records
that (`Outcomes.refused`, which HTTP/2 streams use too). Both request paths end here.
"""

from __future__ import annotations

import asyncio
import logging

from proxy.datapath.client_connection import ClientConnection
from proxy.datapath.context import RequestContext
from proxy.datapath.messages import ResponseHead, response_head_bytes, via_line
from proxy.datapath.runtime import RuntimeHolder
from proxy.errors import ProxyError
from proxy.ops.logs import log_access
from proxy.ops.metrics import UNMATCHED, Metrics

log = logging.getLogger("token_proxy.forward")


class Outcomes:
    """Records answers (metrics, access log) and writes the proxy's own error answers."""

    def __init__(self, holder: RuntimeHolder, metrics: Metrics) -> None:
        self._holder = holder
        self._metrics = metrics
        self._loop = asyncio.get_event_loop()

    def record(self, ctx: RequestContext, status: int, response: ResponseHead | None) -> None:
        """Count the answer in the metrics (its duration runs to the response head)."""
        started = ctx.started
        elapsed = self._loop.time() - started if started else 0.0
        self._metrics.observe_request(ctx.label, status, elapsed)
        ctx.status = status

    def finish(self, ctx: RequestContext) -> None:
        """The answer has ended (or was cut short): write its access-log line, if on.

        The same fields on every path: where the request went (the Host and the
        origin-form path sent upstream, or as asked when it was refused before it was
        planned), the body bytes the client was sent, and the time to the last byte.
        """
        if not self._holder.current.access_log or not ctx.status:
            return
        started = ctx.started
        head = ctx.head
        plan = ctx.plan
        if plan is not None:
            host, path = plan.host, plan.path
        else:
            host, path = head.hosts[0] if head.hosts else b"-", head.target
        log_access(
            upstream=ctx.label,
            method=head.method,
            host=host.decode("latin-1"),
            path=path.decode("latin-1"),
            status=ctx.status,
            duration_s=self._loop.time() - started if started else 0.0,
            bytes_out=ctx.bytes_out,
            client=ctx.conn.peer,
        )
        ctx.status = 0  # one line per answer

    def refuse(self, ctx: RequestContext, error: ProxyError) -> bool:
        """Answer `error` ourselves. The connection stays open only if the body was consumed."""
        head = ctx.head
        body = ctx.body
        conn = ctx.conn
        keep_alive = head.keep_alive and (body is None or body.done) and not head.upgrade
        keep_alive = keep_alive and not conn.listener.draining and error.status not in (400, 413)
        self.refused(ctx, error)
        conn.send_error(error, keep_alive=keep_alive, head_only=head.method == "HEAD")
        self.finish(ctx)
        return keep_alive

    def refused(self, ctx: RequestContext, error: ProxyError) -> None:
        """Account for `error`, which the caller answers (in HTTP/1.1 `refuse`, in HTTP/2
        its stream): the upstream it names, the metrics, and a log line for a 5xx."""
        label = ctx.label
        if error.upstream is None and label != UNMATCHED:
            error.upstream = label
        self.record(ctx, error.status, None)
        if error.status >= 500:
            log.warning(
                "request failed",
                extra={
                    "event": "request_error",
                    "upstream": label,
                    "error": error.code,
                    "status": error.status,
                    "detail": error.detail,
                },
            )


def write_interim(conn: ClientConnection, via: bool, interim: ResponseHead) -> None:
    """Relay a 1xx response (100 Continue, 103 Early Hints) to an HTTP/1.1 client."""
    conn.write(
        response_head_bytes(
            interim.status,
            interim.reason,
            interim.fields,
            b"",
            via_line(interim.version) if via else b"",
        )
    )
