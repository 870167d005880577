"""The HTTP/2 server connection: the application's side of an HTTP/2 connection.

Two kinds of connection speak HTTP/2 to the proxy (`front.py` makes theirs): an
intercepted TLS session whose client chose `h2` in ALPN, and a cleartext connection to
an upstream's own `listen` port that begins with the HTTP/2 preface (h2c with prior
knowledge). `Http2ServerConnection` is then the transport's protocol: h2 (sans-IO)
parses frames and keeps the protocol state, this module does the I/O, and each stream
becomes a `StreamRelay` (`stream.py`) planned by the port's planner, as an HTTP/1.1
request on that port would be.

The connection the listener accepted (a `ClientConnection`, taken over) stays in the
listener as this connection's handle: it is counted against `max_connections`, closed
by the listener (shutdown, a client that stopped reading for `idle_timeout`), and it
leaves the listener when this connection ends.

Flow control both ways: the client's DATA is acknowledged only once handed upstream
(its window bounds what is buffered), and a response is read from the upstream only
as the client's window lets it out. Reading from the client pauses while the transport
cannot take what we write (acknowledgements of a flood pile up there otherwise) or
while more than `INBOUND_BUFFER_LIMIT` bytes wait for their upstreams.

A ticker, once a second, closes an idle connection (GOAWAY, then close: no stream for
`idle_timeout`, or `header_timeout` before the first), one that holds a header block
open for longer than `header_timeout`, and, when the listener drains, sends GOAWAY
and closes once the streams in flight are answered. A GOAWAY from the client is a
drain too. The floods of `guards.py` end the connection with ENHANCE_YOUR_CALM.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Final, cast

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame

from proxy.datapath.client_connection import ClientConnection
from proxy.datapath.http2.guards import Flood, FrameGuard
from proxy.datapath.http2.stream import CANCEL, StreamGone, StreamRelay
from proxy.datapath.messages import Headers
from proxy.datapath.planning import Planner
from proxy.datapath.timeouts import CLIENT_SWEEP_INTERVAL
from proxy.ops.throttled_log import ThrottledLog

if TYPE_CHECKING:
    from proxy.datapath.http2.front import Http2Front

log = logging.getLogger("token_proxy.connection")
_calm_log = ThrottledLog(log)

MAX_CONCURRENT_STREAMS: Final = 100
# The connection's receive window (a stream's stays at the default 64 KiB): what all of a
# client's streams together may have sent and not yet seen handed upstream.
CONNECTION_WINDOW: Final = 1024 * 1024
INBOUND_BUFFER_LIMIT: Final = CONNECTION_WINDOW
# How long what a client still sends after a GOAWAY for its misbehaviour is read and
# dropped before the connection closes.
LINGER: Final = 1.0
_DEFAULT_WINDOW: Final = 65535


class Http2ServerConnection(asyncio.Protocol):
    """One client's HTTP/2 connection: h2's state, the I/O, and a relay per stream."""

    def __init__(self, front: Http2Front, handle: ClientConnection, planner: Planner) -> None:
        self.front = front
        self.handle = handle
        self.planner = planner
        limits = handle.listener.limits
        self.max_headers = limits.max_headers
        self.max_body_size = limits.max_body_size
        self._idle_timeout = limits.idle_timeout
        self._header_timeout = limits.header_timeout
        self._loop = asyncio.get_running_loop()
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        self._h2 = h2.connection.H2Connection(config=config)
        self._h2.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: limits.max_header_size,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
            },
        )
        # h2 applies the list size to its HPACK decoder only once the client has
        # acknowledged our SETTINGS; a client may send headers before that.
        self._h2.decoder.max_header_list_size = limits.max_header_size
        self._guard = FrameGuard(max_header_block=2 * limits.max_header_size, now=self._loop.time())
        self._transport: asyncio.Transport | None = None
        self._streams: dict[int, StreamRelay] = {}
        self._window_waiters: dict[int, asyncio.Future[None]] = {}
        self._writable: asyncio.Future[None] | None = None
        self._write_paused = False
        self._reading_paused = False
        self._buffered = 0  # request bytes received and not yet handed upstream
        self._closed = False
        self._discarding = False  # closing: what the client sends is dropped
        self._going_away = False  # GOAWAY sent or received: no new streams
        self._last_stream_id = 0  # the last stream taken (GOAWAY's last stream id)
        self._served_any = False
        self._idle_since = self._loop.time()
        self._ticker: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._h2.initiate_connection()
        self._h2.increment_flow_control_window(CONNECTION_WINDOW - _DEFAULT_WINDOW)
        self._flush()
        self._ticker = self._loop.call_later(CLIENT_SWEEP_INTERVAL, self._tick)

    def data_received(self, data: bytes) -> None:
        if self._closed or self._discarding:
            return
        try:
            data = self._guard.inspect(data, self._loop.time())
            events = self._h2.receive_data(data)
        except Flood as flood:
            self._calm(str(flood))
            return
        except h2.exceptions.ProtocolError as error:
            # h2 has queued its GOAWAY (PROTOCOL_ERROR, ENHANCE_YOUR_CALM for an
            # oversized header list, ...): send it, then close.
            log.debug("HTTP/2 protocol error from %s: %s", self.handle.peer, _without_quotes(error))
            self._close(linger=True)
            return
        for event in events:
            self._dispatch(event)
        if self._guard.goaway is not None:
            self._guard.goaway = None
            self._client_going_away()
        self._flush()

    def eof_received(self) -> bool | None:
        return False  # the client will send nothing more: nor can its streams

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        for relay in list(self._streams.values()):
            relay.client_reset(CANCEL)
        for waiter in [*self._window_waiters.values(), self._writable]:
            if waiter is not None and not waiter.done():
                waiter.set_exception(StreamGone())
                waiter.exception()  # retrieved: whoever waits may be gone already
        self._window_waiters.clear()
        if not self.handle.closed:
            self.handle.connection_lost(exc)  # and so it leaves its listener

    def pause_writing(self) -> None:
        self._write_paused = True
        self.handle.pause_writing()  # the listener's sweeper times a client that stopped reading
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self.handle.resume_writing()
        waiter = self._writable
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self._update_reading()

    # -- h2 events ----------------------------------------------------------------------

    def _dispatch(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.DataReceived):
            self._data(event)
        elif isinstance(event, h2.events.RequestReceived):
            self._request(event)
        elif isinstance(event, h2.events.StreamEnded):
            relay = self._streams.get(event.stream_id or 0)
            if relay is not None:
                relay.request_ended()
        elif isinstance(event, h2.events.TrailersReceived):
            relay = self._streams.get(event.stream_id or 0)
            if relay is not None:
                relay.request_ended(event.headers)
        elif isinstance(event, h2.events.StreamReset):
            relay = self._streams.pop(event.stream_id or 0, None)
            if relay is not None:
                self._release(relay)
                relay.client_reset(event.error_code or 0)
            self._wake(event.stream_id or 0)
        elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            stream_id = event.stream_id if isinstance(event, h2.events.WindowUpdated) else 0
            self._wake(stream_id or 0)

    def _request(self, event: h2.events.RequestReceived) -> None:
        stream_id = event.stream_id or 0
        if self._going_away:
            self._h2.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
            return
        self._served_any = True
        self._last_stream_id = stream_id
        relay = StreamRelay(self, stream_id, cast(Headers, event.headers or []))
        self._streams[stream_id] = relay
        if event.stream_ended is not None:
            relay.request_ended()
        relay.start()

    def _data(self, event: h2.events.DataReceived) -> None:
        stream_id = event.stream_id or 0
        data = event.data or b""
        flow_controlled = event.flow_controlled_length or 0
        relay = self._streams.get(stream_id)
        if relay is None:
            # A stream already answered or refused: its window still counts.
            self._h2.acknowledge_received_data(flow_controlled, stream_id)
            return
        self._buffered += flow_controlled
        relay.data_received(data, flow_controlled)
        if event.stream_ended is not None:
            relay.request_ended()
        self._update_reading()

    # -- for the stream relays ---------------------------------------------------------

    def send_headers(self, stream_id: int, headers: Headers, *, end_stream: bool) -> None:
        if self._closed:
            raise StreamGone()
        try:
            self._h2.send_headers(stream_id, headers, end_stream=end_stream)
        except h2.exceptions.ProtocolError:
            raise StreamGone() from None
        self._flush()

    async def send_data(self, stream_id: int, data: bytes, *, end_stream: bool = False) -> None:
        """Send `data` on `stream_id` as the client's flow-control windows (and the
        transport) let it; `StreamGone` once the stream or connection is, and after
        `idle_timeout` without any window (then the stream is reset)."""
        while data or end_stream:
            if self._closed:
                raise StreamGone()
            if self._write_paused:
                await self._wait_writable()
                continue
            try:
                window = self._h2.local_flow_control_window(stream_id)
            except h2.exceptions.ProtocolError:
                raise StreamGone() from None
            if data and window <= 0:
                await self._wait_window(stream_id)
                continue
            size = max(0, min(window, len(data), self._h2.max_outbound_frame_size))
            last = end_stream and size == len(data)
            try:
                self._h2.send_data(stream_id, data[:size], end_stream=last)
            except h2.exceptions.ProtocolError:
                raise StreamGone() from None
            data = data[size:]
            end_stream = end_stream and not last
            self._flush()

    def end_stream(self, stream_id: int) -> None:
        try:
            self._h2.end_stream(stream_id)
        except h2.exceptions.ProtocolError:
            raise StreamGone() from None
        self._flush()

    def reset_stream(self, stream_id: int, error_code: int) -> None:
        if self._closed:
            return
        try:
            self._h2.reset_stream(stream_id, error_code)
        except h2.exceptions.ProtocolError:
            return  # already closed
        self._flush()

    def acknowledge(self, stream_id: int, flow_controlled: int) -> None:
        """`flow_controlled` bytes of `stream_id` went upstream: the client may send more."""
        self._buffered -= flow_controlled
        if self._closed:
            return
        self._h2.acknowledge_received_data(flow_controlled, stream_id)
        self._flush()
        self._update_reading()

    def stream_done(self, relay: StreamRelay) -> None:
        if self._streams.get(relay.stream_id) is relay:
            del self._streams[relay.stream_id]
            self._release(relay)
        if not self._streams:
            self._idle_since = self._loop.time()
            if self._going_away:
                self._close()

    def _release(self, relay: StreamRelay) -> None:
        """Whatever `relay` received and did not hand upstream still counts in the
        connection's window: give it back."""
        unsent = relay.take_unsent()
        if unsent:
            self.acknowledge(relay.stream_id, unsent)

    # -- waiting ---------------------------------------------------------------------------

    async def _wait_writable(self) -> None:
        if self._writable is None or self._writable.done():
            self._writable = self._loop.create_future()
        await self._writable

    async def _wait_window(self, stream_id: int) -> None:
        waiter = self._window_waiters.get(stream_id)
        if waiter is None or waiter.done():
            waiter = self._window_waiters[stream_id] = self._loop.create_future()
        try:
            async with asyncio.timeout(self._idle_timeout):
                await asyncio.shield(waiter)
        except TimeoutError:
            # A client that never opens its window again would hold the stream (and its
            # upstream stream) forever.
            self.reset_stream(stream_id, CANCEL)
            raise StreamGone() from None

    def _wake(self, stream_id: int) -> None:
        """A window opened: on one stream, or on all of them (`stream_id` 0)."""
        if stream_id:
            waiters = [self._window_waiters.pop(stream_id, None)]
        else:
            waiters = list(self._window_waiters.values())
            self._window_waiters.clear()
        for waiter in waiters:
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    # -- the connection -------------------------------------------------------------------

    def _flush(self) -> None:
        data = self._h2.data_to_send()
        transport = self._transport
        if data and transport is not None and not transport.is_closing():
            transport.write(data)

    def _update_reading(self) -> None:
        transport = self._transport
        if transport is None or self._closed or self._discarding:
            return
        pause = self._write_paused or self._buffered > INBOUND_BUFFER_LIMIT
        if pause != self._reading_paused:
            self._reading_paused = pause
            if pause:
                transport.pause_reading()
            else:
                transport.resume_reading()

    def _client_going_away(self) -> None:
        """The client sent GOAWAY: it opens no more streams, and those it opened are
        answered (its last stream id is about streams we would have opened: none)."""
        self._going_away = True
        if not self._streams:
            self._close()

    def _go_away(self, error_code: int, reason: bytes) -> None:
        """Send GOAWAY with the last stream taken, and take no more.

        The frame is written here, not through h2, which would refuse to carry on the
        streams in flight once it had sent one.
        """
        if self._going_away and error_code == ErrorCodes.NO_ERROR:
            return
        self._going_away = True
        self._flush()
        frame = GoAwayFrame(
            stream_id=0,
            last_stream_id=self._last_stream_id,
            error_code=error_code,
            additional_data=reason,
        )
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(frame.serialize())

    def _calm(self, reason: str) -> None:
        _calm_log.log(
            logging.WARNING,
            f"h2-calm:{reason}",
            "HTTP/2 client %s closed with ENHANCE_YOUR_CALM: %s",
            self.handle.peer,
            reason,
        )
        self._go_away(ErrorCodes.ENHANCE_YOUR_CALM, reason.encode("ascii"))
        self._close(linger=True)

    def _close(self, *, linger: bool = False) -> None:
        """Close the connection; with `linger`, once what the client is still sending
        has been read and dropped for `LINGER` seconds (or it closed its side): a
        close with bytes unread resets the connection, and the client may lose the
        GOAWAY that says why."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        self._flush()
        if not linger or not transport.can_write_eof():
            transport.close()
            return
        self._discarding = True
        transport.write_eof()
        transport.resume_reading()
        self._loop.call_later(LINGER, transport.close)

    def _tick(self) -> None:
        self._ticker = None
        if self._closed:
            return
        now = self._loop.time()
        block_since = self._guard.header_block_since
        if block_since is not None and now - block_since > self._header_timeout:
            self._calm("header block not completed in time")
            return
        if self.handle.listener.draining and not self._going_away:
            self._go_away(ErrorCodes.NO_ERROR, b"shutting down")
        if not self._streams and block_since is None:  # a head on its way is not idle
            limit = self._idle_timeout if self._served_any else self._header_timeout
            if self._going_away or now - self._idle_since > limit:
                self._go_away(ErrorCodes.NO_ERROR, b"idle")
                self._close()
                return
        self._ticker = self._loop.call_later(CLIENT_SWEEP_INTERVAL, self._tick)


def _without_quotes(error: Exception) -> str:
    """h2's message cut before the first bytes it quotes: a field value it quotes may be
    a credential (an `authorization` with a stray space, say)."""
    text = str(error)
    for quote in ("b'", 'b"'):
        text = text.split(quote, 1)[0]
    return text.rstrip(": ") or type(error).__name__
