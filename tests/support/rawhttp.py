"""Raw-socket HTTP/1.1 for the hardening tests: the bytes well-behaved clients refuse to send.

* `RawClient` is one TCP connection to a proxy port. It writes exactly the bytes it is
  given, reads the proxy's responses with llhttp (httptools) one message at a time, and
  tells whether the proxy closed the connection (`closed()`), so a test can assert both
  the answer and what became of the connection.
* `EvilUpstream` is a TCP server on 127.0.0.1 whose answers are scripted per connection:
  malformed heads, stalls mid-head or mid-body, resets. It records every request head
  that reached it and whether the proxy closed its side afterwards.
* `open_fds()`, `task_count()`, `settle()` and `healthz_seconds()` measure that a case
  left nothing behind: descriptors and tasks back at their baseline, `/healthz` fast.

Everything here talks to 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httptools

# --------------------------------------------------------------------------------------
# Client side
# --------------------------------------------------------------------------------------


@dataclass
class RawResponse:
    """One response message as it arrived on the wire (1xx interim ones included)."""

    status: int = 0
    reason: bytes = b""
    version: str = ""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    complete: bool = False  # False: the connection ended before the message did

    def header(self, name: str) -> str | None:
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        wanted = name.lower().encode("latin-1")
        return [v.decode("latin-1") for k, v in self.headers if k.lower() == wanted]

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error(self) -> str | None:
        """The `error` code of one of the proxy's own JSON answers, else None."""
        if self.header("Content-Type") != "application/json":
            return None
        try:
            document = self.json()
        except ValueError:
            return None
        return document.get("error") if isinstance(document, dict) else None


class ProtocolViolation(AssertionError):
    """The proxy sent bytes that are not a valid HTTP/1.1 response."""


