"""The request path: add the token and relay the exchange, on one of two paths.

`Forwarder` serves every port through a `ModeHandler` whose planner (`proxy.datapath.planning`)
decides where a request goes. Then, for each request it

1. takes the upstream's token from its provider without waiting while one is valid,
2. sends the head (hop-by-hop fields removed, token set once) and streams the body,
3. relays the response head and streams the body back, re-framing as needed,
4. on a 401 (or another `purge_on_status`) to a token it sent, drops that token and
   retries once when the request can be replayed (idempotent, body small enough to
   have been kept).

Body-less requests with a token and an idle upstream connection at hand take the fast
path (`proxy.datapath.fast_path`), entirely in protocol callbacks; everything else, and
whatever leaves the fast path, runs here as a coroutine. Both paths build the upstream
head with the route's `Injector` and ask `proxy.datapath.decisions` what an answer means.
A request for an upstream spoken to in HTTP/2 (its `http2` setting) is sent, from
here, by `proxy.datapath.http2.bridge`, which asks the same decisions.

Every error before the response head is sent becomes the contract's JSON answer via
`ProxyError`; after that, the only honest signal left is closing the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from functools import partial

from proxy.datapath.client_connection import ClientConnection
from proxy.datapath.context import RequestContext
from proxy.datapath.decisions import (
    CLIENT_GONE,
    CUT_SHORT,
    IDEMPOTENT,
    REPLAY_WITH_NEW_TOKEN,
    REPLAY_WITH_NONCE,
    RETRY_ON_FRESH_CONNECTION,
    SWITCHED_UNASKED,
    UPGRADE,
    frame_for_client,
    on_failure,
    on_response_head,
    switched_unasked,
)
from proxy.datapath.fast_path import FastExchange
from proxy.datapath.http2.bridge import Http2Bridge
from proxy.datapath.http2.upstream import Http2Upstreams
from proxy.datapath.injector import DPOP_TOKEN, NO_CREDENTIAL, may_carry_credential
from proxy.datapath.messages import (
    LAST_CHUNK,
    RequestHead,
    ResponseHead,
    chunk,
    request_head_bytes,
    response_head_bytes,
    via_line,
)
from proxy.datapath.outcomes import Outcomes, write_interim
from proxy.datapath.planning import Plan, Planner, Planners, link_local_refusal
from proxy.datapath.replay import KeptBody, SendAgain, note_nonce_replay, sent_whole, take_new_token
from proxy.datapath.request_body import RequestBody
from proxy.datapath.runtime import Route, RuntimeHolder, upstream_timeouts
from proxy.datapath.tunnel import TunnelHandler, splice
from proxy.datapath.upstream_connection import AwaitedExchange, UpstreamConnection
from proxy.datapath.upstream_pool import UpstreamPool
from proxy.errors import BadRequest, ProxyError, TokenUnavailable
from proxy.hosts import is_link_local_target
from proxy.ops.metrics import UNMATCHED, Metrics

log = logging.getLogger("token_proxy.forward")

# CONNECT opens a tunnel; TRACE is sent without a token; TRACE and OPTIONS may have to
# be answered here (Max-Forwards). None of them fits the fast path.
_NOT_FAST = frozenset({"CONNECT", "TRACE", "OPTIONS"})
# RFC 9110 §7.6.2: the methods whose Max-Forwards a proxy checks and decrements.
_MAX_FORWARDS_METHODS = frozenset({"TRACE", "OPTIONS"})
_MAX_FORWARDS = b"max-forwards"
# RFC 9110 §9.3.8: fields likely to hold credentials are left out of a TRACE echo.
_NOT_ECHOED = frozenset({b"authorization", b"proxy-authorization", b"cookie"})
# What this proxy forwards, as the answer to an OPTIONS it is the final recipient of.
_ALLOWED_METHODS = b"GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS, TRACE"
# The first attempt at a request (the others are `decisions` values).
_FIRST_ATTEMPT = -1


class Forwarder:
    """Serves the forward-proxy port and every reverse-proxy port."""

    def __init__(
        self,
        holder: RuntimeHolder,
        pool: UpstreamPool,
        metrics: Metrics,
        tunnels: TunnelHandler,
        http2: Http2Upstreams | None = None,
    ) -> None:
        self._planners = Planners(holder)
        self.pool = pool
        self._metrics = metrics
        self._tunnels = tunnels
        self._outcomes = Outcomes(holder, metrics)
        # Requests for configured upstreams spoken to in HTTP/2 (`http2` setting).
        self._bridge = Http2Bridge(http2, self._outcomes) if http2 is not None else None
        self._loop = asyncio.get_event_loop()
        self._background: set[asyncio.Task[None]] = set()

    # -- entry points: one ModeHandler per port ------------------------------

    def forward_handler(self) -> ModeHandler:
        """The handler of the forward-proxy port (absolute-form targets and CONNECT)."""
        return ModeHandler(self, self._planners.plan_forward, connect=self._tunnels.handle_connect)

    def reverse_handler(self, upstream_name: str) -> ModeHandler:
        """The handler of `upstream_name`'s own port: everything goes to its `url`."""
        return ModeHandler(self, partial(self._planners.plan_reverse, upstream_name))

    def tunnelled_handler(self, scheme: str, host: str, port: int) -> ModeHandler:
        """The handler for requests inside a `CONNECT host:port` tunnel: decrypted from an
        intercepted TLS session (`https`), or plain HTTP sent through it (`http`)."""
        return ModeHandler(self, partial(self._planners.plan_tunnelled, scheme, host, port))

    async def handle(
        self,
        planner: Planner,
        conn: ClientConnection,
        head: RequestHead,
        body: RequestBody | None,
    ) -> bool:
        """The general path: any request, as a coroutine."""
        try:
            plan = planner(head)
        except ProxyError as error:
            refused = RequestContext(conn, head, body, None, 0.0)
            refused.label = error.upstream or UNMATCHED
            return self._outcomes.refuse(refused, error)
        ctx = RequestContext(conn, head, body, plan, self._loop.time())
        if head.method in _MAX_FORWARDS_METHODS and _last_hop(ctx):
            return self._answer_as_last_hop(ctx)
        return await self._serve(ctx)

    def _answer_as_last_hop(self, ctx: RequestContext) -> bool:
        """A TRACE or OPTIONS with `Max-Forwards: 0`: answered here, as its final
        recipient (RFC 9110 §7.6.2). TRACE gets the request head back (§9.3.8) without
        any credential or cookie; OPTIONS what this proxy forwards."""
        head = ctx.head
        body = ctx.body
        conn = ctx.conn
        keep_alive = head.keep_alive and (body is None or body.done)
        keep_alive = keep_alive and not conn.listener.draining
        if head.method == "TRACE":
            plan = ctx.plan
            route = plan.route if plan is not None else None
            hidden = set(_NOT_ECHOED)
            if route is not None:
                hidden.add(route.injector.header_name.lower())
            lines = [b"%b %b HTTP/%b\r\n" % (b"TRACE", head.target, head.version.encode())]
            lines += [b"Host: %b\r\n" % host for host in head.hosts]
            lines += [
                b"%b: %b\r\n" % (name, value)
                for name, value in head.headers
                if name.lower() not in hidden
            ]
            echo = b"".join(lines) + b"\r\n"
            fields = b"Content-Type: message/http\r\nContent-Length: %d\r\n" % len(echo)
        else:
            echo = b""
            fields = b"Allow: %b\r\nContent-Length: 0\r\n" % _ALLOWED_METHODS
        connection = b"Connection: keep-alive\r\n" if keep_alive else b"Connection: close\r\n"
        conn.write(b"HTTP/1.1 200 OK\r\n%b%b\r\n%b" % (fields, connection, echo))
        self._outcomes.record(ctx, 200, None)
        ctx.bytes_out = len(echo)
        self._outcomes.finish(ctx)
        return keep_alive

    def try_fast(self, planner: Planner, conn: ClientConnection, head: RequestHead) -> bool:
        """Start `head` on the fast path if it qualifies; False leaves it to `handle`."""
        if head.has_body or head.upgrade or head.method in _NOT_FAST:
            return False
        try:
            plan = planner(head)
        except ProxyError:
            return False  # answered by the general path
        token: str | None = None
        route = plan.route
        if route is not None:
            token = route.held_token.current()
            if token is None:
                return False
        upconn = self.pool.take_idle(plan.origin)
        if upconn is None:
            return False
        now = self._loop.time()
        ctx = RequestContext(conn, head, None, plan, now)
        ctx.token = token
        request_head = self._request_head(ctx, plan)
        exchange = FastExchange(ctx, upconn, self.pool, self._outcomes, self)
        upconn.begin(exchange, request_head, now, upstream_timeouts(route)[1])
        return True

    def finish_slowly(self, ctx: RequestContext, how: int) -> None:
        """Carry a fast-path request on here: send it again as `how` says, and answer it."""
        task = self._loop.create_task(self._finish_slowly(ctx, how))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _finish_slowly(self, ctx: RequestContext, how: int) -> None:
        try:
            keep_alive = await self._send(ctx, None, how)
        except Exception:
            log.exception("unexpected error finishing a request")
            ctx.conn.abort()
            keep_alive = False
        ctx.conn.fast_done(keep_alive)

    # -- the exchange --------------------------------------------------------------

    async def _serve(self, ctx: RequestContext) -> bool:
        plan = ctx.plan
        assert plan is not None
        route = plan.route
        body = ctx.body
        if route is not None and may_carry_credential(ctx.head.method):
            token = route.held_token.current()
            if token is None:
                try:
                    if body is None:
                        token = await route.provider.get()
                    else:
                        token = await _token_unless_body_fails(route, body)
                except TokenUnavailable as error:
                    self._metrics.token_unavailable.labels(upstream=ctx.label).inc()
                    return self._outcomes.refuse(ctx, error)
                except ProxyError as error:  # the body failed: nothing was sent
                    return self._outcomes.refuse(ctx, error)
            ctx.token = token
        if body is not None and body.held_whole:
            try:
                await self._hold_whole(ctx, body)
            except ProxyError as error:
                return self._outcomes.refuse(ctx, error)
        kept = KeptBody() if ctx.head.method in IDEMPOTENT else None
        return await self._send(ctx, kept, _FIRST_ATTEMPT)

    async def _hold_whole(self, ctx: RequestContext, body: RequestBody) -> None:
        """Wait for the whole of a body whose size is known only at its end, so that a
        request the limit refuses never reaches the upstream (as nginx buffers request
        bodies). A client that waits for `100 Continue` gets it from us, and the upstream
        gets the body with the head, without the expectation."""
        head = ctx.head
        expects = [value for name, value in head.headers if name.lower() == b"expect"]
        if expects:
            head.headers = [field for field in head.headers if field[0].lower() != b"expect"]
            continues = any(value.strip().lower() == b"100-continue" for value in expects)
            if continues and head.version == "1.1" and not body.done:
                ctx.conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await body.whole()

    async def _send(self, ctx: RequestContext, kept: KeptBody | None, how: int) -> bool:
        """Send the request, again for as long as the decisions say so, and answer it."""
        try:
            while True:
                if how == REPLAY_WITH_NEW_TOKEN:
                    await take_new_token(ctx, self._metrics)
                elif how == REPLAY_WITH_NONCE:
                    note_nonce_replay(ctx, self._metrics)
                ctx.fresh_connection = how == RETRY_ON_FRESH_CONNECTION
                try:
                    return await self._attempt(ctx, kept)
                except SendAgain as again:
                    how = again.how
        except ProxyError as error:
            if isinstance(error, TokenUnavailable):
                self._metrics.token_unavailable.labels(upstream=ctx.label).inc()
            return self._outcomes.refuse(ctx, error)

    async def _attempt(self, ctx: RequestContext, kept: KeptBody | None) -> bool:
        """Send the request once and relay the answer; `SendAgain` to send it again."""
        plan = ctx.plan
        assert plan is not None
        conn = ctx.conn
        head = ctx.head
        body = ctx.body
        route = plan.route
        bridge = self._bridge
        # WebSocket stays HTTP/1.1 (no extended CONNECT, RFC 8441).
        if (
            bridge is not None
            and route is not None
            and not head.upgrade
            and route.config.http2 != "off"
            and await bridge.speaks_h2(plan)
        ):
            return await bridge.attempt(ctx, kept)
        if body is not None and not ctx.replayed:
            # What arrived with the head (or since) may already have broken the body:
            # then the head is never sent.
            _raise_if_failed(body)
        upconn = await self._connection(plan, fresh=ctx.fresh_connection)
        if body is not None and not ctx.replayed and body.failure() is not None:
            self.pool.discard(upconn)
            _raise_if_failed(body)
        exchange = AwaitedExchange(self._loop, head.method == "HEAD")
        if head.version == "1.1":
            exchange.interim_writer = partial(write_interim, conn, plan.via)
        upconn.begin(
            exchange,
            self._request_head(ctx, plan),
            self._loop.time(),
            upstream_timeouts(plan.route)[1],
        )
        body_task: asyncio.Task[None] | None = None
        if body is not None:
            source = kept if ctx.replayed else body
            body_task = self._loop.create_task(self._send_body(upconn, head, source, kept))
            body_task.add_done_callback(partial(_abandon_on_body_error, exchange, upconn))
        try:
            response = await exchange.head
        except ProxyError as error:
            if body_task is not None:
                body_task.cancel()
            self.pool.discard(upconn)
            how = on_failure(ctx, exchange, False, error)
            if how == RETRY_ON_FRESH_CONNECTION:
                raise SendAgain(how) from None
            if how == CLIENT_GONE:
                return False
            raise
        except asyncio.CancelledError:
            # The client went away (its connection cancels the handler): free the upstream.
            if body_task is not None:
                body_task.cancel()
            self.pool.discard(upconn)
            raise
        how = on_response_head(ctx, response)
        replay = how in (REPLAY_WITH_NEW_TOKEN, REPLAY_WITH_NONCE)
        if replay and await sent_whole(body_task, kept):
            if body_task is not None:
                body_task.cancel()
            self.pool.discard(upconn)
            raise SendAgain(how)
        if how == SWITCHED_UNASKED:
            # What follows on this connection is not HTTP any more.
            if body_task is not None:
                body_task.cancel()
            self.pool.discard(upconn)
            raise switched_unasked()
        self._outcomes.record(ctx, response.status, response)
        try:
            if how == UPGRADE:
                return self._upgrade(conn, upconn, exchange, response, body_task, plan.via)
            return await self._relay(ctx, upconn, exchange, response, body_task)
        finally:
            self._outcomes.finish(ctx)

    async def _connection(self, plan: Plan, *, fresh: bool) -> UpstreamConnection:
        conn = None if fresh else self.pool.take_idle(plan.origin)
        if conn is not None:
            return conn
        conn = await self.pool.connect(
            plan.origin, connect_timeout=upstream_timeouts(plan.route)[0]
        )
        if plan.guard_peer and conn.transport is not None:
            peer = conn.transport.get_extra_info("peername")
            if isinstance(peer, tuple) and is_link_local_target(str(peer[0])):
                # A name that resolved to a link-local or metadata address.
                self.pool.discard(conn)
                raise link_local_refusal(f"{plan.origin.host} ({peer[0]})")
        return conn

    def _request_head(self, ctx: RequestContext, plan: Plan) -> bytes:
        """The head to send upstream; sets `ctx.injected` (whether our token is in it) and
        `ctx.proof_sent` (whether with a DPoP proof)."""
        head = ctx.head
        route = plan.route
        token = ctx.token
        if token is not None and route is not None:
            headers, credential = route.injector.inject(
                head.headers, token, head.method, plan.origin.scheme, plan.host, plan.path
            )
        else:
            headers, credential = list(head.headers), NO_CREDENTIAL
        ctx.injected = credential != NO_CREDENTIAL
        ctx.proof_sent = credential == DPOP_TOKEN
        if head.upgrade:
            if head.upgrade_to is not None:
                headers.append((b"Upgrade", head.upgrade_to))
            headers.append((b"Connection", b"Upgrade"))
        if head.chunked:
            framing = b"Transfer-Encoding: chunked\r\n"
        elif head.content_length is not None:
            framing = b"Content-Length: %d\r\n" % head.content_length
        else:
            framing = b""
        via = via_line(head.version) if plan.via else b""
        return request_head_bytes(head.method, plan.path, plan.host, headers, framing, via)

    async def _send_body(
        self,
        upconn: UpstreamConnection,
        head: RequestHead,
        source: RequestBody | KeptBody | None,
        kept: KeptBody | None,
    ) -> None:
        """Stream the request body upstream (from the client, or from `kept` on a replay)."""
        chunked = head.chunked
        if isinstance(source, KeptBody):
            for piece in source.chunks:
                upconn.write(chunk(piece) if chunked else piece)
        elif source is not None:
            while (data := await source.read()) is not None:
                if kept is not None:
                    kept.add(data)
                upconn.write(chunk(data) if chunked else data)
                await upconn.drain()
        if chunked:
            upconn.write(LAST_CHUNK)

    async def _relay(
        self,
        ctx: RequestContext,
        upconn: UpstreamConnection,
        exchange: AwaitedExchange,
        response: ResponseHead,
        body_task: asyncio.Task[None] | None,
    ) -> bool:
        conn = ctx.conn
        response_head, has_body, rechunk, keep_alive = frame_for_client(ctx, response)
        if not has_body:
            conn.write(response_head)
        else:
            # The head and whatever body came with it leave in one write.
            first = exchange.take_buffered()
            ctx.bytes_out += len(first)
            if first and rechunk:
                first = chunk(first)
            conn.write(response_head + first)
            try:
                await self._stream_response(ctx, upconn, exchange, rechunk)
            except (ProxyError, ConnectionError):
                if body_task is not None:
                    body_task.cancel()
                self.pool.discard(upconn)
                if on_failure(ctx, exchange, True) == CUT_SHORT:
                    # Too late for an error response: the client sees a cut-short body.
                    conn.abort()
                return False
            except asyncio.CancelledError:
                # The client went away mid-response: stop reading the upstream at once.
                if body_task is not None:
                    body_task.cancel()
                self.pool.discard(upconn)
                raise
        if body_task is not None:
            if not body_task.done():
                body_task.cancel()
                keep_alive = False
                upconn.abort_after_exchange = True
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await body_task
        self.pool.release(upconn)
        return keep_alive

    async def _stream_response(
        self,
        ctx: RequestContext,
        upconn: UpstreamConnection,
        exchange: AwaitedExchange,
        rechunk: bool,
    ) -> None:
        conn = ctx.conn
        write = conn.write

        def sink(data: bytes) -> None:
            if conn.closed:
                upconn.abort()  # the client went away: stop the download
                return
            ctx.bytes_out += len(data)
            write(chunk(data) if rechunk else data)
            if conn.write_paused:
                upconn.pause_reading()

        conn.on_resume_writing = upconn.resume_reading
        try:
            exchange.attach(sink)
            await exchange.done
        finally:
            conn.on_resume_writing = None
        if conn.closed:
            raise ConnectionResetError("client went away")
        if rechunk:
            write(LAST_CHUNK)

    def _upgrade(
        self,
        conn: ClientConnection,
        upconn: UpstreamConnection,
        exchange: AwaitedExchange,
        response: ResponseHead,
        body_task: asyncio.Task[None] | None,
        via: bool,
    ) -> bool:
        if body_task is not None:
            body_task.cancel()
        fields = response.fields
        if response.upgrade_to is not None:
            fields += b"\r\nUpgrade: " + response.upgrade_to
        conn.write(
            response_head_bytes(
                101,
                response.reason,
                fields,
                b"Connection: Upgrade\r\n",
                via_line(response.version) if via else b"",
            )
        )
        upstream_tail = exchange.upgrade_tail
        transport = upconn.detach()
        splice(
            conn, transport, upstream_tail, idle_timeout=conn.listener.limits.tunnel_idle_timeout
        )
        return False


