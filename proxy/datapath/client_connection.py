"""One client connection on a proxy port: parsing requests and pacing their bodies.

`ClientConnection` is an `asyncio.Protocol` driving httptools' llhttp parser. It turns
bytes into `RequestHead`s and `RequestBody` streams, hands each request in order to a
`RequestHandler` (forward or reverse mode), and exposes the transport with flow control
to whoever answers. Requests on one connection are answered strictly in order
(pipelining is parsed, not processed concurrently). Once a handler takes the connection
over (CONNECT, WebSocket) parsing stops and bytes go to the `RawSink` it installs.

Limits (request line, header size and count, body size) are enforced while parsing;
header and idle timeouts are enforced by the `Listener`'s sweeper reading the
deadlines kept here, so the hot path sets a float instead of arming a timer.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Protocol

import httptools

from proxy.config import LimitsConfig
from proxy.datapath.flow_control import FlowControlledProtocol
from proxy.datapath.message_bounds import MessageBounds
from proxy.datapath.messages import HeadFields, RequestHead
from proxy.datapath.request_body import RequestBody
from proxy.datapath.states import (
    AWAITING_REQUEST,
    HEAD_COMPLETE,
    IN_BODY,
    IN_HEAD,
    MESSAGE_BEGIN,
    MESSAGE_COMPLETE,
    STOP_PARSING,
    STOPPED,
    TAKE_OVER,
    TAKEN_OVER,
    TRAILER_FIELD,
    client_next,
)
from proxy.errors import (
    BadRequest,
    HeadersTooLarge,
    ProxyError,
    RequestTooLarge,
    TransferCodingNotImplemented,
    UriTooLong,
    VersionNotSupported,
    error_response,
)
from proxy.ops.throttled_log import ThrottledLog

log = logging.getLogger("token_proxy.connection")
_refusals = ThrottledLog(log)

# llhttp's error for `PRI * HTTP/2.0`, the start of the HTTP/2 connection preface.
_H2_PREFACE_ERROR = "PRI/Upgrade"
_H2_DEBUG = b"HTTP/2 is not supported on this port; use HTTP/1.1"
# An empty SETTINGS frame (the server preface), then GOAWAY: last stream 0, error
# HTTP_1_1_REQUIRED (0xd), and the reason as debug data (RFC 9113 §6.5, §6.8, §7).
_HTTP2_NOT_SUPPORTED = (
    b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    + (8 + len(_H2_DEBUG)).to_bytes(3, "big")
    + b"\x07\x00\x00\x00\x00\x00"
    + b"\x00\x00\x00\x00\x00\x00\x00\x0d"
    + _H2_DEBUG
)


class PriorKnowledge(Protocol):
    """Serves a connection that began with the HTTP/2 preface (h2c with prior knowledge:
    `proxy.datapath.http2.front`); False leaves it to be refused."""

    def __call__(self, conn: ClientConnection, early: bytes | None) -> bool: ...


class ConnectionOwner(Protocol):
    """The port a client connection belongs to (`proxy.datapath.listener.Listener`)."""

    name: str
    limits: LimitsConfig
    draining: bool  # shutting down: no keep-alive after the answer in flight
    prior_knowledge: PriorKnowledge | None  # set on ports that serve h2c

    def connection_opened(self, conn: ClientConnection) -> None: ...

    def connection_closed(self, conn: ClientConnection) -> None: ...


class RawSink(Protocol):
    """Receives a taken-over connection's bytes (a tunnel or an upgraded connection)."""

    def data_from_client(self, data: bytes) -> None: ...

    def client_eof(self) -> None: ...

    def client_lost(self) -> None: ...


class RequestHandler(Protocol):
    """Answers requests: `__call__` for any request, `fast` for those it can do in callbacks.

    `__call__` returns whether the connection may serve another request. `fast` either
    takes the request (True) and later calls `ClientConnection.fast_done`, or declines
    (False) and the request goes to `__call__`.
    """

    def __call__(
        self, conn: ClientConnection, head: RequestHead, body: RequestBody | None
    ) -> Awaitable[bool]: ...

    def fast(self, conn: ClientConnection, head: RequestHead) -> bool: ...