class RawClient:
    """One raw TCP connection to a proxy port."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._parser = httptools.HttpResponseParser(self)
        self._ready: deque[RawResponse] = deque()
        self._current: RawResponse | None = None
        self._framed = False
        self._body = bytearray()
        self.eof = False
        self.was_reset = False
        self.received = bytearray()

    @classmethod
    async def connect(cls, port: int, host: str = "127.0.0.1") -> RawClient:
        reader, writer = await asyncio.open_connection(host, port, limit=2**22)
        return cls(reader, writer)

    async def __aenter__(self) -> RawClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- sending ---------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        if not self._writer.is_closing():
            self._writer.write(data)

    async def send_drained(self, data: bytes) -> None:
        """Write `data` and wait until it left our buffer (or the proxy hung up)."""
        self.send(data)
        with contextlib.suppress(ConnectionError):
            await self._writer.drain()

    def reset(self) -> None:
        """Abort the connection with a TCP RST (SO_LINGER 0), as a killed client might."""
        _reset(self._writer)
        self.eof = True

    def half_close(self) -> None:
        """Send FIN: the client will write nothing more (a read is still possible)."""
        if self._writer.can_write_eof():
            self._writer.write_eof()

    # -- receiving -------------------------------------------------------------------

    async def response(self, within: float = 10.0) -> RawResponse:
        """The next whole response message; AssertionError if none arrives in time."""
        deadline = time.monotonic() + within
        while not self._ready:
            if self.eof:
                if self._current is not None:
                    partial, self._current = self._current, None
                    partial.body = bytes(self._body)
                    return partial
                raise AssertionError(
                    f"connection closed without a response; got {bytes(self.received)[:300]!r}"
                )
            await self._read_more(deadline)
        return self._ready.popleft()

    async def final_response(self, within: float = 10.0) -> RawResponse:
        """The next response that is not a 1xx interim one."""
        deadline = time.monotonic() + within
        while True:
            message = await self.response(max(deadline - time.monotonic(), 0.01))
            if not 100 <= message.status < 200 or message.status == 101:
                return message

    async def closed(self, within: float = 5.0) -> bool:
        """Whether the proxy ends the connection within `within` seconds.

        Whatever arrives meanwhile is parsed and kept for `response()`.
        """
        deadline = time.monotonic() + within
        while not self.eof:
            try:
                await self._read_more(deadline)
            except AssertionError:
                return False
        return True

    async def silent_for(self, seconds: float) -> bool:
        """True if nothing at all arrives (and the connection stays open) for `seconds`."""
        before = len(self.received)
        closed = await self.closed(seconds)
        return not closed and len(self.received) == before

    async def _read_more(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(
                f"no complete response in time; got {bytes(self.received)[:300]!r}"
            )
        try:
            data = await asyncio.wait_for(self._reader.read(65536), remaining)
        except TimeoutError:
            raise AssertionError(
                f"no complete response in time; got {bytes(self.received)[:300]!r}"
            ) from None
        except ConnectionError:
            self.was_reset = True
            data = b""
        if not data:
            self._on_eof()
            return
        self.received += data
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # 101 or a CONNECT 200: the rest is not HTTP any more
        except httptools.HttpParserError as exc:
            raise ProtocolViolation(f"{exc}: {bytes(self.received)[:300]!r}") from None

    def _on_eof(self) -> None:
        self.eof = True
        current = self._current
        if current is not None and current.status and not self._framed:
            # RFC 9112 §6.3: a response without framing ends when the connection does.
            current.body = bytes(self._body)
            current.complete = True
            self._ready.append(current)
            self._current = None

    # -- llhttp callbacks ------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._current = RawResponse()
        self._body = bytearray()
        self._framed = False

    def on_status(self, reason: bytes) -> None:
        assert self._current is not None
        self._current.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self._current is not None
        self._current.headers.append((name, value))

    def on_headers_complete(self) -> None:
        current = self._current
        assert current is not None
        current.status = self._parser.get_status_code()
        current.version = self._parser.get_http_version()
        names = {name.lower() for name, _ in current.headers}
        self._framed = (
            b"content-length" in names
            or b"transfer-encoding" in names
            or current.status in (204, 304)
            or 100 <= current.status < 200
        )

    def on_body(self, data: bytes) -> None:
        self._body += data

    def on_message_complete(self) -> None:
        current = self._current
        assert current is not None
        current.body = bytes(self._body)
        current.complete = True
        self._ready.append(current)
        self._current = None

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.wait_closed()


async def roundtrip(
    port: int, data: bytes, within: float = 10.0, *, close_within: float = 2.0
) -> tuple[RawResponse, bool]:
    """Send `data` on a new connection: the first final response, and whether the proxy
    closed the connection within `close_within` seconds after it (0: don't wait)."""
    async with await RawClient.connect(port) as client:
        client.send(data)
        response = await client.final_response(within)
        closed = client.eof or (close_within > 0 and await client.closed(close_within))
        return response, closed


# --------------------------------------------------------------------------------------
# Upstream side
# --------------------------------------------------------------------------------------


class EvilConnection:
    """One connection the proxy opened to the `EvilUpstream`."""

    def __init__(
        self, index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.index = index
        self.reader = reader
        self.writer = writer
        self.heads: list[bytes] = []
        self._head_arrived = asyncio.Condition()
        self.rest = bytearray()  # what arrived after the heads, read by until_peer_closes()
        self.peer_closed = asyncio.Event()  # the proxy closed or reset its side

    async def read_head(self, within: float = 10.0) -> bytes:
        """The next request head (through the blank line); records it."""
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), within)
        self.heads.append(head)
        async with self._head_arrived:
            self._head_arrived.notify_all()
        return head

    async def until_heads(self, count: int, within: float = 5.0) -> None:
        """Until `count` request heads have arrived on this connection."""
        async with asyncio.timeout(within), self._head_arrived:
            await self._head_arrived.wait_for(lambda: len(self.heads) >= count)

    async def read_exactly(self, size: int, within: float = 10.0) -> bytes:
        return await asyncio.wait_for(self.reader.readexactly(size), within)

    def send(self, data: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(data)

    async def closed_by_proxy(self, within: float = 5.0) -> bool:
        """Whether the proxy closes this connection within `within` seconds."""
        try:
            await asyncio.wait_for(self.peer_closed.wait(), within)
        except TimeoutError:
            return False
        return True

    def reset(self) -> None:
        """Abort with a TCP RST (SO_LINGER 0)."""
        _reset(self.writer)

    def close(self) -> None:
        self.writer.close()

    async def until_peer_closes(self, within: float) -> bool:
        """Read whatever the proxy sends (kept in `rest`) until it closes; True if it did."""
        deadline = time.monotonic() + within
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                data = await asyncio.wait_for(self.reader.read(65536), remaining)
            except TimeoutError:
                return False
            except ConnectionError:
                data = b""
            if not data:
                self.peer_closed.set()
                return True
            self.rest += data


Behaviour = Callable[[EvilConnection], Awaitable[None]]


class EvilUpstream:
    """A scripted upstream on 127.0.0.1: connection `i` runs `behaviours[i]` (the last
    one repeats). After its behaviour a connection waits for the proxy to close it."""

    def __init__(self, *behaviours: Behaviour, linger: float = 30.0) -> None:
        assert behaviours, "give at least one behaviour"
        self.behaviours: Sequence[Behaviour] = behaviours
        self.linger = linger
        self.connections: list[EvilConnection] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._arrived = asyncio.Event()
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def heads(self) -> list[bytes]:
        """Every request head that reached this upstream, in order."""
        return [head for conn in self.connections for head in conn.heads]

    async def __aenter__(self) -> EvilUpstream:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0, limit=2**22)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        # Aborting ends every behaviour's read, so each connection's task finishes itself
        # (a cancelled one would be reported by asyncio's stream callback).
        for conn in self.connections:
            conn.writer.transport.abort()
        tasks = list(self._tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=5.0)
            for task in pending:
                task.cancel()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def connection(self, index: int, within: float = 10.0) -> EvilConnection:
        """The `index`th connection, once the proxy has opened it."""
        deadline = time.monotonic() + within
        while len(self.connections) <= index:
            self._arrived.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"the proxy opened only {len(self.connections)} connections")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)
        return self.connections[index]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn = EvilConnection(len(self.connections), reader, writer)
        self.connections.append(conn)
        self._arrived.set()
        behaviour = self.behaviours[min(conn.index, len(self.behaviours) - 1)]
        try:
            await behaviour(conn)
            if not writer.is_closing():
                await conn.until_peer_closes(self.linger)
            else:
                # The behaviour closed its side: what it wrote must go out before the
                # abort below, which would drop whatever is still buffered.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(writer.wait_closed(), self.linger)
                conn.peer_closed.set()
        except (
            ConnectionError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            TimeoutError,
        ):
            conn.peer_closed.set()
        finally:
            writer.transport.abort()
            self._tasks.discard(task)


