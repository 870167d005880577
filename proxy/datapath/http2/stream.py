"""One HTTP/2 stream from the application, relayed to its upstream as one request.

A `StreamRelay` makes of a stream's header list the `RequestHead` that planning reads
(`:method`, `:path`, and `:authority` as the Host), plans it with the port's planner,
takes the route's token as the HTTP/1.1 path does (the held one, else a wait for one,
503 `token_unavailable` if none comes), puts it in through `with_credential`, and
relays the exchange over an `UpstreamStream`:

* the request body upstream as the client sends it, each DATA frame acknowledged to the
  client (`acknowledge_received_data`) only once it was handed upstream, so the client
  can never have more in flight than its stream window;
* the response body back as the client's flow-control window lets it, read from the
  upstream only when it can go on (reading acknowledges the upstream's window);
* trailers both ways, and RST_STREAM both ways (the client's reset cancels the relay,
  which resets the upstream stream with the client's code; the upstream's reset is
  passed to the client with its code).

The answer's head is asked about in `proxy.datapath.decisions`, as on HTTP/1.1: a 401
to our token (or a DPoP nonce challenge) sends the request again on a new stream, once,
when its method allows it and its body ended within `replay.REPLAY_LIMIT` (kept
meanwhile, with its trailers).

Errors before the response head went out are answered by the proxy (`proxy.errors`'s
JSON body, or a gRPC trailers-only answer); after that, a reset is the only signal
left. An answer is counted and logged through `Outcomes`, as on the HTTP/1.1 path;
a gRPC status is counted too (`token_proxy_grpc_responses_total`), and an
UNAUTHENTICATED one drops the token it refused, like a 401 (no replay: gRPC calls are
POSTs).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import TYPE_CHECKING, Final

from proxy.datapath.context import RequestContext
from proxy.datapath.decisions import (
    IDEMPOTENT,
    REPLAY_WITH_NEW_TOKEN,
    REPLAY_WITH_NONCE,
    on_response_head,
)
from proxy.datapath.http2 import grpc
from proxy.datapath.injector import DPOP_TOKEN, NO_CREDENTIAL, may_carry_credential
from proxy.datapath.messages import Headers, RequestHead, ResponseHead
from proxy.datapath.replay import KeptBody, note_nonce_replay, sent_whole, take_new_token
from proxy.datapath.runtime import Route, upstream_timeouts
from proxy.errors import (
    BadRequest,
    HeadersTooLarge,
    ProxyError,
    RequestTooLarge,
    TokenUnavailable,
    error_body,
)
from proxy.ops.metrics import UNMATCHED

if TYPE_CHECKING:
    from proxy.datapath.http2.server import Http2ServerConnection
    from proxy.datapath.http2.upstream import UpstreamStream

log = logging.getLogger("token_proxy.forward")

# RFC 9113 §8.2.2: connection-specific fields, never forwarded (h2 refuses most of them
# on the way in already), and the proxy's own credentials (RFC 9110 §11.7.1).
CONNECTION_SPECIFIC: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"upgrade",
        b"http2-settings",
        b"proxy-authorization",
        b"proxy-authenticate",
    }
)
_TE: Final = b"te"
_TRAILERS: Final = b"trailers"
_HOST: Final = b"host"
_CONTENT_TYPE: Final = b"content-type"
_CONTENT_LENGTH: Final = b"content-length"
_NOT_ON_THE_BRIDGE: Final = frozenset({_TE, b"trailer"})
_VIA: Final = (b"via", b"2 token-proxy")  # RFC 9110 §7.6.3: received as HTTP/2
# RST_STREAM codes (RFC 9113 §7).
NO_ERROR: Final = 0x0
INTERNAL_ERROR: Final = 0x2
CANCEL: Final = 0x8
# The head of a request refused before its header list could be read.
_UNREADABLE: Final = RequestHead("-", b"-", "2", [], True)


def _too_large(limit: int, route: Route | None) -> RequestTooLarge:
    upstream = route.name if route is not None else None
    return RequestTooLarge(f"request body larger than {limit} bytes", upstream=upstream)


class StreamGone(Exception):
    """The client's stream is closed or reset, or its connection is gone."""


class _RequestEnd:
    """The end of a request body, with the client's trailers if it sent any."""

    __slots__ = ("trailers",)

    def __init__(self, trailers: Headers | None) -> None:
        self.trailers = trailers