class ModeHandler:
    """The `RequestHandler` of one port: how its requests are planned, on either path."""

    def __init__(
        self,
        forwarder: Forwarder,
        planner: Planner,
        *,
        connect: Callable[[ClientConnection, RequestHead], Awaitable[bool]] | None = None,
    ) -> None:
        self._forwarder = forwarder
        self._planner = planner
        self._connect = connect

    def __call__(
        self, conn: ClientConnection, head: RequestHead, body: RequestBody | None
    ) -> Awaitable[bool]:
        if head.method == "CONNECT" and self._connect is not None:
            return self._connect(conn, head)
        return self._forwarder.handle(self._planner, conn, head, body)

    def fast(self, conn: ClientConnection, head: RequestHead) -> bool:
        return self._forwarder.try_fast(self._planner, conn, head)


async def _token_unless_body_fails(route: Route, body: RequestBody) -> str:
    """`route`'s token, awaited until it comes or the request body fails (too large,
    malformed, the client gone): then the body's failure is raised at once, rather than
    after a token wait for a request that cannot be sent."""
    getter = asyncio.ensure_future(route.provider.get())
    failed = body.failed()
    try:
        await asyncio.wait((getter, failed), return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not getter.done():
            getter.cancel()
    if body.failure() is not None:
        if getter.done() and not getter.cancelled():
            getter.exception()  # retrieved: its outcome no longer matters
        _raise_if_failed(body)
    return getter.result()


def _raise_if_failed(body: RequestBody) -> None:
    failure = body.failure()
    if failure is not None:
        raise failure


def _last_hop(ctx: RequestContext) -> bool:
    """Whether a TRACE or OPTIONS request is to be answered here (`Max-Forwards: 0`);
    otherwise its Max-Forwards, if any, is decremented in the head it is sent with."""
    head = ctx.head
    fields = head.headers
    for index, (name, value) in enumerate(fields):
        if len(name) == len(_MAX_FORWARDS) and name.lower() == _MAX_FORWARDS:
            digits = value.strip()
            if not digits.isdigit():
                return False  # not a number: forwarded as it came
            remaining = int(digits)
            if remaining == 0:
                return True
            head.headers = [*fields[:index], (name, b"%d" % (remaining - 1)), *fields[index + 1 :]]
            return False
    return False


def _abandon_on_body_error(
    exchange: AwaitedExchange, upconn: UpstreamConnection, body_task: asyncio.Task[None]
) -> None:
    """The request body broke off (bad chunk, too large): end the exchange now.

    The upstream holds an incomplete request and would wait for the rest until the
    timeout; aborting its connection means it never sees the message as complete
    (RFC 9112 §8), and the client gets the 400/413 at once.
    """
    if body_task.cancelled() or exchange.complete or exchange.failed:
        return
    error = body_task.exception()
    if isinstance(error, ConnectionError):
        # The client closed or reset before its body was complete: the request can
        # never be completed, so nobody should wait for the upstream's answer to it.
        error = BadRequest("the client closed the connection before the request body ended")
    if isinstance(error, ProxyError):
        upconn.abort()
        exchange.fail(error)
