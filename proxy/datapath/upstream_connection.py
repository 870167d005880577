"""One connection to an upstream origin, and one request/response exchange on it.

An `UpstreamConnection` (to an `Origin`: scheme, host, port, TLS context) parses
responses with llhttp and reports them to the `Exchange` of the request in flight
through plain method calls (`on_head`, `on_body`, `on_complete`, `on_error`): the
forwarder's exchanges either write straight through to the client (the fast path) or
resolve futures that a coroutine awaits (everything else).

Where the response stands is the connection's `state` (`proxy.datapath.states`), moved
along that module's one table by `_move` only.

Timing is done without per-request timers: each connection records when it last saw
activity, and the pool's sweeper (`proxy.datapath.upstream_pool`) calls
`check_silence`, which fails an exchange whose upstream has been silent longer than
its timeout (`UpstreamTimeout`).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Final, NamedTuple, Protocol

import httptools

from proxy.datapath.flow_control import FlowControlledProtocol
from proxy.datapath.messages import ResponseHead, read_response_head
from proxy.datapath.states import (
    FINAL_HEAD_END,
    FINAL_HEAD_END_UNTIL_CLOSE,
    IDLE,
    IN_BODY_UNTIL_CLOSE,
    IN_INTERIM,
    IN_RESPONSE_HEAD,
    INTERIM_HEAD_END,
    RESPONSE_BEGIN,
    RESPONSE_END,
    SEND_REQUEST,
    SWITCH_PROTOCOLS,
    SWITCHED,
    upstream_next,
)
from proxy.errors import ProxyError, UpstreamTimeout, UpstreamUnreachable

# Beyond this a response head is an attack or a bug, not an API (Envoy's default is 60 KiB).
MAX_RESPONSE_HEAD: Final = 256 * 1024
_H: Final = ord("H")
_CR: Final = ord("\r")

BodySink = Callable[[bytes], None]


class Origin(NamedTuple):
    """Where a connection goes. The TLS context is part of the identity.

    A tuple, because it is a dictionary key looked up on every request.
    """

    scheme: str
    host: str
    port: int
    ssl: ssl.SSLContext | None = None


class ConnectionTracker(Protocol):
    """Whoever keeps track of upstream connections (the pool): told when one is gone."""

    def forget(self, conn: UpstreamConnection) -> None: ...


class Exchange:
    """One request/response on an `UpstreamConnection`; subclasses decide what to do with it.

    The connection calls, in order: `on_interim` for 1xx responses, `on_head` once,
    `on_body` per chunk, then `on_complete` or `on_error` (at most one of the two);
    `after_data` after each batch of bytes it parsed, so writes can be coalesced.
    """

    __slots__ = ("complete", "failed", "head_only", "received_any", "reused", "upgrade_tail")

    def __init__(self, head_only: bool) -> None:
        self.head_only = head_only
        self.complete = False
        self.failed = False
        self.received_any = False
        # Sent on a connection that had carried an exchange before (an idle keep-alive
        # one, which the upstream may have closed meanwhile).
        self.reused = False
        self.upgrade_tail = b""

    def on_interim(self, head: ResponseHead) -> None:
        """A 1xx response other than 101."""

    def on_head(self, head: ResponseHead) -> None:
        raise NotImplementedError

    def on_body(self, data: bytes) -> None:
        raise NotImplementedError

    def on_complete(self) -> None:
        raise NotImplementedError

    def on_error(self, error: ProxyError) -> None:
        raise NotImplementedError

    def after_data(self) -> None:
        """The connection parsed a batch of bytes."""

    def finish(self) -> None:
        if not self.complete and not self.failed:
            self.complete = True
            self.on_complete()

    def fail(self, error: ProxyError) -> None:
        if not self.complete and not self.failed:
            self.failed = True
            self.on_error(error)


class AwaitedExchange(Exchange):
    """An exchange a coroutine awaits: `head` and `done` futures, body to an attached sink."""

    __slots__ = ("_buffered", "_sink", "done", "head", "interim_writer")

    def __init__(self, loop: asyncio.AbstractEventLoop, head_only: bool) -> None:
        super().__init__(head_only)
        self.head: asyncio.Future[ResponseHead] = loop.create_future()
        self.done: asyncio.Future[None] = loop.create_future()
        self.interim_writer: Callable[[ResponseHead], None] | None = None
        self._sink: BodySink | None = None
        self._buffered: list[bytes] = []

    def take_buffered(self) -> bytes:
        """Body bytes received so far and not yet handed to a sink."""
        data = b"".join(self._buffered)
        self._buffered = []
        return data

    def attach(self, sink: BodySink) -> None:
        """Send body bytes to `sink` from now on (first those already received)."""
        self._sink = sink
        if self._buffered:
            sink(self.take_buffered())

    def on_interim(self, head: ResponseHead) -> None:
        if self.interim_writer is not None:
            self.interim_writer(head)

    def on_head(self, head: ResponseHead) -> None:
        if not self.head.done():
            self.head.set_result(head)

    def on_body(self, data: bytes) -> None:
        if self._sink is not None:
            self._sink(data)
        else:
            self._buffered.append(data)

    def on_complete(self) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def on_error(self, error: ProxyError) -> None:
        if not self.head.done():
            self.head.set_exception(error)
            # Nobody awaits `done` once the head failed; don't let asyncio warn about it.
            self.done.cancel()
        elif not self.done.done():
            self.done.set_exception(error)


class UpstreamConnection(FlowControlledProtocol):
    """One connection to an upstream origin; carries one exchange at a time.

    Beside the state, two facts decide whether it may carry another exchange: whether
    the last response allowed keep-alive, and `abort_after_exchange`, a verdict that it
    must not be reused, which any stage (and the forwarder) may reach.
    """

    def __init__(self, pool: ConnectionTracker, origin: Origin) -> None:
        super().__init__()
        self._pool = pool
        self.origin = origin
        self.timeout = 0.0  # the current exchange's (`begin`): upstreams sharing it differ
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpResponseParser(self)
        self.exchange: Exchange | None = None
        self.exchanges = 0
        # The bytes of this exchange's response heads until the final one is complete
        # (interim 1xx heads come first), and where the head being parsed starts.
        self._heads: bytes | bytearray = b""
        self._head_start = 0
        # Where the response stands (`proxy.datapath.states`): moved by `_move` only.
        self.state = IDLE
        self._keep_alive = False
        self._unfinished_head = 0
        self.last_activity = 0.0
        self.idle_since = 0.0
        self.abort_after_exchange = False

    def _move(self, event: int) -> None:
        self.state = upstream_next(self.state, event)

    # -- asyncio.Protocol --------------------------------------------------

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            # An idle connection must stay silent; anything else makes it unusable.
            self.abort()
            return
        exchange.received_any = True
        state = self.state
        if state == SWITCHED:
            self.last_activity = self._loop.time()
            exchange.upgrade_tail += data
            return
        in_head = state == IN_RESPONSE_HEAD
        if state <= IN_INTERIM:  # the final head is awaited: keep what may be part of it
            heads = self._heads
            if not heads:
                self._heads = data
            else:
                if isinstance(heads, bytes):
                    heads = self._heads = bytearray(heads)
                heads += data
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            # 101 Switching Protocols: what follows belongs to the new protocol, and the
            # forwarder takes the raw transport over.
            self._move(SWITCH_PROTOCOLS)
            exchange.upgrade_tail += data[upgrade.args[0] :]
        except httptools.HttpParserError as exc:
            self.abort()
            exchange.fail(UpstreamUnreachable(f"invalid response from upstream: {exc}"[:200]))
        else:
            if in_head and self.state == IN_RESPONSE_HEAD:
                # httptools holds a header field until it ends, and llhttp sets no size
                # limit: count what arrived while the head stayed unfinished.
                self._unfinished_head += len(data)
                if self._unfinished_head > MAX_RESPONSE_HEAD:
                    self.abort()
                    exchange.fail(UpstreamUnreachable("response head from upstream is too large"))
        if self.state > IN_INTERIM and not exchange.complete:
            # Bytes of an unfinished head are not an answer: `timeout` bounds the wait for
            # the whole head after the last request byte, however slowly it trickles in.
            # (A finished exchange needs no more watching.)
            self.last_activity = self._loop.time()
        exchange.after_data()

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._pool.forget(self)
        exchange = self.exchange
        if exchange is None or exchange.complete or exchange.failed:
            return
        if self.state == IN_BODY_UNTIL_CLOSE and exc is None:
            exchange.finish()  # RFC 9112 §6.3: the body ends when the connection closes
        else:
            exchange.fail(UpstreamUnreachable("upstream closed the connection"))

    # -- httptools callbacks -------------------------------------------------

    def on_message_begin(self) -> None:
        exchange = self.exchange
        if exchange is None or exchange.complete:
            # A second response to one request: this connection can no longer be trusted
            # to frame the next exchange's response.
            self.abort_after_exchange = True
            raise UpstreamUnreachable("upstream sent a response nobody asked for")
        self._move(RESPONSE_BEGIN)
        self._unfinished_head = 0

    def on_headers_complete(self) -> None:
        exchange = self.exchange
        assert exchange is not None
        parser = self._parser
        status = parser.get_status_code()
        if not 100 <= status <= 599:
            # llhttp takes any three digits; RFC 9110 §15: outside 100..599 is invalid.
            raise UpstreamUnreachable(f"invalid status code {status} from upstream")
        raw = self._take_head()
        if raw[0] != _H:
            # llhttp also takes RTSP/ and ICE/ status lines: whatever answered is not HTTP.
            raise UpstreamUnreachable("the upstream answered in a protocol other than HTTP")
        head = read_response_head(raw, status, parser.should_keep_alive())
        if 100 <= status < 200 and status != 101:
            self._move(INTERIM_HEAD_END)
            # Keep only what follows: an upstream sending 1xx heads without end must not
            # make them pile up.
            self._heads = self._heads[self._head_start :]
            self._head_start = 0
            exchange.on_interim(head)
            return
        # RFC 9112 §6.3: the answer to HEAD, a 1xx (here a 101), a 204 and a 304 end at
        # the head's blank line.
        no_body = exchange.head_only or status in (101, 204, 304)
        if no_body or head.chunked or head.content_length is not None:
            self._move(FINAL_HEAD_END)
        else:
            self._move(FINAL_HEAD_END_UNTIL_CLOSE)
        self._heads = b""
        self._keep_alive = head.keep_alive
        exchange.on_head(head)
        if exchange.head_only:
            # llhttp cannot be told a response answers HEAD; the exchange ends here and
            # the connection, whose parser now expects a body, is not reused.
            self.abort_after_exchange = True
            exchange.finish()

    def _take_head(self) -> bytes:
        """The head llhttp has just parsed, from the bytes kept while awaiting it."""
        heads = self._heads
        start = self._head_start
        if start < len(heads) and heads[start] == _CR:
            while heads.startswith(b"\r\n", start):
                start += 2  # llhttp skips empty lines before a message
        end = heads.find(b"\r\n\r\n", start) + 4
        if end < 4:
            raise UpstreamUnreachable("response head not found in what the upstream sent")
        if end - start > MAX_RESPONSE_HEAD:
            raise UpstreamUnreachable("response head from upstream is too large")
        self._head_start = end
        head = heads[start:end]
        return head if isinstance(head, bytes) else bytes(head)

    def on_body(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is not None and not exchange.complete:
            exchange.on_body(data)

    def on_message_complete(self) -> None:
        interim = self.state == IN_INTERIM
        self._move(RESPONSE_END)
        if interim:
            return
        exchange = self.exchange
        if exchange is not None:
            exchange.finish()

    # -- for the forwarder ---------------------------------------------------

    def begin(self, exchange: Exchange, head: bytes, now: float, timeout: float) -> None:
        """Start `exchange` by sending its request `head` (at loop time `now`); it fails
        once the upstream stays silent for `timeout` seconds."""
        assert self.transport is not None
        self.timeout = timeout
        self.exchange = exchange
        exchange.reused = self.exchanges > 0
        self.exchanges += 1
        self._move(SEND_REQUEST)
        self._heads = b""
        self._head_start = 0
        self._keep_alive = False
        self.last_activity = now
        self.transport.write(head)

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.last_activity = self._loop.time()
        self.transport.write(data)

    def resume_reading(self) -> None:
        if self.reading_paused:
            self.last_activity = self._loop.time()
        super().resume_reading()

    def check_silence(self, now: float) -> None:
        """Fail the exchange if the upstream has been silent for longer than `timeout`."""
        exchange = self.exchange
        if exchange is None or exchange.complete or exchange.failed or self.closed:
            return
        if self.reading_paused:
            # Paused by a slow client: that is not the upstream's silence.
            self.last_activity = now
            return
        if now - self.last_activity >= self.timeout:
            self.abort()
            exchange.fail(UpstreamTimeout("upstream did not answer in time"))

    def reusable(self) -> bool:
        exchange = self.exchange
        return (
            not self.closed
            and not self.abort_after_exchange
            and exchange is not None
            and exchange.complete
            # RFC 9112 §9.6: after `Connection: close` (or an HTTP/1.0 response without
            # keep-alive) no further request may be sent on this connection.
            and self._keep_alive
            and not self.reading_paused
            # The response ended where the next may begin (not switched to another protocol).
            and self.state == IDLE
        )

    def detach(self) -> asyncio.Transport:
        """Hand the raw transport over (after 101 Switching Protocols)."""
        assert self.transport is not None
        self.exchange = None
        self._pool.forget(self)
        return self.transport