class ClientConnection(FlowControlledProtocol):
    """A client's connection to one of the proxy's ports."""

    def __init__(
        self, listener: ConnectionOwner, handler: RequestHandler, limits: LimitsConfig
    ) -> None:
        super().__init__()
        self.listener = listener
        self._handler = handler
        # The limits are read for every request and field: kept as native attributes of
        # this (compiled) class rather than read through the config object each time.
        self._max_request_line = limits.max_request_line
        # Room for the method, the target and the version: all of a request line that
        # _http_version reads (a target longer than the limit is refused anyway).
        self._request_line_room = limits.max_request_line + 64
        # Reads larger than the most a head may hold are parsed in pieces of that size.
        self._read_slice = limits.max_request_line + limits.max_header_size
        self._max_header_size = limits.max_header_size
        self._max_headers = limits.max_headers
        self._max_body_size = limits.max_body_size
        self._header_timeout = limits.header_timeout
        self._idle_timeout = limits.idle_timeout
        self._loop = asyncio.get_running_loop()
        self.peer: str = "-"
        self._over_tls = False  # decrypted from an intercepted TLS session
        self._parser = httptools.HttpRequestParser(self)
        self._queue: deque[tuple[RequestHead, RequestBody | None] | ProxyError] = deque()
        self._wakeup: asyncio.Future[None] | None = None
        self._worker: asyncio.Task[None] | None = None
        # Parsing state of the request being read.
        self._url = b""
        self._method = ""  # once the head is read, for an error answer to a HEAD request
        self._fields = HeadFields()
        # Where the request stream is (`proxy.datapath.states`): moved by `_move` only.
        self.state = AWAITING_REQUEST
        self._unfinished_head = 0
        # The chunk being parsed, while it starts where a message does; then, for the
        # message that began there, that chunk (see _http_version).
        self._chunk_at_message_start: bytes | None = None
        self._message_start_chunk: bytes | None = None
        # Where the request under way lies in the read, for its chunk sizes.
        self._bounds = MessageBounds()
        self._body: RequestBody | None = None
        self._parsing_error: ProxyError | None = None
        self._raw_sink: RawSink | None = None
        self._taken_over_tail = b""
        self.on_resume_writing: Callable[[], None] | None = None
        # Deadlines (loop time) read by the listener's sweeper; 0 means none.
        self.header_deadline = 0.0
        self.idle_deadline = 0.0
        # When the client stopped reading what we send (0: it has not).
        self.write_paused_at = 0.0
        self.busy = False

    # -- asyncio.Protocol -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._over_tls = transport.get_extra_info("sslcontext") is not None
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.peer = f"{peer[0]}:{peer[1]}"
        self.idle_deadline = self._loop.time() + self._header_timeout
        self.listener.connection_opened(self)

    def _move(self, event: int) -> None:
        self.state = client_next(self.state, event)

    def data_received(self, data: bytes) -> None:
        state = self.state
        size = self._read_slice
        if len(data) > size and state < STOPPED:
            # A head is measured from the read after the one it began in (below): a read
            # holding a whole oversized head would not be. Fed in slices, a head that does
            # not end in its first slice is measured from the second.
            for start in range(0, len(data), size):
                self.data_received(data[start : start + size])
            return
        if state >= STOPPED:
            sink = self._raw_sink
            if sink is not None:
                sink.data_from_client(data)
            else:
                # Bytes after an upgrade request while its handler decides: keep them.
                self._taken_over_tail += data
            return
        in_head = state == IN_HEAD
        bounds = self._bounds
        if state == AWAITING_REQUEST:
            bounds.read = data
            self._chunk_at_message_start = data
        else:
            self._chunk_at_message_start = None
            try:
                bounds.read_continues(data, in_head, self._body)
            except ProxyError as error:
                self._parse_failed(error)
                return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            bounds.read = b""
            self._taken_over_tail = data[upgrade.args[0] :]
            self._move(STOP_PARSING)
            self.pause_reading()
            return
        except httptools.HttpParserError as exc:
            bounds.read = b""
            if _H2_PREFACE_ERROR in str(exc) and not self.busy and not self._queue:
                self._refuse_http2()
                return
            self._parse_failed(self._parsing_error or BadRequest(_parser_message(exc)))
            return
        bounds.read = b""  # only the callbacks of this read look at it: not kept
        if self.state == IN_HEAD:
            if not self.header_deadline:
                # A head began in these bytes and did not end in them (most heads do:
                # the clock is only read for the others).
                self.header_deadline = self._loop.time() + self._header_timeout
            if in_head:
                # httptools keeps a header field to itself until the next one starts, so
                # on_header never sees a field that does not end: bound an unfinished head
                # by the bytes that arrived while it was unfinished (RFC 9110 §5.4: 4xx).
                self._unfinished_head += len(data)
                if self._unfinished_head > self._max_request_line + self._max_header_size:
                    self._parse_failed(HeadersTooLarge("request headers too large"))
                    return
            bounds.head_unfinished(data, in_head)

    def eof_received(self) -> bool | None:
        # True keeps our write side open after the client's half-close. A TLS transport
        # cannot half-close: it closes whatever we answer, and warns if we say True.
        keep_open = None if self._over_tls else True
        sink = self._raw_sink
        if sink is not None:
            sink.client_eof()
            return keep_open  # half-close passed on (tunnels, WebSockets)
        if self._body is not None and not self._body.done:
            self._body.fail(ConnectionResetError("client closed the connection mid-body"))
        if not self.busy and not self._queue:
            return False
        # Answer what was asked before the client's half-close, then close.
        self._move(STOP_PARSING)
        return keep_open

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.listener.connection_closed(self)
        if self._raw_sink is not None:
            self._raw_sink.client_lost()
        if self._body is not None:
            self._body.fail(ConnectionResetError("client connection lost"))
        if self.busy and self.state != TAKEN_OVER and self._worker is not None:
            # Nobody is left to answer: stop waiting on (or streaming from) the upstream,
            # so that its connection is freed now rather than at its timeout.
            self._worker.cancel()
        for item in self._queue:
            if isinstance(item, tuple) and item[1] is not None:
                item[1].fail(ConnectionResetError("client connection lost"))
        self._queue.clear()
        self._wake_worker()
        # Whoever waits to write to us must find out now that nobody reads any more.
        self.write_paused = False
        self.write_paused_at = 0.0
        if self.on_resume_writing is not None:
            self.on_resume_writing()

    def pause_writing(self) -> None:
        super().pause_writing()
        self.write_paused_at = self._loop.time()

    def resume_writing(self) -> None:
        super().resume_writing()
        self.write_paused_at = 0.0
        if self.on_resume_writing is not None:
            self.on_resume_writing()

    # -- httptools callbacks ------------------------------------------------

    def on_message_begin(self) -> None:
        chunk = self._chunk_at_message_start
        if chunk is not None and len(chunk) > self._request_line_room:
            chunk = chunk[: self._request_line_room]  # kept until the head ends: no more
        self._message_start_chunk = chunk
        if chunk is not None:
            self._chunk_at_message_start = None
        self._bounds.message_begins(at_read_start=chunk is not None)
        self._move(MESSAGE_BEGIN)
        self._url = b""
        self._method = ""
        self._fields = HeadFields()
        self._unfinished_head = 0
        self.idle_deadline = 0.0

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self._max_request_line:
            self._parsing_error = UriTooLong("request line too long")
            raise self._parsing_error

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.state == IN_BODY:
            # The first trailer field (llhttp reports them through on_header too): they
            # go to fields of their own and are dropped, never merged into the head
            # (RFC 9110 §6.5.1), yet bounded.
            self._move(TRAILER_FIELD)
            self._fields = HeadFields()
        fields = self._fields
        fields.add(name, value)
        if fields.size > self._max_header_size:
            self._parsing_error = HeadersTooLarge("request headers too large")
            raise self._parsing_error
        if len(fields) > self._max_headers:
            self._parsing_error = HeadersTooLarge("too many request headers")
            raise self._parsing_error

    def on_headers_complete(self) -> None:
        self._move(HEAD_COMPLETE)
        self.header_deadline = 0.0
        parser = self._parser
        method = self._method = parser.get_method().decode("ascii")
        version = self._http_version()
        if version not in ("1.0", "1.1"):
            # llhttp takes `GET /x` (HTTP/0.9) and any one-digit major version; this
            # proxy speaks HTTP/1.x and re-sends as HTTP/1.1 (RFC 9110 §15.6.6: 505).
            self._parsing_error = VersionNotSupported(f"HTTP/{version} is not supported")
            raise self._parsing_error
        fields = self._fields
        content_length: int | None = None
        codings: list[bytes] = []
        hosts: list[bytes] = []
        upgrade_to: bytes | None = None
        for name, value in fields.aside:
            if name == b"host":
                hosts.append(value)
            elif name == b"content-length":
                content_length = int(value)  # llhttp refuses duplicates and non-digits
            elif name == b"transfer-encoding":
                codings += [coding.strip().lower() for coding in value.split(b",")]
            elif name == b"upgrade":
                upgrade_to = value
        chunked = bool(codings)  # llhttp accepts only a final `chunked` for requests
        if chunked:
            if version == "1.0":
                # RFC 9112 §6.1: Transfer-Encoding in HTTP/1.0 means the framing is faulty.
                self._parsing_error = BadRequest("Transfer-Encoding in an HTTP/1.0 request")
                raise self._parsing_error
            if codings != [b"chunked"]:
                # Re-framing as plain chunked would strip the other codings from the body,
                # and llhttp rejects some only after this callback, once the head has gone
                # upstream (RFC 9112 §6.1: 501 for codings a server does not implement).
                self._parsing_error = TransferCodingNotImplemented(
                    "only the chunked transfer coding is supported"
                )
                raise self._parsing_error
            content_length = None
            try:
                # llhttp takes a chunk size of any number of digits as long as its value
                # fits 64 bits: the sizes are read ahead of it (not an upgrade's: its
                # bytes are not parsed).
                self._bounds.chunked_body(check=not parser.should_upgrade())
            except ProxyError as error:
                self._parsing_error = error
                raise
        else:
            self._bounds.sized_body(content_length or 0)
        limit = self._max_body_size
        if limit is not None and content_length is not None and content_length > limit:
            # Refuse before anything goes upstream (RFC 9110 §15.5.14).
            self._parsing_error = RequestTooLarge(f"request body larger than {limit} bytes")
            raise self._parsing_error
        head = RequestHead(
            method=method,
            target=self._url,
            version=version,
            headers=fields.end_to_end(),
            keep_alive=parser.should_keep_alive(),
            upgrade=parser.should_upgrade(),
            content_length=content_length,
            chunked=chunked,
            hosts=tuple(hosts),
            upgrade_to=upgrade_to,
        )
        if head.has_body:
            # A chunked body's size is known at its end only: with a limit, it is held
            # whole (up to the limit) before anything is sent upstream.
            body: RequestBody | None = RequestBody(self, limit if chunked else None)
            self._body = body
        else:
            body = self._body = None
            if not self.busy and not self._queue:
                self.busy = True
                try:
                    taken = self._handler.fast(self, head)
                except Exception:
                    log.exception("unexpected error on the fast path; answering on the general one")
                    taken = False
                if taken:
                    return
                self.busy = False
        self._enqueue((head, body))

    def on_body(self, data: bytes) -> None:
        body = self._body
        if body is None:
            return
        limit = self._max_body_size
        if limit is not None and body.received + len(data) > limit:
            error = RequestTooLarge(f"request body larger than {limit} bytes")
            body.fail(error)
            self._parsing_error = error
            raise error
        body.feed(data)

    def on_message_complete(self) -> None:
        self._move(MESSAGE_COMPLETE)
        if self._body is not None:
            self._body.finish()
            self._body = None

    def _http_version(self) -> str:
        """The request's HTTP version, from its request line when the chunk that began
        the message is at hand (httptools' `get_http_version()` formats a new string
        with `str.format`, several times the cost).

        That chunk begins with the request line (after any empty lines llhttp skipped),
        which llhttp checked to be the method, a space, the target as on_url reported
        it, a space, `HTTP/d.d` and CRLF, with no CR before its end. So the ten bytes
        where the version would be with single spaces and no empty lines lie at or
        before the line's end; if they are `HTTP/1.1` or `HTTP/1.0` and CRLF, they end
        the line and are its version. Otherwise (empty lines, extra spaces, a line
        split across chunks, another version) llhttp is asked.
        """
        chunk = self._message_start_chunk
        self._message_start_chunk = None
        if chunk is not None:
            start = len(self._method) + len(self._url) + 2
            protocol = chunk[start : start + 10]
            if protocol == b"HTTP/1.1\r\n":
                return "1.1"
            if protocol == b"HTTP/1.0\r\n":
                return "1.0"
        return self._parser.get_http_version()

    # -- request queue --------------------------------------------------------

    def _enqueue(self, item: tuple[RequestHead, RequestBody | None] | ProxyError) -> None:
        self._queue.append(item)
        if self._worker is None:
            self._worker = self._loop.create_task(self._serve())
        else:
            self._wake_worker()

    def _wake_worker(self) -> None:
        waiter = self._wakeup
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _refuse_http2(self) -> None:
        """An HTTP/2 connection preface (prior knowledge: gRPC, `curl --http2-prior-knowledge`):
        answered in HTTP/2, so that the client can say why (RFC 9113 §3.4, §7).

        An upstream's own `listen` port serves it instead (h2c): the HTTP/2 server
        connection takes over, from the read the preface began (kept, as for every
        message that begins a read, in `_message_start_chunk`)."""
        self._move(STOP_PARSING)
        serve = self.listener.prior_knowledge
        if serve is not None and serve(self, self._message_start_chunk):
            return
        _refusals.log(
            logging.WARNING,
            f"h2:{self.listener.name}",
            "HTTP/2 is not supported on this port (listener %s, client %s): the client must "
            "speak HTTP/1.1 here",
            self.listener.name,
            self.peer,
        )
        self.write(_HTTP2_NOT_SUPPORTED)
        self.close()

    def _parse_failed(self, error: ProxyError) -> None:
        # No head is arriving any more: its timeout no longer applies (an answer still
        # being written finishes, then the error goes out).
        self._move(STOP_PARSING)
        self.header_deadline = 0.0
        self.pause_reading()
        if self._body is not None:
            self._body.fail(error)
            self._body = None
        self._enqueue(error)

    def fast_done(self, keep_alive: bool) -> None:
        """A request taken by the handler's fast path has been answered."""
        self.busy = False
        if self.closed:
            return
        if not keep_alive or self.listener.draining:
            if self.state != TAKEN_OVER:
                self.close()
        elif self._queue:
            if self._worker is None:
                self._worker = self._loop.create_task(self._serve())
            else:
                self._wake_worker()
        elif self.state >= STOPPED:
            self.close()
        else:
            self.idle_deadline = self._loop.time() + self._idle_timeout

    async def _serve(self) -> None:
        try:
            while not self.closed:
                if not self._queue or self.busy:
                    if self.state >= STOPPED and not self.busy and not self._queue:
                        self.close()
                        return
                    if not self.busy:
                        self.idle_deadline = self._loop.time() + self._idle_timeout
                    self._wakeup = self._loop.create_future()
                    try:
                        await self._wakeup
                    finally:
                        self._wakeup = None
                    continue
                item = self._queue.popleft()
                if isinstance(item, ProxyError):
                    # Parsing stopped at this request: `_method` is still its method.
                    self.send_error(item, keep_alive=False, head_only=self._method == "HEAD")
                    # RFC 9112 §9.6: a server that sends `close` closes after the response.
                    self.close()
                    return
                head, body = item
                self.busy = True
                try:
                    keep_alive = await self._handler(self, head, body)
                finally:
                    self.busy = False
                if not keep_alive or self.listener.draining:
                    if self.state != TAKEN_OVER:
                        self.close()
                    return
        except Exception:
            log.exception("unexpected error serving a client connection")
            self.abort()

    # -- for handlers -----------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def send_error(self, error: ProxyError, *, keep_alive: bool, head_only: bool = False) -> None:
        self.write(error_response(error, keep_alive=keep_alive, head_only=head_only))

    def take_over(self, sink: RawSink) -> bytes:
        """Stop parsing; future bytes go to `sink`. Returns bytes already received past the head."""
        self._move(TAKE_OVER)
        self._raw_sink = sink
        tail, self._taken_over_tail = self._taken_over_tail, b""
        self.idle_deadline = 0.0
        self.header_deadline = 0.0
        self.resume_reading()
        return tail

    def close_if_idle(self) -> bool:
        """Close a keep-alive connection that has no request in flight (graceful shutdown)."""
        if self.busy or self._queue or self.state == TAKEN_OVER:
            return False
        self.close()
        return True


def _parser_message(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return f"malformed request: {text}"[:200]
