"""Keep-alive connections to upstream origins, and one request/response exchange on them.

`UpstreamPool` hands out an `UpstreamConnection` per origin (scheme, host, port, TLS
context), reusing idle ones last-in first-out and closing those idle for too long.
An `UpstreamConnection` parses responses with llhttp and streams body bytes straight
into the sink the forwarder attaches, with back-pressure in both directions: a slow
client pauses reading from the upstream, a slow upstream pauses the request body.
A watchdog per connection turns silence during an exchange into `UpstreamTimeout`.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import httptools

from proxy.errors import ProxyError, UpstreamTimeout, UpstreamUnreachable
from proxy.messages import Headers, ResponseHead

log = logging.getLogger("token_proxy.upstream")


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a connection goes. The TLS context is part of the identity."""

    scheme: str
    host: str
    port: int
    ssl: ssl.SSLContext | None = None


BodySink = Callable[[bytes], None]
InterimSink = Callable[[ResponseHead], None]


class Exchange:
    """One request/response on an `UpstreamConnection`, seen from the forwarder."""

    __slots__ = (
        "_buffered",
        "_sink",
        "body_started",
        "complete",
        "done",
        "head",
        "head_only",
        "on_interim",
        "received_any",
        "upgrade_tail",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, head_only: bool) -> None:
        self.head: asyncio.Future[ResponseHead] = loop.create_future()
        self.done: asyncio.Future[None] = loop.create_future()
        self.head_only = head_only
        self.complete = False
        self.received_any = False
        self.body_started = False
        self.on_interim: InterimSink | None = None
        self._sink: BodySink | None = None
        self._buffered: list[bytes] = []
        self.upgrade_tail = b""

    def attach(self, sink: BodySink) -> None:
        """Send body bytes to `sink` from now on (first those already received)."""
        self._sink = sink
        buffered, self._buffered = self._buffered, []
        for data in buffered:
            sink(data)

    def body(self, data: bytes) -> None:
        if self._sink is not None:
            self._sink(data)
        else:
            self._buffered.append(data)

    def finish(self) -> None:
        self.complete = True
        if not self.done.done():
            self.done.set_result(None)

    def fail(self, error: ProxyError) -> None:
        if not self.head.done():
            self.head.set_exception(error)
            # Retrieved by the forwarder; don't let asyncio warn when it never is.
            self.done.cancel()
        elif not self.done.done():
            self.done.set_exception(error)


