"""One request on its way through the forwarder, on either path.

A `RequestContext` is made once a request is planned and travels with it: through the
fast path's callbacks, into the general path's coroutine if the fast path hands it on,
and into `proxy.datapath.decisions`, which reads it to decide what an upstream's answer
means. It replaces passing the connection, head, body, plan, token and start time from
call to call.
"""

from __future__ import annotations

from proxy.datapath.client_connection import ClientConnection
from proxy.datapath.messages import RequestHead
from proxy.datapath.planning import Plan
from proxy.datapath.request_body import RequestBody
from proxy.ops.metrics import UNMATCHED


class RequestContext:
    """A request, where it goes, the token it was sent with, and how far it has got."""

    __slots__ = (
        "body",
        "bytes_out",
        "conn",
        "fresh_connection",
        "head",
        "injected",
        "label",
        "plan",
        "proof_sent",
        "replayed",
        "started",
        "status",
        "token",
    )

    def __init__(
        self,
        conn: ClientConnection,
        head: RequestHead,
        body: RequestBody | None,
        plan: Plan | None,
        started: float,
    ) -> None:
        self.conn = conn
        self.head = head
        self.body = body
        self.plan = plan  # None only for a request refused while being planned
        self.label = plan.label if plan is not None else UNMATCHED  # the metrics label
        self.started = started  # loop time; 0.0 for a request refused before it started
        self.token: str | None = None  # the token the request goes out with
        self.injected = False  # whether that token is in the head sent upstream
        self.proof_sent = False  # whether it went as a DPoP-bound token, with a proof
        # The next attempt opens a new connection (the last one was a stale keep-alive).
        self.fresh_connection = False
        # Sent again after a 401 (at most once): with a new token, or a DPoP nonce.
        self.replayed = False
        # The answer's status, once recorded, and the body bytes the client was sent:
        # the access log line is written when the answer ends (`Outcomes.finish`).
        self.status = 0
        self.bytes_out = 0
