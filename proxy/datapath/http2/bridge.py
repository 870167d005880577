"""HTTP/1.1 requests sent to their upstream over HTTP/2, and the answer relayed back.

`Http2Bridge` is the general path's (`proxy.datapath.forward`) way to an upstream that
is spoken to in HTTP/2: `speaks_h2` decides, from the route's `http2` setting and what
`Http2Upstreams` knows of the origin (asking it once: ALPN `h2` on TLS), and `attempt`
sends one attempt of the request on an `UpstreamStream`:

* the head in HTTP/2 form: pseudo-header fields from the plan (`:authority` its Host,
  `:path` its origin-form path), field names in lower case, the credential through
  `stream.with_credential`, `content-length` when the client gave one; hop-by-hop
  fields never reach here (`RequestHead` holds end-to-end fields only);
* the body as the client sends it, each piece sent once the upstream's window takes it
  (so the client is read no faster than the upstream reads), kept for a replay while
  it is small enough (`replay.KeptBody`);
* the answer asked about in `decisions`, as on HTTP/1.1: a 401 to our token or a DPoP
  nonce challenge is raised as `replay.SendAgain` for the forwarder's loop, which
  sends the request again through here;
* the HTTP/1.1 head from `decisions.frame_for_client` (chunked when the upstream sent
  no `content-length`), then the DATA, read from the upstream stream only while the
  client's transport takes more: reading is what hands the upstream its window back.

Trailers are not passed on: an HTTP/1.1 client receives them only in a chunked body
after asking with `TE: trailers`, a hop-by-hop field the parsed head does not keep.
Failures map as on HTTP/1.1: before the head went out, the proxy's own answer (502
`upstream_unreachable`, 504 `upstream_timeout`, or the body's 400/413); after, the
client connection is closed, cutting the body short.
"""

from __future__ import annotations

import asyncio
import contextlib
from functools import partial
from typing import Final

from proxy.datapath.client_connection import ClientConnection
from proxy.datapath.context import RequestContext
from proxy.datapath.decisions import (
    CLIENT_GONE,
    CUT_SHORT,
    REPLAY_WITH_NEW_TOKEN,
    REPLAY_WITH_NONCE,
    SWITCHED_UNASKED,
    UPGRADE,
    frame_for_client,
    on_failure,
    on_response_head,
    switched_unasked,
)
from proxy.datapath.http2.stream import CANCEL, response_head, with_credential
from proxy.datapath.http2.upstream import Http2Upstreams, UpstreamStream
from proxy.datapath.injector import DPOP_TOKEN, NO_CREDENTIAL
from proxy.datapath.messages import LAST_CHUNK, Headers, ResponseHead, chunk
from proxy.datapath.outcomes import Outcomes
from proxy.datapath.planning import Plan
from proxy.datapath.replay import KeptBody, SendAgain, sent_whole
from proxy.datapath.request_body import RequestBody
from proxy.datapath.upstream_connection import Exchange
from proxy.errors import BadRequest, ProxyError, UpstreamUnreachable

# An HTTP/2 stream is never a reused keep-alive connection (`decisions.on_failure`):
# `Http2Upstreams` itself sends again a stream the upstream did not process.
_STREAM: Final = Exchange(False)
_EXPECT: Final = b"expect"