def answer(raw: bytes, *, then_close: bool = False) -> Behaviour:
    """Read one request head, send `raw` (any bytes at all), then keep or close."""

    async def behaviour(conn: EvilConnection) -> None:
        await conn.read_head()
        conn.send(raw)
        await conn.writer.drain()
        if then_close:
            conn.close()

    return behaviour


def answer_each(raw: bytes) -> Behaviour:
    """Answer every request on the connection with `raw` (a keep-alive upstream)."""

    async def behaviour(conn: EvilConnection) -> None:
        while True:
            try:
                await conn.read_head(within=60.0)
            except asyncio.IncompleteReadError:
                conn.peer_closed.set()
                return
            conn.send(raw)
            await conn.writer.drain()

    return behaviour


def stall(raw: bytes = b"") -> Behaviour:
    """Read one request head, send `raw` (perhaps a head, or a head and part of a body),
    then say nothing more; the proxy's timeout has to end it."""
    return answer(raw)


def reset_after_head(raw: bytes = b"") -> Behaviour:
    """Read one request head, send `raw`, then reset the connection."""

    async def behaviour(conn: EvilConnection) -> None:
        await conn.read_head()
        if raw:
            conn.send(raw)
            await conn.writer.drain()
        conn.reset()

    return behaviour


def close_at_once() -> Behaviour:
    """Accept, then close without reading anything (a restarting upstream)."""

    async def behaviour(conn: EvilConnection) -> None:
        conn.close()

    return behaviour


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def has_header(head: bytes, name: bytes) -> bool:
    """Whether a raw request head carries a field named `name` (case-insensitive)."""
    lines = head.split(b"\r\n")[1:]
    wanted = name.lower() + b":"
    return any(line.lower().startswith(wanted) for line in lines)


# --------------------------------------------------------------------------------------
# Leaving nothing behind
# --------------------------------------------------------------------------------------


def open_fds(pid: int | None = None) -> int:
    """How many file descriptors `pid` (default: this process) has open (Linux)."""
    return len(os.listdir(f"/proc/{pid if pid is not None else 'self'}/fd"))


def task_count() -> int:
    """Unfinished asyncio tasks on the running loop, the caller's own excluded."""
    current = asyncio.current_task()
    return sum(1 for task in asyncio.all_tasks() if task is not current and not task.done())


async def settle(
    measure: Callable[[], int], baseline: int, *, slack: int = 0, within: float = 10.0
) -> int:
    """Poll `measure()` until it is at most `baseline + slack`; AssertionError otherwise."""
    deadline = time.monotonic() + within
    value = measure()
    while value > baseline + slack:
        if time.monotonic() > deadline:
            raise AssertionError(f"still {value} after {within}s (baseline {baseline})")
        await asyncio.sleep(0.05)
        value = measure()
    return value


# What a healthy proxy answers /healthz within, on a loaded machine.
HEALTHZ_FAST = 0.5


async def healthz_seconds(admin_port: int, within: float = 5.0, best_of: int = 3) -> float:
    """The shortest time of `best_of` raw `GET /healthz` on the admin port, one after the
    other; AssertionError unless each answers 200. A proxy that is stuck is slow every
    time, a machine that stalls once is not."""
    times = []
    for _ in range(best_of):
        started = time.monotonic()
        async with await RawClient.connect(admin_port) as client:
            client.send(b"GET /healthz HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
            response = await client.final_response(within)
        assert response.status == 200, response
        times.append(time.monotonic() - started)
    return min(times)
