"""The request path: add the token and relay the exchange, on one of two paths.

`Forwarder` serves every port through a `ModeHandler` whose planner (`proxy.datapath.planning`)
decides where a request goes. Then, for each request it

1. takes the upstream's token from its provider without waiting while one is valid,
2. sends the head (hop-by-hop fields removed, token set once) and streams the body,
3. relays the response head and streams the body back, re-framing as needed,
4. on a 401 to a token it sent, drops that token and retries once when the request
   can be replayed (idempotent, body small enough to have been kept).

Body-less requests with a token and an idle upstream connection at hand take the fast
path (`proxy.datapath.fast_path`), entirely in protocol callbacks; everything else, and
whatever leaves the fast path, runs here as a coroutine.

Every error before the response head is sent becomes the contract's JSON answer via
`ProxyError`; after that, the only honest signal left is closing the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from functools import partial

from proxy.datapath.client_connection import ClientConnection, RequestBody
from proxy.datapath.fast_path import FastExchange
from proxy.datapath.messages import (
    LAST_CHUNK,
    RequestHead,
    ResponseHead,
    chunk,
    forward_headers,
    frame_response,
    request_head_bytes,
    response_head_bytes,
)
from proxy.datapath.planning import Plan, Planner, Planners
from proxy.datapath.runtime import RuntimeHolder
from proxy.datapath.tunnel import TunnelHandler, splice
from proxy.datapath.upstream_pool import AwaitedExchange, UpstreamConnection, UpstreamPool
from proxy.errors import (
    BadRequest,
    ProxyError,
    TokenUnavailable,
    UpstreamUnreachable,
)
from proxy.ops.logs import log_access
from proxy.ops.metrics import UNMATCHED, Metrics

log = logging.getLogger("token_proxy.forward")

# Bodies up to this size are kept while sent, so a request can be replayed after a 401.
REPLAY_LIMIT = 64 * 1024
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
# CONNECT opens a tunnel; TRACE is sent without a token; neither fits the fast path.
_NOT_FAST = frozenset({"CONNECT", "TRACE"})


class _Retry(Exception):
    """The exchange should be sent again (stale keep-alive connection, or a 401)."""


class Forwarder:
    """Serves the forward-proxy port and every reverse-proxy port."""

    def __init__(
        self,
        holder: RuntimeHolder,
        pool: UpstreamPool,
        metrics: Metrics,
        tunnels: TunnelHandler,
    ) -> None:
        self._holder = holder
        self._planners = Planners(holder)
        self.pool = pool
        self._metrics = metrics
        self._tunnels = tunnels
        self._loop = asyncio.get_event_loop()
        self._background: set[asyncio.Task[None]] = set()
        # Per upstream, the last token and the header field made of it.
        self._credentials: dict[str, tuple[str, tuple[bytes, bytes]]] = {}

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
            return self.refuse(conn, head, body, error, error.upstream or UNMATCHED)
        return await self._serve(conn, head, body, plan)

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
        request_head, injected = self._request_head(head, plan, token)
        now = self._loop.time()
        exchange = FastExchange(self, conn, head, plan, upconn, token, injected, now)
        upconn.begin(exchange, request_head, now)
        return True

    def finish_slowly(
        self,
        conn: ClientConnection,
        head: RequestHead,
        plan: Plan,
        token: str | None,
        started: float,
        *,
        after_401: bool,
    ) -> None:
        """Carry a fast-path request on in the general path (after a 401, or a stale connection)."""
        task = self._loop.create_task(
            self._finish_slowly(conn, head, plan, token, started, after_401=after_401)
        )
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _finish_slowly(
        self,
        conn: ClientConnection,
        head: RequestHead,
        plan: Plan,
        token: str | None,
        started: float,
        *,
        after_401: bool,
    ) -> None:
        try:
            if after_401:
                keep_alive = await self._replay_with_new_token(
                    conn, head, None, plan, None, started
                )
            else:
                try:
                    keep_alive = await self._attempt(
                        conn, head, None, plan, token, None, started, fresh=True
                    )
                except ProxyError as error:
                    keep_alive = self.refuse(conn, head, None, error, plan.label, started=started)
        except Exception:
            log.exception("unexpected error finishing a request")
            conn.abort()
            keep_alive = False
        conn.fast_done(keep_alive)

    def write_interim(self, conn: ClientConnection, interim: ResponseHead) -> None:
        _write_interim(conn, interim)

    # -- the exchange --------------------------------------------------------------

    async def _serve(
        self, conn: ClientConnection, head: RequestHead, body: RequestBody | None, plan: Plan
    ) -> bool:
        started = self._loop.time()
        route = plan.route
        token: str | None = None
        try:
            if route is not None and head.method != "TRACE":
                # RFC 9110 §9.3.8: TRACE echoes the request, so it never carries a credential.
                token = route.held_token.current()
                if token is None:
                    token = await route.provider.get()
        except TokenUnavailable as error:
            self._metrics.token_unavailable.labels(upstream=plan.label).inc()
            return self.refuse(conn, head, body, error, plan.label, started=started)
        kept = _KeptBody() if head.method in IDEMPOTENT else None
        try:
            try:
                return await self._attempt(conn, head, body, plan, token, kept, started)
            except _Retry:
                # The idle keep-alive connection had been closed by the upstream before it
                # read anything: sending again on a fresh one is safe (RFC 9110 §9.2.2).
                return await self._attempt(conn, head, body, plan, token, kept, started, fresh=True)
        except (ProxyError, _Retry) as error:
            if isinstance(error, _Retry):
                error = UpstreamUnreachable(
                    "upstream closed the connection",
                    upstream=plan.route.name if plan.route is not None else None,
                )
            return self.refuse(conn, head, body, error, plan.label, started=started)

    async def _attempt(
        self,
        conn: ClientConnection,
        head: RequestHead,
        body: RequestBody | None,
        plan: Plan,
        token: str | None,
        kept: _KeptBody | None,
        started: float,
        *,
        fresh: bool = False,
        replay: bool = False,
    ) -> bool:
        route = plan.route
        upconn, reused = await self._connection(plan, fresh=fresh)
        exchange = AwaitedExchange(self._loop, head.method == "HEAD")
        if head.version == "1.1":
            exchange.interim_writer = partial(_write_interim, conn)
        request_head, injected = self._request_head(head, plan, token)
        upconn.begin(exchange, request_head, self._loop.time())
        body_task: asyncio.Task[None] | None = None
        if body is not None:
            source = kept if replay else body
            body_task = self._loop.create_task(self._send_body(upconn, head, source, kept))
            body_task.add_done_callback(partial(_abandon_on_body_error, exchange, upconn))
        try:
            response = await exchange.head
        except ProxyError:
            if body_task is not None:
                body_task.cancel()
            self.pool.discard(upconn)
            if reused and not exchange.received_any and body is None and head.method in IDEMPOTENT:
                raise _Retry() from None
            raise
        except asyncio.CancelledError:
            # The client went away (its connection cancels the handler): free the upstream.
            if body_task is not None:
                body_task.cancel()
            self.pool.discard(upconn)
            raise
        if response.status == 101 and not head.upgrade:
            # RFC 9110 §15.2.2: a server must not switch to a protocol the client did not
            # ask for; what follows on this connection is not HTTP any more.
            if body_task is not None:
                body_task.cancel()
            self.pool.discard(upconn)
            raise UpstreamUnreachable("the upstream switched protocols unasked")
        if response.status == 401 and injected and route is not None and token is not None:
            # The upstream refused the token we sent: drop it (the provider does this once
            # per token however many requests see the 401) and fetch another.
            if not replay:
                route.provider.invalidate(token)
            # The provider keeps a token it was told about moments ago (an upstream that
            # refuses every token must not turn requests into token fetches): no replay then.
            replayable = (
                not replay
                and kept is not None
                and route.provider.current() != token
                and await _sent_whole(body_task, kept)
            )
        else:
            replayable = False
        if replayable:
            if body_task is not None:
                body_task.cancel()
            self.pool.discard(upconn)
            return await self._replay_with_new_token(conn, head, body, plan, kept, started)
        self.record(conn, head, plan.label, response.status, started, response)
        if response.status == 101 and head.upgrade:
            return self._upgrade(conn, upconn, exchange, response, body_task)
        return await self._relay(conn, head, body, upconn, exchange, response, body_task)

    async def _replay_with_new_token(
        self,
        conn: ClientConnection,
        head: RequestHead,
        body: RequestBody | None,
        plan: Plan,
        kept: _KeptBody | None,
        started: float,
    ) -> bool:
        """Send the request again with a new token, after a 401 to the old one."""
        route = plan.route
        assert route is not None
        self._metrics.upstream_unauthorized_retries.labels(upstream=route.name).inc()
        log.info(
            "upstream answered 401; retrying once with a new token",
            extra={"event": "unauthorized_retry", "upstream": route.name},
        )
        try:
            token = await route.provider.get()
        except TokenUnavailable as error:
            self._metrics.token_unavailable.labels(upstream=route.name).inc()
            return self.refuse(conn, head, body, error, plan.label, started=started)
        return await self._attempt(conn, head, body, plan, token, kept, started, replay=True)

    async def _connection(self, plan: Plan, *, fresh: bool) -> tuple[UpstreamConnection, bool]:
        conn = None if fresh else self.pool.take_idle(plan.origin)
        if conn is not None:
            return conn, True
        if plan.route is not None:
            config = plan.route.config
            connect_timeout, timeout = config.connect_timeout, config.timeout
        else:
            connect_timeout, timeout = 5.0, 60.0
        conn = await self.pool.connect(
            plan.origin, connect_timeout=connect_timeout, read_timeout=timeout
        )
        return conn, False

    def _request_head(self, head: RequestHead, plan: Plan, token: str | None) -> tuple[bytes, bool]:
        """The head to send upstream, and whether our token is in it."""
        route = plan.route
        credential = None
        overwrite = True
        if token is not None and route is not None:
            cached = self._credentials.get(route.name)
            if cached is None or cached[0] != token:
                cached = (token, (route.header_name, b"Bearer " + token.encode("ascii")))
                self._credentials[route.name] = cached
            credential = cached[1]
            overwrite = route.config.overwrite
        headers, injected = forward_headers(
            head.headers, credential=credential, overwrite=overwrite
        )
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
        return request_head_bytes(head.method, plan.path, plan.host, headers, framing), injected

    async def _send_body(
        self,
        upconn: UpstreamConnection,
        head: RequestHead,
        source: RequestBody | _KeptBody | None,
        kept: _KeptBody | None,
    ) -> None:
        """Stream the request body upstream (from the client, or from `kept` on a replay)."""
        chunked = head.chunked
        if isinstance(source, _KeptBody):
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
        conn: ClientConnection,
        head: RequestHead,
        body: RequestBody | None,
        upconn: UpstreamConnection,
        exchange: AwaitedExchange,
        response: ResponseHead,
        body_task: asyncio.Task[None] | None,
    ) -> bool:
        # After an early answer (the upstream did not read the whole request body), what
        # is left of that body cannot be told apart from a next request: close.
        keep_alive = head.keep_alive and not conn.listener.draining and (body is None or body.done)
        response_head, has_body, rechunk, keep_alive = frame_response(
            head, response, keep_alive=keep_alive
        )
        if not has_body:
            conn.write(response_head)
        else:
            # The head and whatever body came with it leave in one write.
            first = exchange.take_buffered()
            if first and rechunk:
                first = chunk(first)
            conn.write(response_head + first)
            try:
                await self._stream_response(conn, upconn, exchange, rechunk)
            except (ProxyError, ConnectionError):
                # Too late for an error response: the client sees a cut-short body.
                if body_task is not None:
                    body_task.cancel()
                self.pool.discard(upconn)
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
        conn: ClientConnection,
        upconn: UpstreamConnection,
        exchange: AwaitedExchange,
        rechunk: bool,
    ) -> None:
        write = conn.write

        def sink(data: bytes) -> None:
            if conn.closed:
                upconn.abort()  # the client went away: stop the download
                return
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
    ) -> bool:
        if body_task is not None:
            body_task.cancel()
        fields = response.fields
        if response.upgrade_to is not None:
            fields += b"\r\nUpgrade: " + response.upgrade_to
        conn.write(response_head_bytes(101, response.reason, fields, b"Connection: Upgrade\r\n"))
        upstream_tail = exchange.upgrade_tail
        transport = upconn.detach()
        splice(
            conn, transport, upstream_tail, idle_timeout=conn.listener.limits.tunnel_idle_timeout
        )
        return False

    def record(
        self,
        conn: ClientConnection,
        head: RequestHead,
        label: str,
        status: int,
        started: float | None,
        response: ResponseHead | None,
    ) -> None:
        """Count the answer in the metrics, and log it when the access log is on."""
        elapsed = self._loop.time() - started if started is not None else 0.0
        self._metrics.observe_request(label, status, elapsed)
        if self._holder.current.access_log:
            log_access(
                upstream=label,
                method=head.method,
                host=_host_of(head),
                path=head.target.decode("latin-1"),
                status=status,
                duration_s=elapsed,
                bytes_out=(response.content_length or 0) if response is not None else 0,
                client=conn.peer,
            )

    # -- answers of our own ------------------------------------------------------

    def refuse(
        self,
        conn: ClientConnection,
        head: RequestHead,
        body: RequestBody | None,
        error: ProxyError,
        label: str,
        *,
        started: float | None = None,
    ) -> bool:
        """Answer `error` ourselves. The connection stays open only if the body was consumed."""
        keep_alive = head.keep_alive and (body is None or body.done) and not head.upgrade
        keep_alive = keep_alive and not conn.listener.draining and error.status not in (400, 413)
        if error.upstream is None and label != UNMATCHED:
            error.upstream = label
        conn.send_error(error, keep_alive=keep_alive, head_only=head.method == "HEAD")
        self.record(conn, head, label, error.status, started, None)
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
        return keep_alive


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


def _write_interim(conn: ClientConnection, interim: ResponseHead) -> None:
    """Relay a 1xx response (100 Continue, 103 Early Hints) to an HTTP/1.1 client."""
    conn.write(response_head_bytes(interim.status, interim.reason, interim.fields, b""))


def _host_of(head: RequestHead) -> str:
    return head.hosts[0].decode("latin-1") if head.hosts else "-"


class _KeptBody:
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


async def _sent_whole(body_task: asyncio.Task[None] | None, kept: _KeptBody) -> bool:
    """Whether the request body was sent whole and kept, so that it can be replayed."""
    if body_task is None:
        return True
    if not body_task.done():
        # The 401 came before the body was sent; a small body still arrives quickly.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(body_task), timeout=1.0)
    if not body_task.done() or body_task.cancelled() or body_task.exception() is not None:
        return False
    return not kept.overflow