class Http2Bridge:
    """Sends the general path's requests to HTTP/2 upstreams."""

    def __init__(self, upstreams: Http2Upstreams, outcomes: Outcomes) -> None:
        self._upstreams = upstreams
        self._outcomes = outcomes

    async def speaks_h2(self, plan: Plan) -> bool:
        """Whether the request planned as `plan` (for a configured upstream, not an
        upgrade) goes over HTTP/2: always with `http2: required`, never with `off`, and
        with `auto` when the origin is TLS and selects `h2` in ALPN. A TLS origin that
        does not, with `required`, is `UpstreamUnreachable`."""
        route = plan.route
        assert route is not None
        config = route.config
        if config.http2 == "off":
            return False
        if plan.origin.ssl is None:
            return config.http2 == "required"  # h2c with prior knowledge, or nothing
        connection = await self._upstreams.connect(
            plan.origin, connect_timeout=config.connect_timeout
        )
        if connection is None and config.http2 == "required":
            raise UpstreamUnreachable(
                "the upstream does not speak HTTP/2 (no h2 in ALPN) and its http2 is required"
            )
        return connection is not None

    async def attempt(self, ctx: RequestContext, kept: KeptBody | None) -> bool:
        """Send the request once and relay the answer; `SendAgain` to send it again.
        Whether the client connection stays open."""
        plan = ctx.plan
        assert plan is not None
        assert plan.route is not None
        body = ctx.body
        if body is not None and not ctx.replayed:
            _raise_if_failed(body)
        config = plan.route.config
        loop = asyncio.get_running_loop()
        try:
            upstream = await self._upstreams.open_stream(
                plan.origin,
                self._request_fields(ctx, plan),
                end_stream=body is None,
                connect_timeout=config.connect_timeout,
                read_timeout=config.timeout,
            )
        except ProxyError as error:
            if on_failure(ctx, _STREAM, False) == CLIENT_GONE:
                return False
            if isinstance(error, UpstreamUnreachable) and plan.origin.ssl is None:
                # Only `http2: required` speaks h2c, where nothing in the handshake
                # says whether the origin speaks HTTP/2.
                raise UpstreamUnreachable(
                    f"{error.detail} (cleartext HTTP/2 with prior knowledge, as http2 is required)"
                ) from None
            raise
        upload: asyncio.Task[None] | None = None
        if body is not None:
            source = kept if ctx.replayed else body
            upload = loop.create_task(_upload(upstream, source, kept))
            upload.add_done_callback(partial(_abandon_on_body_error, upstream))
        try:
            status, fields = await upstream.response_head()
            response = response_head(status, fields)
            how = on_response_head(ctx, response)
            if how in (REPLAY_WITH_NEW_TOKEN, REPLAY_WITH_NONCE) and await sent_whole(upload, kept):
                raise SendAgain(how)
            if how in (UPGRADE, SWITCHED_UNASKED):
                raise switched_unasked()  # h2 refuses a 101: never reached
        except ProxyError:
            _stop(upstream, upload)
            if on_failure(ctx, _STREAM, False) == CLIENT_GONE:
                return False
            raise
        except BaseException:
            _stop(upstream, upload)
            raise
        self._outcomes.record(ctx, status, response)
        try:
            return await self._relay(ctx, upstream, response, upload)
        finally:
            self._outcomes.finish(ctx)

    def _request_fields(self, ctx: RequestContext, plan: Plan) -> Headers:
        """The request's header list for HTTP/2, with the credential; sets
        `ctx.injected` and `ctx.proof_sent` as the HTTP/1.1 head does."""
        head = ctx.head
        route = plan.route
        origin = plan.origin
        headers = head.headers
        if any(name.lower() == _EXPECT for name, _ in headers):
            # The body is streamed at once, as the upstream's window lets it: a client
            # waiting for `100 Continue` gets it here.
            headers = [field for field in headers if field[0].lower() != _EXPECT]
            body = ctx.body
            if head.version == "1.1" and body is not None and not body.done and not ctx.replayed:
                ctx.conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        extra: Headers = []
        if head.content_length is not None and not head.chunked:
            extra.append((b"content-length", b"%d" % head.content_length))
        if plan.via:
            extra.append((b"via", head.version.encode("ascii") + b" token-proxy"))
        token = ctx.token
        if token is not None and route is not None:
            fields, credential = with_credential(
                route, headers, token, head.method, origin.scheme, plan.host, plan.path
            )
        else:
            fields, credential = [(name.lower(), value) for name, value in headers], NO_CREDENTIAL
        ctx.injected = credential != NO_CREDENTIAL
        ctx.proof_sent = credential == DPOP_TOKEN
        pseudo: Headers = [
            (b":method", head.method.encode("ascii")),
            (b":scheme", origin.scheme.encode("ascii")),
            (b":authority", plan.host),
            (b":path", plan.path),
        ]
        return pseudo + fields + extra

    async def _relay(
        self,
        ctx: RequestContext,
        upstream: UpstreamStream,
        response: ResponseHead,
        upload: asyncio.Task[None] | None,
    ) -> bool:
        conn = ctx.conn
        head, has_body, rechunk, keep_alive = frame_for_client(ctx, response)
        conn.write(head)
        try:
            if has_body:
                while (data := await upstream.read()) is not None:
                    if conn.closed:
                        raise ConnectionResetError("client went away")
                    ctx.bytes_out += len(data)
                    conn.write(chunk(data) if rechunk else data)
                    if conn.write_paused:
                        await _resumed(conn)
                if rechunk:
                    conn.write(LAST_CHUNK)
            elif not upstream.finished:
                upstream.reset(CANCEL)  # no body for this client: nothing to read
        except (ProxyError, ConnectionError):
            _stop(upstream, upload)
            if on_failure(ctx, _STREAM, True) == CUT_SHORT:
                conn.abort()  # too late for an error response: the body is cut short
            return False
        except BaseException:
            # The client went away mid-response (its connection cancels the handler).
            _stop(upstream, upload)
            raise
        if upload is not None:
            if not upload.done():
                # Answered before the request body ended: what is left of it cannot be
                # told apart from a next request.
                upload.cancel()
                keep_alive = False
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await upload
        return keep_alive


async def _upload(
    upstream: UpstreamStream, source: RequestBody | KeptBody | None, kept: KeptBody | None
) -> None:
    """The request body, upstream (from the client, or from `kept` on a replay)."""
    if isinstance(source, KeptBody):
        for piece in source.chunks:
            await upstream.send_data(piece)
    elif source is not None:
        while (data := await source.read()) is not None:
            if kept is not None:
                kept.add(data)
            if data:
                await upstream.send_data(data)
    await upstream.end()


async def _resumed(conn: ClientConnection) -> None:
    """Wait until the client's transport takes writes again."""
    waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    conn.on_resume_writing = partial(_settle, waiter)
    try:
        if conn.write_paused and not conn.closed:
            await waiter
    finally:
        conn.on_resume_writing = None


def _settle(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _stop(upstream: UpstreamStream, upload: asyncio.Task[None] | None) -> None:
    if upload is not None and not upload.done():
        upload.cancel()
    if not upstream.finished:
        upstream.reset(CANCEL)


def _raise_if_failed(body: RequestBody) -> None:
    failure = body.failure()
    if failure is not None:
        raise failure


def _abandon_on_body_error(upstream: UpstreamStream, upload: asyncio.Task[None]) -> None:
    """The request body broke off (bad chunk, too large, the client gone): the upstream
    stream is reset, so it never takes the request as complete, and whoever waits for
    its answer gets the body's error (the client's 400/413)."""
    if upload.cancelled():
        return
    error = upload.exception()
    if isinstance(error, ConnectionError):
        error = BadRequest("the client closed the connection before the request body ended")
    if isinstance(error, ProxyError) and not upstream.finished:
        upstream.fail(error)
        upstream.reset(CANCEL)
