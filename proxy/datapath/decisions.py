"""What an upstream's answer means: one decision for both request paths.

The fast path (`proxy.datapath.fast_path`, callbacks) and the general path
(`proxy.datapath.forward`, a coroutine) differ in how they wait, not in what they
conclude. Each asks here, with the request's `RequestContext`, and acts on the small
integer it gets back:

* `on_response_head`: relay the answer, splice an upgrade, refuse a 101 nobody asked
  for (RFC 9110 §15.2.2), or, after a 401 (or another of the upstream's
  `purge_on_status`) to the token we sent, drop that token and send the request again
  with a new one (once, when the method allows it).
* `on_failure`: an exchange failed. Nobody to answer (the client went away), too late
  to answer (cut the client's response short), send again on a fresh connection (the
  idle keep-alive connection had been closed by the upstream before it read anything:
  RFC 9110 §9.2.2), or answer the error ourselves.
* `frame_for_client`: the response head for the client, whether its body is re-chunked
  and whether the client connection stays open.
"""

from __future__ import annotations

from typing import Final

from proxy.datapath.context import RequestContext
from proxy.datapath.messages import ResponseHead, frame_response
from proxy.datapath.upstream_connection import Exchange
from proxy.errors import ProxyError, UpstreamUnreachable

# Methods whose request may be sent twice (RFC 9110 §9.2.2).
IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})

# What a response head means.
RELAY: Final = 0  # relay it to the client
UPGRADE: Final = 1  # 101 to an upgrade the client asked for: splice the two connections
SWITCHED_UNASKED: Final = 2  # 101 nobody asked for: not HTTP any more, 502
REPLAY_WITH_NEW_TOKEN: Final = 3  # our token refused, another one at hand: send again

# What a failed exchange means.
ANSWER_ERROR: Final = 4  # answer the error ourselves (502, 504, ...)
RETRY_ON_FRESH_CONNECTION: Final = 5  # a stale keep-alive connection: send again
CUT_SHORT: Final = 6  # the response head has gone out: only closing is left
CLIENT_GONE: Final = 7  # nobody to answer


def on_response_head(ctx: RequestContext, status: int) -> int:
    """What the final response head with `status` means for `ctx`'s request.

    After a status of the route's `purge_on_status` (401 by default) to the token the
    request carried, that token is dropped (the provider does this once per token,
    however many requests see the status), whatever is decided.
    """
    if status == 101:
        return UPGRADE if ctx.head.upgrade else SWITCHED_UNASKED
    if status >= 400 and ctx.injected and not ctx.replayed:
        plan = ctx.plan
        route = plan.route if plan is not None else None
        token = ctx.token
        if route is not None and token is not None and status in route.purge_on_status:
            route.provider.invalidate(token)
            # The provider keeps a token it was told about moments ago (an upstream that
            # refuses every token must not turn requests into token fetches): no replay
            # then, nor for a request that may not be sent twice.
            if ctx.head.method in IDEMPOTENT and route.held_token.current() != token:
                return REPLAY_WITH_NEW_TOKEN
    return RELAY


def switched_unasked() -> ProxyError:
    """The error answered for a 101 the client did not ask for."""
    return UpstreamUnreachable("the upstream switched protocols unasked")


def on_failure(ctx: RequestContext, exchange: Exchange, head_sent: bool) -> int:
    """What a failed `exchange` means, `head_sent` telling whether the client has the head."""
    if ctx.conn.closed:
        return CLIENT_GONE
    if head_sent:
        return CUT_SHORT
    if (
        exchange.reused
        and not exchange.received_any
        and ctx.body is None
        and ctx.head.method in IDEMPOTENT
    ):
        return RETRY_ON_FRESH_CONNECTION
    return ANSWER_ERROR


def frame_for_client(ctx: RequestContext, response: ResponseHead) -> tuple[bytes, bool, bool, bool]:
    """`frame_response` for `ctx`: ``(head, has_body, rechunk, keep_alive)``.

    The client connection stays open if the client asked for it, the port is not
    draining and the request body was read whole: after an early answer (the upstream
    did not read all of it), what is left of that body cannot be told apart from a
    next request.
    """
    body = ctx.body
    keep_alive = (
        ctx.head.keep_alive and not ctx.conn.listener.draining and (body is None or body.done)
    )
    plan = ctx.plan
    return frame_response(
        ctx.head, response, keep_alive=keep_alive, via=plan is not None and plan.via
    )
