"""HTTP/2 to upstreams: the connections of each origin, and the streams opened on them.

`Http2Upstreams` (one per forwarder) keeps the `Http2Connection`s
(`upstream_connection.py`) of each `Origin`: TLS with ALPN `h2`, or cleartext with
prior knowledge (h2c). A new stream goes on a connection below the peer's
SETTINGS_MAX_CONCURRENT_STREAMS; when every one is full another is opened. A connection
that received GOAWAY takes no new stream: its streams up to the GOAWAY's last stream id
finish, the ones above it were never processed and are sent again on another
connection (as are streams refused with REFUSED_STREAM) provided everything sent on
them is still held (`REPLAY_LIMIT`). A connection without streams closes after
`UPSTREAM_IDLE_TIMEOUT`; a lost one is forgotten.

`UpstreamStream` is one request/response exchange, and buffers nothing without bound:

* received DATA is acknowledged (handed back to the upstream's flow-control window)
  only when `read()` returns it, so a consumer that reads slowly slows the upstream;
* `send_data` sends no more than the upstream's window and frame size allow, and waits
  for WINDOW_UPDATE, and for the transport to drain when asyncio paused writing.

The caller reads a stream to its end (`read()` returning None) or calls `reset()`:
bytes nobody read are otherwise never handed back to the connection's window. A
trailers-only response (how gRPC answers most errors) has its `grpc-status` in the
head's fields, and `trailers` stays None.

Failures are the proxy's own errors: `UpstreamUnreachable` (connection failed or lost,
protocol error, RST_STREAM from the upstream, which also sets `reset_code`) and
`UpstreamTimeout` (connecting took longer than `connect_timeout`, or a stream waiting
for the upstream heard nothing from it for `read_timeout`).

A TLS origin is offered `h2` through `http2_context` of its context (the same trust and
client certificate; the context itself, shared with HTTP/1.1, offers nothing). One that
does not select `h2` fails `open_stream` with `UpstreamUnreachable`; `connect()`
answers None for it instead, so that a caller (`http2: auto`) can fall back to
HTTP/1.1; that answer is remembered for `HTTP2_ALPN_RECHECK`.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from typing import Final

from proxy.datapath.http2.upstream_connection import (
    CANCEL,
    REFUSED_STREAM,
    Headers,
    Http2Connection,
)
from proxy.datapath.timeouts import HTTP2_ALPN_RECHECK, UPSTREAM_CLOSE_WAIT
from proxy.datapath.upstream_connection import Origin
from proxy.errors import ProxyError, UpstreamTimeout, UpstreamUnreachable
from proxy.tls.client_context import http2_context

__all__ = ["Http2Upstreams", "UpstreamStream"]

# A connection's capacity is unknown until the peer's first SETTINGS: how many streams
# may wait for a connection being opened, until one of the origin's has told us.
ASSUMED_MAX_CONCURRENT_STREAMS: Final = 100
# Request bytes kept per stream until the upstream answers, so that a stream it did not
# process (GOAWAY, REFUSED_STREAM) can be sent again; a longer request is not retried.
REPLAY_LIMIT: Final = 32 * 1024
# Times a stream is sent again after the upstream did not process it.
MAX_REPLAYS: Final = 2
# Rounds of "wait for a connection being opened, find it full" before giving up.
MAX_CONNECT_ROUNDS: Final = 8


def _status(headers: Headers) -> int:
    for name, value in headers:
        if name == b":status":
            return int(value)
    raise UpstreamUnreachable("response from upstream without :status")


def _wake_one(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class UpstreamStream:
    """One request/response exchange on an HTTP/2 upstream connection."""

    def __init__(
        self,
        upstreams: Http2Upstreams,
        origin: Origin,
        headers: Headers,
        *,
        connect_timeout: float,
        read_timeout: float,
    ) -> None:
        self._upstreams = upstreams
        self._origin = origin
        self._headers = headers
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._loop = asyncio.get_running_loop()
        self._connection: Http2Connection | None = None
        self.stream_id = 0
        self.trailers: Headers | None = None
        self.reset_code: int | None = None
        self._head: tuple[int, Headers] | None = None
        self._chunks: deque[tuple[bytes, int]] = deque()
        self._unread = 0
        self._remote_ended = False
        self._local_ended = False
        self._end_trailers: Headers | None = None
        self._error: ProxyError | None = None
        self._waiters: list[asyncio.Future[None]] = []
        self._active_at = self._loop.time()
        # Everything sent after the head, while it may still have to be sent again.
        self._replay: list[bytes] | None = []
        self._replay_size = 0
        self._refused = False
        self._replays = 0
        self._replay_lock: asyncio.Lock | None = None

    # -- for the consumer ----------------------------------------------------------

    @property
    def buffered(self) -> int:
        """Received DATA bytes that `read()` has not returned yet."""
        return self._unread

    async def send_data(self, data: bytes) -> None:
        """Send `data`, as the upstream's flow-control window and the transport allow."""
        view = memoryview(data)
        offset = 0
        self._active_at = self._loop.time()
        while offset < len(view):
            await self._proceed()
            if self._remote_ended and self._connection_closed():
                return  # answered and closed: the rest of the request is not wanted
            connection = self._connection
            assert connection is not None
            window = self._window(connection)
            if window <= 0 or connection.write_paused:
                await self._wait()
                continue
            chunk = bytes(view[offset : offset + window])
            self._send(connection, chunk)
            offset += len(chunk)

    async def end(self, trailers: Headers | None = None) -> None:
        """End the request, with `trailers` if given."""
        if self._local_ended:
            return
        await self._proceed()
        self._local_ended = True
        self._end_trailers = trailers
        if self._connection_closed():
            return
        connection = self._connection
        assert connection is not None
        self._send_end(connection)

    async def response_head(self) -> tuple[int, Headers]:
        """The response's status and header fields (without pseudo-headers)."""
        self._active_at = self._loop.time()
        while self._head is None:
            await self._proceed()
            if self._head is None:
                await self._wait()
        return self._head

    async def read(self) -> bytes | None:
        """The DATA received since the last call (waiting for some); None at the end."""
        self._active_at = self._loop.time()
        while True:
            if self._chunks:
                return self._take_chunks()
            if self._remote_ended:
                return None
            await self._proceed()
            if not self._chunks and not self._remote_ended:
                await self._wait()

    def reset(self, error_code: int = CANCEL) -> None:
        """Abandon the stream: RST_STREAM to the upstream, unread bytes handed back."""
        connection = self._connection
        if self._error is None:
            self._error = UpstreamUnreachable("the stream was reset by the proxy")
        self._refused = False
        if connection is not None:
            if not connection.closed and not (self._remote_ended and self._local_ended):
                connection.reset_stream(self.stream_id, error_code)
            self._release(connection, drop_unread=True)
        self._wake()

    # -- for the connection --------------------------------------------------------

    def on_head(self, headers: Headers) -> None:
        self._active_at = self._loop.time()
        self._replay = None
        status = _status(headers)
        fields = [(name, value) for name, value in headers if not name.startswith(b":")]
        self._head = (status, fields)
        self._wake()

    def on_data(self, data: bytes, flow_controlled: int) -> None:
        self._active_at = self._loop.time()
        self._chunks.append((data, flow_controlled))
        self._unread += len(data)
        self._wake()

    def on_trailers(self, headers: Headers) -> None:
        self._active_at = self._loop.time()
        self.trailers = headers
        self._wake()

    def on_end(self) -> None:
        self._remote_ended = True
        self._wake()

    def on_reset(self, error_code: int) -> None:
        if error_code == REFUSED_STREAM and self._head is None:
            self.on_not_processed()
            return
        if self._remote_ended:
            return  # RFC 9113 §8.1: the response is complete, the request is not wanted
        self.reset_code = error_code
        self.fail(UpstreamUnreachable(f"upstream reset the stream (error code {error_code})"))

    def on_not_processed(self) -> None:
        """The upstream did not process this stream; send it again if we still can."""
        connection = self._connection
        if connection is not None:
            self._release(connection)
        if self._replay is None or self._replays >= MAX_REPLAYS:
            self.fail(UpstreamUnreachable("upstream refused the stream"))
            return
        self._refused = True
        self._wake()

    def on_window(self) -> None:
        self._active_at = self._loop.time()
        self._wake()

    def fail(self, error: ProxyError) -> None:
        """End the stream with `error` for every waiting or later call."""
        if self._error is None:
            self._error = error
        self._refused = False
        connection = self._connection
        if connection is not None:
            self._release(connection)
        self._wake()

    @property
    def finished(self) -> bool:
        return self._remote_ended and self._local_ended

    # -- internals -----------------------------------------------------------------

    def start(self, connection: Http2Connection, *, end_stream: bool) -> None:
        """Send the head on `connection` (which has room for another stream)."""
        self._connection = connection
        self.stream_id = connection.open_stream(self, self._headers, end_stream=end_stream)
        if end_stream:
            self._local_ended = True

    async def _proceed(self) -> None:
        """Raise the stream's failure; send a stream the upstream did not process again."""
        lock = self._replay_lock
        if self._refused or (lock is not None and lock.locked()):
            if lock is None:
                lock = self._replay_lock = asyncio.Lock()
            # One caller sends the stream again; the others wait for it to be done.
            async with lock:
                if self._refused:
                    await self._send_again()
        if self._error is not None and not (self._remote_ended and self._head is not None):
            raise self._error

    async def _send_again(self) -> None:
        replay = self._replay
        assert replay is not None
        self._replays += 1
        try:
            connection = await self._upstreams.connect(
                self._origin, connect_timeout=self._connect_timeout
            )
        except ProxyError as error:
            self.fail(error)
            return
        if connection is None:
            self.fail(UpstreamUnreachable("upstream no longer offers HTTP/2"))
            return
        nothing_follows = self._local_ended and not replay and self._end_trailers is None
        self.start(connection, end_stream=nothing_follows)
        self._refused = False
        self._active_at = self._loop.time()
        # `_replay` keeps holding all of it, in case this stream is refused as well.
        for chunk in replay:
            view = memoryview(chunk)
            offset = 0
            while offset < len(view):
                if self._error is not None or self._refused:
                    return
                window = self._window(connection)
                if window <= 0 or connection.write_paused:
                    await self._wait()
                    continue
                piece = bytes(view[offset : offset + window])
                connection.send_data(self.stream_id, piece)
                offset += len(piece)
        if self._local_ended and not nothing_follows and self._error is None:
            self._send_end(connection)

    def _window(self, connection: Http2Connection) -> int:
        window = connection.send_window(self.stream_id)
        if window is None:
            self.fail(UpstreamUnreachable("the upstream closed the stream"))
            return 0
        return window

    def _send(self, connection: Http2Connection, chunk: bytes) -> None:
        if self._replay is not None:
            self._replay_size += len(chunk)
            if self._replay_size > REPLAY_LIMIT:
                self._replay = None
            else:
                self._replay.append(chunk)
        self._active_at = self._loop.time()
        connection.send_data(self.stream_id, chunk)

    def _send_end(self, connection: Http2Connection) -> None:
        connection.end_stream(self.stream_id, self._end_trailers)
        if self._remote_ended:
            self._release(connection)

    def _connection_closed(self) -> bool:
        connection = self._connection
        return connection is None or connection.closed or self.stream_id not in connection.streams

    def _take_chunks(self) -> bytes:
        chunks = self._chunks
        if len(chunks) == 1:
            data, flow_controlled = chunks.popleft()
        else:
            flow_controlled = 0
            parts = []
            while chunks:
                part, size = chunks.popleft()
                parts.append(part)
                flow_controlled += size
            data = b"".join(parts)
        self._unread -= len(data)
        connection = self._connection
        if connection is not None and not connection.closed:
            connection.acknowledge(self.stream_id, flow_controlled)
        return data

    def _release(self, connection: Http2Connection, *, drop_unread: bool = False) -> None:
        """Stop receiving on this stream.

        Unread bytes of a response that cannot be read to its end any more (`drop_unread`,
        or a failure before the end) are dropped and handed back to the connection's
        window; those of a complete response stay for `read()`.
        """
        if self._chunks and (drop_unread or (self._error is not None and not self._remote_ended)):
            unread = sum(size for _, size in self._chunks)
            self._chunks.clear()
            self._unread = 0
            if not connection.closed:
                connection.acknowledge(self.stream_id, unread)
        connection.forget_stream(self.stream_id, self)

    async def _wait(self) -> None:
        """Wait to be woken; time the stream out after `read_timeout` of silence."""
        loop = self._loop
        deadline = self._active_at + self._read_timeout
        if loop.time() >= deadline:
            if self._error is None:
                self._error = UpstreamTimeout("upstream did not answer in time")
            self.reset()
            raise self._error
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append(waiter)
        timer = loop.call_at(deadline, _wake_one, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def _wake(self) -> None:
        waiters = self._waiters
        if waiters:
            self._waiters = []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)


