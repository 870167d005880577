"""One HTTP/2 connection to an upstream origin.

`Http2Connection` is the transport's protocol: h2 (sans-IO) keeps the protocol state,
this module does the I/O and hands each stream's events to its `StreamEvents` (an
`UpstreamStream`, `upstream.py`), and tells its `ConnectionTracker` (`Http2Upstreams`)
when it takes no new stream. It is ready once the peer's first SETTINGS arrived (its
SETTINGS_MAX_CONCURRENT_STREAMS is known then), closes after `UPSTREAM_IDLE_TIMEOUT`
without a stream, and after a GOAWAY lets the streams the upstream accepted finish.
h2 answers PING itself. Frames that several streams queue in one turn of the event
loop leave in one write (`flush_soon`).

What we tell upstreams in SETTINGS bounds what waits here for a slow consumer: at most
`STREAM_WINDOW` bytes per stream, `CONNECTION_WINDOW` per connection; response header
lists beyond `MAX_HEADER_LIST_SIZE` are a protocol error (h2's decoder enforces it).

The TLS context that offers `h2` comes from `proxy.tls.client_context.http2_context`.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Final, Protocol, cast

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from h2.events import Event
from hyperframe.frame import Frame, GoAwayFrame

from proxy.datapath.timeouts import UPSTREAM_IDLE_TIMEOUT
from proxy.datapath.upstream_connection import Origin
from proxy.errors import BadRequest, ProxyError, UpstreamUnreachable

__all__ = ["ConnectionTracker", "Http2Connection", "StreamEvents"]

Headers = list[tuple[bytes, bytes]]

STREAM_WINDOW: Final = 256 * 1024
CONNECTION_WINDOW: Final = 8 * 1024 * 1024
MAX_HEADER_LIST_SIZE: Final = 64 * 1024
# RFC 9113 §6.9.2: every connection starts with this window, raised by WINDOW_UPDATE.
_INITIAL_WINDOW: Final = 65535
# DATA of this size or more is written at once rather than with the turn's other frames.
_WRITE_AT_ONCE: Final = 16 * 1024
CANCEL: Final = int(h2.errors.ErrorCodes.CANCEL)
REFUSED_STREAM: Final = int(h2.errors.ErrorCodes.REFUSED_STREAM)


class StreamEvents(Protocol):
    """What a connection tells one of its streams."""

    stream_id: int

    @property
    def finished(self) -> bool: ...

    def on_head(self, headers: Headers) -> None: ...
    def on_data(self, data: bytes, flow_controlled: int) -> None: ...
    def on_trailers(self, headers: Headers) -> None: ...
    def on_end(self) -> None: ...
    def on_reset(self, error_code: int) -> None: ...
    def on_not_processed(self) -> None: ...
    def on_window(self) -> None: ...
    def fail(self, error: ProxyError) -> None: ...


class ConnectionTracker(Protocol):
    """Whoever hands out connections (`Http2Upstreams`)."""

    def forget(self, connection: Http2Connection) -> None:
        """`connection` takes no new stream (GOAWAY, closed, lost)."""

    def assumed_capacity(self, origin: Origin) -> int:
        """Streams that may wait for a connection to `origin` that is not ready yet."""

    def learn_capacity(self, origin: Origin, max_streams: int) -> None:
        """A connection to `origin` was told SETTINGS_MAX_CONCURRENT_STREAMS."""


class _ClientH2Connection(h2.connection.H2Connection):
    """h2's connection, except that a GOAWAY received does not end it at once.

    h2 takes every frame after a received GOAWAY as a protocol error, even in the same
    read; RFC 9113 §6.8 lets the streams up to the GOAWAY's last stream id finish. The
    connection stays open here and `Http2Connection` opens no new stream on it.
    """

    def _receive_goaway_frame(self, frame: GoAwayFrame) -> tuple[list[Frame], list[Event]]:
        state = self.state_machine.state
        frames, events = super()._receive_goaway_frame(frame)
        if state is h2.connection.ConnectionState.CLIENT_OPEN:
            self.state_machine.state = state
        return frames, events


def _retrieve(future: asyncio.Future[None]) -> None:
    # Whoever waited has seen a failure; one nobody waited for is not worth a warning.
    if not future.cancelled():
        future.exception()


class Http2Connection(asyncio.Protocol):
    """One HTTP/2 connection to an origin, multiplexing streams."""

    def __init__(self, tracker: ConnectionTracker, origin: Origin) -> None:
        self._tracker = tracker
        self.origin = origin
        self._loop = asyncio.get_running_loop()
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.h2 = _ClientH2Connection(config=config)
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, StreamEvents] = {}
        # Settled once the peer's first SETTINGS arrived (or the connection failed).
        self.ready: asyncio.Future[None] = self._loop.create_future()
        self.ready.add_done_callback(_retrieve)
        self.lost: asyncio.Future[None] = self._loop.create_future()
        self.not_h2 = False
        self.goaway = False
        self.closed = False
        self.write_paused = False
        self.waiting = 0
        self._idle_timer: asyncio.TimerHandle | None = None
        self._flush_handle: asyncio.Handle | None = None

    @property
    def max_streams(self) -> int:
        if not self.ready.done():
            return self._tracker.assumed_capacity(self.origin)
        return int(self.h2.remote_settings.max_concurrent_streams)

    def usable(self) -> bool:
        return not self.closed and not self.goaway and not self.not_h2

    def has_room(self) -> bool:
        return (
            self.usable()
            and self.ready.done()
            and self.ready.exception() is None
            and len(self.streams) < self.max_streams
        )

    # -- asyncio.Protocol ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None and ssl_object.selected_alpn_protocol() != "h2":
            self.not_h2 = True
            self.transport.close()
            if not self.ready.done():
                self.ready.set_result(None)
            return
        h2c = self.h2
        h2c.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_SIZE,
            },
        )
        h2c.initiate_connection()
        h2c.increment_flow_control_window(CONNECTION_WINDOW - _INITIAL_WINDOW)
        self.flush()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as error:
            # h2's message may quote header fields: only the kind of error is kept.
            kind = type(error).__name__
            self.abort(UpstreamUnreachable(f"upstream broke the HTTP/2 protocol ({kind})"))
            return
        for event in events:
            self._handle(event)
        self.flush()

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._cancel_idle_timer()
        self._tracker.forget(self)
        if not self.ready.done():
            self.ready.set_exception(UpstreamUnreachable("upstream closed the connection"))
        for stream in list(self.streams.values()):
            stream.fail(UpstreamUnreachable("upstream closed the connection"))
        self.streams.clear()
        if not self.lost.done():
            self.lost.set_result(None)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        for stream in list(self.streams.values()):
            stream.on_window()

    # -- events --------------------------------------------------------------------

    def _handle(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.DataReceived):
            stream = self.streams.get(event.stream_id or 0)
            size = event.flow_controlled_length or 0
            if stream is None:
                self.acknowledge(event.stream_id or 0, size)
            else:
                stream.on_data(event.data or b"", size)
                if event.stream_ended is not None:
                    self._ended(stream)
        elif isinstance(event, h2.events.ResponseReceived):
            stream = self.streams.get(event.stream_id or 0)
            if stream is not None:
                try:
                    stream.on_head(event.headers or [])
                except UpstreamUnreachable as error:
                    self.reset_stream(stream.stream_id, CANCEL)
                    stream.fail(error)
                    return
                if event.stream_ended is not None:
                    self._ended(stream)
        elif isinstance(event, h2.events.TrailersReceived):
            stream = self.streams.get(event.stream_id or 0)
            if stream is not None:
                stream.on_trailers(event.headers or [])
                self._ended(stream)
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.get(event.stream_id or 0)
            if stream is not None:
                self._ended(stream)
        elif isinstance(event, h2.events.StreamReset):
            stream = self.streams.get(event.stream_id or 0)
            if stream is not None:
                stream.on_reset(int(event.error_code or 0))
                self.forget_stream(stream.stream_id, stream)
        elif isinstance(event, h2.events.WindowUpdated):
            if event.stream_id:
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.on_window()
            else:
                for stream in list(self.streams.values()):
                    stream.on_window()
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            if not self.ready.done():
                self._tracker.learn_capacity(
                    self.origin, int(self.h2.remote_settings.max_concurrent_streams)
                )
                self.ready.set_result(None)
                if not self.streams:
                    self._became_idle()
            for stream in list(self.streams.values()):
                stream.on_window()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._on_goaway(event.last_stream_id or 0)

    def _ended(self, stream: StreamEvents) -> None:
        stream.on_end()
        if stream.finished:
            self.forget_stream(stream.stream_id, stream)

    def _on_goaway(self, last_stream_id: int) -> None:
        self.goaway = True
        self._tracker.forget(self)
        if not self.ready.done():
            self.ready.set_exception(UpstreamUnreachable("upstream refused the connection"))
        for stream_id, stream in list(self.streams.items()):
            if stream_id > last_stream_id:
                del self.streams[stream_id]
                stream.on_not_processed()
        if not self.streams:
            self.close()

    # -- for streams ---------------------------------------------------------------

    def open_stream(self, stream: StreamEvents, headers: Headers, *, end_stream: bool) -> int:
        self._cancel_idle_timer()
        stream_id = int(self.h2.get_next_available_stream_id())
        try:
            self.h2.send_headers(stream_id, headers, end_stream=end_stream)
        except h2.exceptions.TooManyStreamsError:
            raise UpstreamUnreachable("the upstream connection has no room for a stream") from None
        except h2.exceptions.ProtocolError:
            # Not h2's message: it may quote a field, and the fields carry the token.
            raise BadRequest("the request's header fields cannot be sent in HTTP/2") from None
        self.streams[stream_id] = stream
        self.flush_soon()
        return stream_id

    def send_window(self, stream_id: int) -> int | None:
        """How many bytes the stream may send in one frame now; None once it is closed."""
        try:
            window = self.h2.local_flow_control_window(stream_id)
        except h2.exceptions.StreamClosedError:
            return None
        return min(window, self.h2.max_outbound_frame_size)

    def send_data(self, stream_id: int, data: bytes) -> None:
        self.h2.send_data(stream_id, data)
        if len(data) >= _WRITE_AT_ONCE:
            self.flush()  # so that the transport's pause_writing is seen in time
        else:
            self.flush_soon()

    def end_stream(self, stream_id: int, trailers: Headers | None) -> None:
        try:
            if trailers:
                self.h2.send_headers(stream_id, trailers, end_stream=True)
            else:
                self.h2.end_stream(stream_id)
        except h2.exceptions.StreamClosedError:
            return
        self.flush_soon()

    def acknowledge(self, stream_id: int, size: int) -> None:
        if size and not self.closed:
            self.h2.acknowledge_received_data(size, stream_id)
            self.flush_soon()

    def reset_stream(self, stream_id: int, error_code: int) -> None:
        try:
            self.h2.reset_stream(stream_id, error_code)
        except h2.exceptions.StreamClosedError:
            return
        self.flush_soon()

    def forget_stream(self, stream_id: int, stream: StreamEvents) -> None:
        if self.streams.get(stream_id) is stream:
            del self.streams[stream_id]
            if not self.streams:
                self._became_idle()

    # -- lifecycle -----------------------------------------------------------------

    def flush(self) -> None:
        """Write what h2 has to send now."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.closed:
            self.transport.write(data)

    def flush_soon(self) -> None:
        """Write what h2 has to send once this turn of the event loop is over.

        A call's HEADERS, DATA and END_STREAM (and other streams' frames meanwhile)
        then leave in one write, one system call, instead of one each.
        """
        if self._flush_handle is None:
            self._flush_handle = self._loop.call_soon(self.flush)

    def _became_idle(self) -> None:
        if self.goaway:
            self.close()
        elif not self.closed:
            self._cancel_idle_timer()
            self._idle_timer = self._loop.call_later(UPSTREAM_IDLE_TIMEOUT, self._idle_timeout)

    def _idle_timeout(self) -> None:
        self._idle_timer = None
        if not self.streams:
            self.close()

    def _cancel_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def close(self) -> None:
        """GOAWAY, then close; streams still open fail."""
        self._cancel_idle_timer()
        self._tracker.forget(self)
        if self.transport is None or self.closed:
            return
        if not self.not_h2:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.h2.close_connection()
            self.flush()
        self.closed = True
        self.transport.close()

    def abort(self, error: ProxyError) -> None:
        for stream in list(self.streams.values()):
            stream.fail(error)
        if not self.ready.done():
            self.ready.set_exception(error)
        self.closed = True
        self._tracker.forget(self)
        if self.transport is not None:
            self.transport.abort()