def with_credential(
    route: Route,
    headers: Headers,
    token: str,
    method: str,
    scheme: str,
    authority: bytes,
    path: bytes,
) -> tuple[Headers, int]:
    """The request's fields with `route`'s credential for `token` set once, for HTTP/2
    (field names in lower case, RFC 9113 §8.2.1), and what went in (the injector's
    `NO_CREDENTIAL`, `BEARER_TOKEN` or `DPOP_TOKEN`).

    The one place an HTTP/2 request gets its credential. `method`, `scheme`,
    `authority` and `path` are the request as the upstream receives it.
    """
    injected, what = route.injector.inject(headers, token, method, scheme, authority, path)
    return [(name.lower(), value) for name, value in injected], what


def request_head(fields: Headers) -> RequestHead:
    """The `RequestHead` planning reads, made of a stream's header list.

    `:authority` is the Host (or the `host` field when it is absent, RFC 9113 §8.3.1);
    connection-specific fields are left out, and `te` unless it is `trailers`.
    """
    method = path = authority = b""
    hosts: list[bytes] = []
    headers: Headers = []
    connection_named: set[bytes] = set()
    content_length: int | None = None
    for name, value in fields:
        if name[:1] == b":":
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
            elif name == b":authority":
                authority = value
            continue
        if name == _HOST:
            hosts.append(value)
            continue
        if name in CONNECTION_SPECIFIC:
            if name == b"connection":
                connection_named.update(token.strip().lower() for token in value.split(b","))
            continue
        if name == _TE and value.strip().lower() != _TRAILERS:
            continue
        if name == _CONTENT_LENGTH and value.isdigit():
            content_length = int(value)
        headers.append((name, value))
    if connection_named:
        headers = [field for field in headers if field[0] not in connection_named]
    if method == b"CONNECT":
        raise BadRequest("CONNECT over HTTP/2 is not supported by this proxy")
    try:
        method_name = method.decode("ascii")
    except UnicodeDecodeError:
        raise BadRequest("the method is not ASCII") from None
    if authority:
        hosts = [authority]
    return RequestHead(
        method_name,
        path,
        "2",
        headers,
        True,
        content_length=content_length,
        hosts=tuple(hosts),
    )


def response_fields(status: int, fields: Headers, via: bool) -> Headers:
    """The response head for the client: the upstream's fields without its pseudo and
    connection-specific ones, `:status` first."""
    head: Headers = [(b":status", b"%d" % status)]
    head += [
        (name, value)
        for name, value in fields
        if name[:1] != b":" and name not in CONNECTION_SPECIFIC and name != _TE
    ]
    if via:
        head.append(_VIA)
    return head


def response_head(status: int, fields: Headers) -> ResponseHead:
    """The `ResponseHead` of an HTTP/2 answer, for what reads one (`decisions`, and the
    HTTP/1.1 head `frame_response` makes of it): the fields as field lines, without
    pseudo, connection-specific and `content-length` fields, whose value is read, and
    without `trailer`: the bridge passes no trailers on, so it announces none."""
    content_length: int | None = None
    lines: list[bytes] = []
    for name, value in fields:
        if name == _CONTENT_LENGTH:
            if value.isdigit():
                content_length = int(value)  # h2 checks it against the DATA received
            continue
        if name[:1] == b":" or name in CONNECTION_SPECIFIC or name in _NOT_ON_THE_BRIDGE:
            continue
        lines.append(b"\r\n%b: %b" % (name, value))
    return ResponseHead(status, b"", "2", b"".join(lines), True, content_length=content_length)