class Http2Upstreams:
    """The HTTP/2 connections of one forwarder, per `Origin`."""

    def __init__(self) -> None:
        self._connections: dict[Origin, list[Http2Connection]] = {}
        self._capacity: dict[Origin, int] = {}
        self._http1_only: dict[Origin, float] = {}
        self._opening: set[asyncio.Task[None]] = set()
        self._all: set[Http2Connection] = set()
        self._closed = False

    def connections(self, origin: Origin) -> int:
        """How many connections to `origin` take new streams (or are being opened)."""
        return len(self._connections.get(origin, ()))

    async def open_stream(
        self,
        origin: Origin,
        headers: Headers,
        *,
        end_stream: bool,
        connect_timeout: float,
        read_timeout: float,
    ) -> UpstreamStream:
        """Send a request head on a connection to `origin`; the stream to go on with."""
        connection = await self.connect(origin, connect_timeout=connect_timeout)
        if connection is None:
            raise UpstreamUnreachable("upstream does not offer HTTP/2 (ALPN h2)")
        stream = UpstreamStream(
            self, origin, headers, connect_timeout=connect_timeout, read_timeout=read_timeout
        )
        stream.start(connection, end_stream=end_stream)
        return stream

    async def connect(self, origin: Origin, *, connect_timeout: float) -> Http2Connection | None:
        """A connection to `origin` with room for a stream now (opened if need be).

        None when the TLS peer did not select h2: the caller may speak HTTP/1.1 instead.
        """
        if self._closed:
            raise UpstreamUnreachable("the proxy is shutting down")
        loop = asyncio.get_running_loop()
        recheck_at = self._http1_only.get(origin)
        if recheck_at is not None:
            if loop.time() < recheck_at:
                return None
            del self._http1_only[origin]
        deadline = loop.time() + connect_timeout
        for _ in range(MAX_CONNECT_ROUNDS):
            connection = self._pick(origin)
            if connection is None:
                connection = self._open(origin, connect_timeout)
            elif connection.has_room():
                return connection
            connection.waiting += 1
            try:
                async with asyncio.timeout_at(deadline):
                    await asyncio.shield(connection.ready)
            except TimeoutError:
                raise UpstreamTimeout("connecting to the upstream timed out") from None
            finally:
                connection.waiting -= 1
            if connection.not_h2:
                self._http1_only[origin] = loop.time() + HTTP2_ALPN_RECHECK
                return None
            if connection.has_room():
                return connection
        raise UpstreamUnreachable("no connection to the upstream could take another stream")

    def _pick(self, origin: Origin) -> Http2Connection | None:
        """A ready connection with room, or one being opened that more may wait for."""
        opening = None
        for connection in self._connections.get(origin, ()):
            if not connection.usable():
                continue
            if connection.ready.done():
                if connection.has_room():
                    return connection
            elif opening is None and connection.waiting < connection.max_streams:
                opening = connection
        return opening

    def _open(self, origin: Origin, connect_timeout: float) -> Http2Connection:
        connection = Http2Connection(self, origin)
        self._connections.setdefault(origin, []).append(connection)
        self._all.add(connection)
        task = asyncio.get_running_loop().create_task(self._establish(connection, connect_timeout))
        self._opening.add(task)
        task.add_done_callback(self._opening.discard)
        return connection

    async def _establish(self, connection: Http2Connection, connect_timeout: float) -> None:
        origin = connection.origin
        loop = asyncio.get_running_loop()
        try:
            # Built on first use, from files (a failure is this connection's, not a hang).
            context = http2_context(origin.ssl) if origin.ssl is not None else None
            async with asyncio.timeout(connect_timeout):
                await loop.create_connection(
                    lambda: connection,
                    origin.host,
                    origin.port,
                    ssl=context,
                    server_hostname=origin.host if context is not None else None,
                )
                await asyncio.shield(connection.ready)
        except TimeoutError:
            error: ProxyError = UpstreamTimeout("connecting to the upstream timed out")
        except (OSError, ssl.SSLError) as exc:
            error = UpstreamUnreachable(f"cannot connect to the upstream: {exc}"[:200])
        except ProxyError as exc:
            error = exc
        except asyncio.CancelledError:
            if not connection.ready.done():
                connection.abort(UpstreamUnreachable("the proxy is shutting down"))
            raise
        else:
            return
        connection.abort(error)
        self._all.discard(connection)

    def assumed_capacity(self, origin: Origin) -> int:
        return self._capacity.get(origin, ASSUMED_MAX_CONCURRENT_STREAMS)

    def learn_capacity(self, origin: Origin, max_streams: int) -> None:
        self._capacity[origin] = max(1, min(max_streams, ASSUMED_MAX_CONCURRENT_STREAMS))

    def forget(self, connection: Http2Connection) -> None:
        """`connection` takes no new stream (GOAWAY, closed, lost)."""
        connections = self._connections.get(connection.origin)
        if connections is not None and connection in connections:
            connections.remove(connection)
            if not connections:
                del self._connections[connection.origin]
        if connection.closed:
            self._all.discard(connection)

    async def close(self) -> None:
        """Close every connection (GOAWAY first); streams still open fail."""
        self._closed = True
        opening = list(self._opening)
        for task in opening:
            task.cancel()
        await asyncio.gather(*opening, return_exceptions=True)
        connections = list(self._all)
        for connection in connections:
            connection.close()
        pending = [c.lost for c in connections if c.transport is not None and not c.lost.done()]
        if pending:
            _, late = await asyncio.wait(pending, timeout=UPSTREAM_CLOSE_WAIT)
            for connection in connections:
                if connection.lost in late and connection.transport is not None:
                    connection.transport.abort()
        self._all.clear()
        self._connections.clear()
