"""What an upstream's answer means: one decision for both request paths.

The fast path (`proxy.datapath.fast_path`, callbacks) and the general path
(`proxy.datapath.forward`, a coroutine) differ in how they wait, not in what they
conclude. Each asks here, with the request's `RequestContext`, and acts on the small
integer it gets back:

* `on_response_head`: relay the answer, splice an upgrade, refuse a 101 nobody asked
  for (RFC 9110 §15.2.2), or, after a 401 (or another of the upstream's
  `purge_on_status`) to the token we sent, drop that token and send the request again
  with a new one (once, when the method allows it). To a request sent with a DPoP
  proof, a ``DPoP-Nonce`` is kept for the origin's next proofs, and a 401 that asks
  for it (``use_dpop_nonce``, RFC 9449 §9) sends the request again with the nonce and
  the same token (once, under the same rules).
* `on_failure`: an exchange failed. Nobody to answer (the client went away), too late
  to answer (cut the client's response short), send again on a fresh connection (the
  idle keep-alive connection had been closed by the upstream before it read anything:
  RFC 9110 §9.2.2), or answer the error ourselves.
* `frame_for_client`: the response head for the client, whether its body is re-chunked
  and whether the client connection stays open.

How a request is sent again once one of these says so is `proxy.datapath.replay`'s.
"""

from __future__ import annotations

from typing import Final

from proxy.datapath.context import RequestContext
from proxy.datapath.messages import ResponseHead, field_values, frame_response
from proxy.datapath.upstream_connection import Exchange
from proxy.errors import ProxyError, UpstreamTimeout, UpstreamUnreachable
from proxy.tokens.dpop import asks_for_nonce

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
# What a response head means (continued).
REPLAY_WITH_NONCE: Final = 8  # the upstream asked for a DPoP nonce: send again with it


def on_response_head(ctx: RequestContext, response: ResponseHead) -> int:
    """What the final response head `response` means for `ctx`'s request.

    After a status of the route's `purge_on_status` (401 by default) to the token the
    request carried, that token is dropped (the provider does this once per token,
    however many requests see the status), whatever is decided.
    """
    status = response.status
    if status == 101:
        return UPGRADE if ctx.head.upgrade else SWITCHED_UNASKED
    if ctx.proof_sent and _asks_for_dpop_nonce(ctx, response):
        return REPLAY_WITH_NONCE
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


def _asks_for_dpop_nonce(ctx: RequestContext, response: ResponseHead) -> bool:
    """Keep a ``DPoP-Nonce`` the upstream sent; whether its answer is a 401 asking for
    it (RFC 9449 §9) that the request may be sent again for."""
    nonces = field_values(response.fields, b"dpop-nonce")
    plan = ctx.plan
    route = plan.route if plan is not None else None
    if not nonces or plan is None or route is None or route.injector.dpop is None:
        return False
    authority = plan.host.decode("latin-1")
    nonce = nonces[-1].decode("latin-1")
    noted = route.injector.dpop.note_resource_nonce(plan.origin.scheme, authority, nonce)
    if response.status != 401 or not noted or ctx.replayed or ctx.head.method not in IDEMPOTENT:
        return False
    challenges = b", ".join(field_values(response.fields, b"www-authenticate"))
    return asks_for_nonce(challenges.decode("latin-1"))


def switched_unasked() -> ProxyError:
    """The error answered for a 101 the client did not ask for."""
    return UpstreamUnreachable("the upstream switched protocols unasked")


def on_failure(
    ctx: RequestContext, exchange: Exchange, head_sent: bool, error: ProxyError | None = None
) -> int:
    """What a failed `exchange` means, `head_sent` telling whether the client has the head
    and `error` (when known) why it failed."""
    if ctx.conn.closed:
        return CLIENT_GONE
    if head_sent:
        return CUT_SHORT
    if (
        exchange.reused
        and not exchange.received_any
        and ctx.body is None
        and ctx.head.method in IDEMPOTENT
        # A stale keep-alive connection shows itself at once (closed or reset before any
        # answer); silence until the timeout is a slow upstream, which a second try
        # would only load more, and the client would wait twice as long.
        and not isinstance(error, UpstreamTimeout)
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