class UpstreamConnection(asyncio.Protocol):
    """One connection to an upstream origin; carries one exchange at a time."""

    def __init__(self, pool: UpstreamPool, origin: Origin, timeout: float) -> None:
        self._pool = pool
        self.origin = origin
        self.timeout = timeout
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self.exchange: Exchange | None = None
        self.closed = False
        self.exchanges = 0
        self._status_reason = b""
        self._headers: Headers = []
        self._interim = False
        self._close_delimited = False
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._reading_paused = False
        self._last_activity = 0.0
        self._watchdog: asyncio.TimerHandle | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._upgraded = False
        self.abort_after_exchange = False

    # -- asyncio.Protocol --------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            # An idle connection must stay silent; anything else makes it unusable.
            self.abort()
            return
        self._last_activity = self._loop.time()
        exchange.received_any = True
        if self._upgraded:
            exchange.upgrade_tail += data
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            # 101 Switching Protocols: what follows belongs to the new protocol, and the
            # forwarder takes the raw transport over.
            self._upgraded = True
            exchange.upgrade_tail += data[upgrade.args[0] :]
        except httptools.HttpParserError as exc:
            exchange.fail(UpstreamUnreachable(f"invalid response from upstream: {exc}"[:200]))
            self.abort()

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._cancel_timers()
        self._pool.forget(self)
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_exception(ConnectionResetError("upstream connection lost"))
        exchange = self.exchange
        if exchange is None or exchange.complete:
            return
        if exchange.head.done() and self._close_delimited and exc is None:
            exchange.finish()  # RFC 9112 §6.3: the body ends when the connection closes
        else:
            exchange.fail(UpstreamUnreachable("upstream closed the connection"))

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    # -- httptools callbacks -------------------------------------------------

    def on_message_begin(self) -> None:
        self._status_reason = b""
        self._headers = []

    def on_status(self, reason: bytes) -> None:
        self._status_reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        exchange = self.exchange
        assert exchange is not None
        parser = self._parser
        status = parser.get_status_code()
        content_length: int | None = None
        chunked = False
        for name, value in self._headers:
            lowered = name.lower()
            if lowered == b"content-length":
                content_length = int(value)
            elif lowered == b"transfer-encoding":
                chunked = value.strip().lower().endswith(b"chunked")
        head = ResponseHead(
            status=status,
            reason=self._status_reason,
            version=parser.get_http_version(),
            headers=self._headers,
            keep_alive=parser.should_keep_alive(),
            content_length=None if chunked else content_length,
            chunked=chunked,
        )
        if 100 <= status < 200 and status != 101:
            self._interim = True
            if exchange.on_interim is not None:
                exchange.on_interim(head)
            return
        self._interim = False
        no_body = exchange.head_only or status in (204, 304)
        self._close_delimited = not no_body and not chunked and content_length is None
        if not exchange.head.done():
            exchange.head.set_result(head)
        if exchange.head_only:
            # llhttp cannot be told a response answers HEAD; the exchange ends here and
            # the connection, whose parser now expects a body, is not reused.
            exchange.finish()
            self.abort_after_exchange = True

    def on_body(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is not None and not exchange.complete:
            exchange.body_started = True
            exchange.body(data)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        exchange = self.exchange
        if exchange is not None and not exchange.complete:
            exchange.finish()

    # -- for the forwarder ---------------------------------------------------

    def begin(self, *, head_only: bool) -> Exchange:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        exchange = Exchange(self._loop, head_only)
        self.exchange = exchange
        self.exchanges += 1
        self._close_delimited = False
        self._last_activity = self._loop.time()
        self._watchdog = self._loop.call_later(self.timeout, self._check_activity)
        return exchange

    def _check_activity(self) -> None:
        self._watchdog = None
        exchange = self.exchange
        if exchange is None or exchange.complete or self.closed:
            return
        idle = self._loop.time() - self._last_activity
        if self._reading_paused or idle < self.timeout:
            # Paused by a slow client: not the upstream's silence.
            self._watchdog = self._loop.call_later(
                max(self.timeout - idle, 0.05), self._check_activity
            )
            return
        exchange.fail(UpstreamTimeout("upstream did not answer in time"))
        self.abort()

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self._last_activity = self._loop.time()
        self.transport.write(data)

    async def drain(self) -> None:
        if self._write_paused and not self.closed:
            self._drain_waiter = self._loop.create_future()
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None
        if self.closed:
            raise ConnectionResetError("upstream connection lost")

    def pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None and not self.closed:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None and not self.closed:
            self._reading_paused = False
            self._last_activity = self._loop.time()
            self.transport.resume_reading()

    def reusable(self) -> bool:
        exchange = self.exchange
        return (
            not self.closed
            and not self.abort_after_exchange
            and exchange is not None
            and exchange.complete
            and exchange.head.done()
            and not exchange.head.cancelled()
            and exchange.head.exception() is None
            and exchange.head.result().keep_alive
            and not self._reading_paused
        )

    def end_exchange(self) -> None:
        self.exchange = None
        self._cancel_timers()

    def start_idle_timer(self, idle_timeout: float) -> None:
        self._idle_timer = self._loop.call_later(idle_timeout, self.close)

    def detach(self) -> asyncio.Transport:
        """Hand the raw transport over (after 101 Switching Protocols)."""
        assert self.transport is not None
        self._cancel_timers()
        self.exchange = None
        self._pool.forget(self)
        return self.transport

    def _cancel_timers(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class UpstreamPool:
    """Idle keep-alive connections per origin."""

    def __init__(self, *, max_idle_per_origin: int = 64, idle_timeout: float = 30.0) -> None:
        self._idle: dict[Origin, deque[UpstreamConnection]] = {}
        self._max_idle = max_idle_per_origin
        self._idle_timeout = idle_timeout
        self._all: set[UpstreamConnection] = set()

    async def connect(
        self, origin: Origin, *, connect_timeout: float, read_timeout: float
    ) -> UpstreamConnection:
        """A new connection to `origin`; errors map to 502/504."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(connect_timeout):
                _, protocol = await loop.create_connection(
                    lambda: UpstreamConnection(self, origin, read_timeout),
                    origin.host,
                    origin.port,
                    ssl=origin.ssl,
                    server_hostname=origin.host if origin.ssl is not None else None,
                )
        except TimeoutError:
            raise UpstreamTimeout(f"connecting to {origin.host}:{origin.port} timed out") from None
        except ssl.SSLCertVerificationError as exc:
            raise UpstreamUnreachable(
                f"TLS verification of {origin.host}:{origin.port} failed: {exc.verify_message}"
            ) from None
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamUnreachable(
                f"cannot connect to {origin.host}:{origin.port}: {exc.strerror or exc}"
                if isinstance(exc, OSError)
                else f"TLS handshake with {origin.host}:{origin.port} failed"
            ) from None
        assert isinstance(protocol, UpstreamConnection)
        self._all.add(protocol)
        return protocol

    def take_idle(self, origin: Origin) -> UpstreamConnection | None:
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                return conn
        return None

    def release(self, conn: UpstreamConnection) -> None:
        """Return `conn` after its exchange: kept if reusable, closed otherwise."""
        reusable = conn.reusable()
        conn.end_exchange()
        if not reusable:
            conn.close()
            return
        idle = self._idle.setdefault(conn.origin, deque())
        if len(idle) >= self._max_idle:
            conn.close()
            return
        conn.start_idle_timer(self._idle_timeout)
        idle.append(conn)

    def discard(self, conn: UpstreamConnection) -> None:
        conn.end_exchange()
        conn.abort()

    def forget(self, conn: UpstreamConnection) -> None:
        self._all.discard(conn)
        idle = self._idle.get(conn.origin)
        if idle is not None and conn in idle:
            idle.remove(conn)

    def close(self) -> None:
        for conn in list(self._all):
            conn.abort()
        self._idle.clear()
