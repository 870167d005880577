"""Sending a request again, once `proxy.datapath.decisions` says so: on every path.

A replay needs the request body: `KeptBody` keeps a copy of it while it is small enough
(`REPLAY_LIMIT`), `sent_whole` tells whether it was, and `SendAgain` carries the
decision to the request path's loop (`proxy.datapath.forward`, on HTTP/1.1 or, through
`proxy.datapath.http2.bridge`, to an HTTP/2 upstream). `take_new_token` and
`note_nonce_replay` prepare the request for its second attempt, on every path (an
HTTP/2 stream's from the application too).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Final

from proxy.datapath.context import RequestContext
from proxy.datapath.timeouts import REPLAY_BODY_WAIT
from proxy.ops.metrics import Metrics

log = logging.getLogger("token_proxy.forward")

# Bodies up to this size are kept while sent, so a request can be replayed after a 401.
REPLAY_LIMIT: Final = 64 * 1024


class SendAgain(Exception):
    """The request is to be sent again, as `how` (a value above) says."""

    def __init__(self, how: int) -> None:
        super().__init__(how)
        self.how = how


class KeptBody:
    """A copy of a request body while it is small enough to replay after a 401."""

    __slots__ = ("chunks", "overflow", "size")

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.size = 0
        self.overflow = False

    def add(self, data: bytes) -> None:
        if self.overflow:
            return
        self.size += len(data)
        if self.size > REPLAY_LIMIT:
            self.overflow = True
            self.chunks.clear()
        else:
            self.chunks.append(data)


async def sent_whole(body_task: asyncio.Task[None] | None, kept: KeptBody | None) -> bool:
    """Whether the request body was sent whole and kept (or there is none), so that the
    request can be replayed."""
    if body_task is None:
        return True
    if kept is None:
        return False
    if not body_task.done():
        # The 401 came before the body was sent; a small body still arrives quickly.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(body_task), timeout=REPLAY_BODY_WAIT)
    if not body_task.done() or body_task.cancelled() or body_task.exception() is not None:
        return False
    return not kept.overflow


async def take_new_token(ctx: RequestContext, metrics: Metrics) -> None:
    """After the upstream refused the request's token (dropped by then): wait for another."""
    plan = ctx.plan
    route = plan.route if plan is not None else None
    assert route is not None
    metrics.upstream_unauthorized_retries.labels(upstream=route.name).inc()
    log.info(
        "upstream refused the token; retrying once with a new token",
        extra={"event": "unauthorized_retry", "upstream": route.name},
    )
    ctx.token = await route.provider.get()
    ctx.replayed = True


def note_nonce_replay(ctx: RequestContext, metrics: Metrics) -> None:
    """The upstream asked for a DPoP nonce (kept by then): send again, same token."""
    metrics.dpop_nonce_retries.labels(upstream=ctx.label, server="resource").inc()
    ctx.replayed = True