class StreamRelay:
    """One client stream: its request, its upstream stream and its answer."""

    def __init__(self, conn: Http2ServerConnection, stream_id: int, fields: Headers) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self._fields = fields
        self._loop = asyncio.get_running_loop()
        self.grpc = grpc.is_grpc(next((v for n, v in fields if n == _CONTENT_TYPE), None))
        # What the client sent and the upload has not taken yet: (data, flow-controlled
        # length) pairs, then a `_RequestEnd`.
        self._inbound: deque[tuple[bytes, int] | _RequestEnd] = deque()
        self._sending = 0  # the flow-controlled length of the piece being sent upstream
        self._released = False  # what was left unsent has been given back (take_unsent)
        self._inbound_waiter: asyncio.Future[None] | None = None
        self.ended_by_client = False  # the request has ended (END_STREAM seen)
        self.reset_code: int | None = None  # set when the client reset the stream
        self.head_sent = False
        self.task: asyncio.Task[None] | None = None
        self._ctx: RequestContext | None = None
        self._upstream: UpstreamStream | None = None
        self._finished = False  # the upstream stream ended, or was never opened
        self._kept_trailers: Headers | None = None  # the request's, for a replay
        self._received = 0  # body bytes the client sent
        # Set once the body passed `limits.max_body_size`: what the stream is answered.
        self._too_large: RequestTooLarge | None = None

    # -- from the connection (h2 events) -------------------------------------------------

    def start(self) -> None:
        self.task = self._loop.create_task(self._run())

    def data_received(self, data: bytes, flow_controlled: int) -> None:
        if self._too_large is not None:
            # Dropped; its window is given back when the stream ends (`take_unsent`).
            self._inbound.append((b"", flow_controlled))
            return
        limit = self.conn.max_body_size
        self._received += len(data)
        if limit is not None and self._received > limit:
            # Nothing past the limit goes upstream: the upload resets the upstream's
            # stream (it never gets a whole request), and the client is answered 413.
            ctx = self._ctx
            route = ctx.plan.route if ctx is not None and ctx.plan is not None else None
            self._too_large = _too_large(limit, route)
            self._inbound.append((b"", flow_controlled))
            self._wake_upload()
            return
        self._inbound.append((data, flow_controlled))
        self._wake_upload()

    def request_ended(self, trailers: Headers | None = None) -> None:
        if not self.ended_by_client:
            self.ended_by_client = True
            self._inbound.append(_RequestEnd(trailers))
            self._wake_upload()

    def client_reset(self, error_code: int) -> None:
        """The client reset the stream (or its connection went): stop, reset upstream."""
        if self.reset_code is None:
            self.reset_code = error_code
        upstream = self._upstream
        if upstream is not None:
            upstream.reset(error_code)
        if self.task is not None and not self.task.done():
            self.task.cancel()

    def take_unsent(self) -> int:
        """The flow-controlled length of what was received and will not be sent
        upstream now (the stream is over): the connection acknowledges it instead."""
        if self._released:
            return 0
        self._released = True
        unsent = self._sending + sum(item[1] for item in self._inbound if isinstance(item, tuple))
        self._inbound.clear()
        return unsent

    def _wake_upload(self) -> None:
        waiter = self._inbound_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- the exchange ------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            await self._serve()
        except asyncio.CancelledError:
            pass  # the client reset the stream, or its connection went
        except StreamGone:
            pass
        except Exception:
            log.exception("unexpected error relaying an HTTP/2 stream")
            if not self.head_sent:
                self.conn.reset_stream(self.stream_id, INTERNAL_ERROR)
        finally:
            upstream = self._upstream
            if upstream is not None and self.reset_code is None and not self._finished:
                upstream.reset(CANCEL)
            ctx = self._ctx
            if ctx is not None:
                self.conn.front.outcomes.finish(ctx)
            self.conn.stream_done(self)

    async def _serve(self) -> None:
        conn = self.conn
        front = conn.front
        started = self._loop.time()
        try:
            if sum(name[:1] != b":" for name, _ in self._fields) > conn.max_headers:
                raise HeadersTooLarge("too many request headers")
            head = request_head(self._fields)
        except ProxyError as error:
            self._ctx = RequestContext(conn.handle, _UNREADABLE, None, None, 0.0)
            await self._refuse(error)
            return
        limit = conn.max_body_size
        declared = head.content_length
        try:
            plan = conn.planner(head)
            if limit is not None and declared is not None and declared > limit:
                # Refused before anything goes upstream (RFC 9110 §15.5.14), as on HTTP/1.1.
                raise _too_large(limit, plan.route)
        except ProxyError as error:
            self._ctx = RequestContext(conn.handle, head, None, None, 0.0)
            self._ctx.label = error.upstream or UNMATCHED
            await self._refuse(error)
            return
        ctx = self._ctx = RequestContext(conn.handle, head, None, plan, started)
        route = plan.route
        token: str | None = None
        if route is not None and may_carry_credential(head.method):
            token = route.held_token.current()
            if token is None:
                try:
                    token = await route.provider.get()
                except TokenUnavailable as error:
                    front.metrics.token_unavailable.labels(upstream=ctx.label).inc()
                    await self._refuse(error)
                    return
        ctx.token = token
        if self._too_large is not None:  # while the token was awaited
            await self._refuse(self._too_large)
            return
        origin = plan.origin
        connect_timeout, timeout = upstream_timeouts(route)
        # The request ended with its head: no body, no trailers.
        inbound = self._inbound
        whole = (
            len(inbound) == 1
            and isinstance(inbound[0], _RequestEnd)
            and inbound[0].trailers is None
        )
        # A body is kept while small enough, for a replay after a 401 (as on HTTP/1.1).
        kept = KeptBody() if head.method in IDEMPOTENT and not whole else None
        upload: asyncio.Task[None] | None = None
        try:
            while True:
                upload = None
                upstream = self._upstream = await front.upstreams.open_stream(
                    origin,
                    self._request_fields(ctx),
                    end_stream=whole,
                    connect_timeout=connect_timeout,
                    read_timeout=timeout,
                )
                if whole:
                    self._inbound.clear()
                elif ctx.replayed:
                    assert kept is not None
                    upload = self._loop.create_task(self._upload_kept(upstream, kept))
                else:
                    upload = self._loop.create_task(self._upload(upstream, kept))
                status, fields = await upstream.response_head()
                how = on_response_head(ctx, response_head(status, fields))
                if how not in (REPLAY_WITH_NEW_TOKEN, REPLAY_WITH_NONCE) or not await sent_whole(
                    upload, kept
                ):
                    break
                upstream.reset(CANCEL)
                if how == REPLAY_WITH_NEW_TOKEN:
                    await take_new_token(ctx, front.metrics)
                else:
                    note_nonce_replay(ctx, front.metrics)
        except ProxyError as raised:
            if upload is not None:
                upload.cancel()
            self._finished = True
            # A body grown too large: the upload reset the upstream's stream for it.
            failure = self._too_large or raised
            if isinstance(failure, TokenUnavailable):
                front.metrics.token_unavailable.labels(upstream=ctx.label).inc()
            reset_code = self._upstream.reset_code if self._upstream is not None else None
            if reset_code is None:
                await self._refuse(failure)
                return
            # The upstream reset the stream before answering: so is the client's.
            front.outcomes.record(ctx, failure.status, None)
            self.head_sent = True
            conn.reset_stream(self.stream_id, reset_code)
            return
        try:
            await self._relay_response(ctx, upstream, status, fields)
        finally:
            if upload is not None and not upload.done():
                upload.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await upload

    def _request_fields(self, ctx: RequestContext) -> Headers:
        """The header list sent upstream, with the credential for `ctx.token`."""
        head = ctx.head
        plan = ctx.plan
        assert plan is not None
        route = plan.route
        token = ctx.token
        origin = plan.origin
        headers = head.headers
        if plan.via:
            headers = [*headers, _VIA]
        if token is not None and route is not None:
            headers, what = with_credential(
                route, headers, token, head.method, origin.scheme, plan.host, plan.path
            )
            ctx.injected = what != NO_CREDENTIAL
            ctx.proof_sent = what == DPOP_TOKEN
        pseudo: Headers = [
            (b":method", head.method.encode("ascii")),
            (b":scheme", origin.scheme.encode("ascii")),
            (b":authority", plan.host),
            (b":path", plan.path),
        ]
        return pseudo + headers

    async def _upload_kept(self, upstream: UpstreamStream, kept: KeptBody) -> None:
        """The request body again, from what was kept of it, with its trailers."""
        try:
            for piece in kept.chunks:
                await upstream.send_data(piece)
            await upstream.end(self._kept_trailers)
        except ProxyError:
            upstream.reset(CANCEL)

    async def _upload(self, upstream: UpstreamStream, kept: KeptBody | None) -> None:
        """The request body and trailers, upstream, acknowledging each piece to the client
        once handed on (and adding it to `kept`, if given)."""
        conn = self.conn
        inbound = self._inbound
        try:
            while True:
                if not inbound:
                    self._inbound_waiter = self._loop.create_future()
                    try:
                        await self._inbound_waiter
                    finally:
                        self._inbound_waiter = None
                    continue
                if self._too_large is not None:
                    raise self._too_large
                item = inbound.popleft()
                if isinstance(item, _RequestEnd):
                    self._kept_trailers = item.trailers
                    await upstream.end(item.trailers)
                    return
                data, flow_controlled = item
                self._sending = flow_controlled
                if kept is not None:
                    kept.add(data)
                if data:
                    await upstream.send_data(data)
                self._sending = 0
                if not self._released:
                    conn.acknowledge(self.stream_id, flow_controlled)
        except ProxyError:
            if kept is not None:
                kept.overflow = True  # not all of the body went: nothing to replay
            upstream.reset(CANCEL)  # the response will say what went wrong

    async def _relay_response(
        self, ctx: RequestContext, upstream: UpstreamStream, status: int, fields: Headers
    ) -> None:
        conn = self.conn
        front = conn.front
        front.outcomes.record(ctx, status, None)
        plan = ctx.plan
        head = response_fields(status, fields, plan is not None and plan.via)
        head_status = grpc.status_in(fields)
        if head_status is not None:
            # Trailers-only (gRPC): the head is the whole answer (and the upstream
            # stream is let go of as the relay ends).
            self._grpc_outcome(ctx, head_status)
            self.head_sent = True
            conn.send_headers(self.stream_id, head, end_stream=True)
            return
        conn.send_headers(self.stream_id, head, end_stream=False)
        self.head_sent = True
        try:
            while (data := await upstream.read()) is not None:
                ctx.bytes_out += len(data)
                await conn.send_data(self.stream_id, data)
        except ProxyError:
            self._finished = True
            too_large = self._too_large
            if too_large is not None and self.grpc:
                # The upload stopped the call: gRPC still reads a status from trailers.
                upstream.reset(CANCEL)
                self._grpc_outcome(ctx, grpc.status_for(too_large))
                conn.send_headers(self.stream_id, grpc.trailers(too_large), end_stream=True)
                return
            # Too late for an answer: the client's stream is reset, with the upstream's
            # code if the upstream reset its stream.
            reset_code = upstream.reset_code
            if reset_code is None:
                upstream.reset(CANCEL)
                reset_code = INTERNAL_ERROR
            conn.reset_stream(self.stream_id, reset_code)
            return
        self._finished = True
        trailers = upstream.trailers
        if trailers:
            trailer_status = grpc.status_in(trailers)
            if trailer_status is not None:
                self._grpc_outcome(ctx, trailer_status)
            conn.send_headers(
                self.stream_id,
                [(n, v) for n, v in trailers if n[:1] != b":" and n not in CONNECTION_SPECIFIC],
                end_stream=True,
            )
        else:
            conn.end_stream(self.stream_id)

    def _grpc_outcome(self, ctx: RequestContext, status: int) -> None:
        label = str(status) if 0 <= status <= grpc.UNAUTHENTICATED else "other"
        self.conn.front.metrics.grpc_responses.labels(upstream=ctx.label, grpc_status=label).inc()
        if status != grpc.UNAUTHENTICATED or not ctx.injected:
            return
        plan = ctx.plan
        route = plan.route if plan is not None else None
        if route is not None and ctx.token is not None:
            # Like a 401: the upstream refused the token; the call itself is not replayed.
            route.provider.invalidate(ctx.token)

    async def _refuse(self, error: ProxyError) -> None:
        """Answer `error` ourselves: the contract's JSON body, or a gRPC trailers-only
        answer; counted and logged as the HTTP/1.1 path does. A client still sending its
        request is then told to stop (RST_STREAM NO_ERROR, RFC 9113 §8.1): nothing more
        of it will be read."""
        ctx = self._ctx
        assert ctx is not None
        self._finished = True
        self.head_sent = True
        self.conn.front.outcomes.refused(ctx, error)
        await self._answer_error(ctx, error)
        if not self.ended_by_client:
            self.conn.reset_stream(self.stream_id, NO_ERROR)

    async def _answer_error(self, ctx: RequestContext, error: ProxyError) -> None:
        if self.grpc:
            self.conn.send_headers(self.stream_id, grpc.trailers_only(error), end_stream=True)
            self._grpc_outcome(ctx, grpc.status_for(error))
            return
        body = error_body(error)
        head: Headers = [
            (b":status", b"%d" % error.status),
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(body)),
            (b"cache-control", b"no-store"),
        ]
        head += [
            (name.lower().encode("latin-1"), value.encode("latin-1"))
            for name, value in error.extra_headers()
        ]
        head_only = ctx.head.method == "HEAD"
        self.conn.send_headers(self.stream_id, head, end_stream=head_only)
        if not head_only:
            await self.conn.send_data(self.stream_id, body, end_stream=True)
