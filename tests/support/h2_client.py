"""A raw HTTP/2 client over a socket, for tests that send what well-behaved clients never
do: h2's client state machine for the frames it allows, hyperframe's serialisation for
the rest, and a reader that reports every frame the server sent until it closed."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.settings
from hyperframe.frame import Frame, GoAwayFrame, RstStreamFrame

READ_LIMIT = 64 * 1024 * 1024  # bytes read before a test's reader gives up
OPEN_WITHIN = 10.0


@dataclass
class Received:
    """What the server sent: its frames, in order, and whether it closed the connection."""

    frames: list[Frame] = field(default_factory=list)
    closed: bool = False

    def goaway(self) -> GoAwayFrame | None:
        found = [frame for frame in self.frames if isinstance(frame, GoAwayFrame)]
        return found[-1] if found else None

    def resets(self) -> dict[int, int]:
        """RST_STREAM error codes by stream id."""
        return {f.stream_id: f.error_code for f in self.frames if isinstance(f, RstStreamFrame)}


class RawH2:
    """An h2c (prior knowledge) client connection to `127.0.0.1:port`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.received = Received()
        self.events: list[h2.events.Event] = []  # every event read so far
        self._buffer = b""
        self._read_bytes = 0

    @classmethod
    async def open(cls, port: int, *, initial_window: int | None = None) -> RawH2:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = cls(reader, writer)
        if initial_window is not None:
            client.h2.local_settings = h2.settings.Settings(
                client=True,
                initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: initial_window},
            )
        client.h2.initiate_connection()
        client.flush()
        # The server's SETTINGS first: what the test sends next is then read apart from
        # the preface (a reverse port keeps only the first bytes of the read that
        # brought the preface, see `proxy.datapath.http2.front`).
        async with asyncio.timeout(OPEN_WITHIN):
            while not any(
                isinstance(event, h2.events.RemoteSettingsChanged)
                for event in await client.read_events()
            ):
                if client.received.closed:
                    raise ConnectionError("closed before its SETTINGS")
        return client

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.writer.write(data)

    def write_frames(self, *frames: Frame) -> None:
        """Frames serialised as given, past h2's own checks."""
        self.writer.write(b"".join(frame.serialize() for frame in frames))

    def request(self, path: bytes, *, end_stream: bool = True, grpc: bool = False) -> int:
        stream_id = int(self.h2.get_next_available_stream_id())
        headers = [
            (b":method", b"POST" if grpc else b"GET"),
            (b":scheme", b"http"),
            (b":authority", b"inventory.internal"),
            (b":path", path),
        ]
        if grpc:
            headers += [(b"content-type", b"application/grpc"), (b"te", b"trailers")]
        self.h2.send_headers(stream_id, headers, end_stream=end_stream)
        self.flush()
        return stream_id

    async def read_events(self) -> list[h2.events.Event]:
        """The events of the next bytes the server sends ([] once it has closed)."""
        data = await self.reader.read(65536)
        if not data:
            self.received.closed = True
            return []
        self._note_frames(data)
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            events = []  # what the test sent has broken the client's view of the state
        if any(isinstance(event, h2.events.ConnectionTerminated) for event in events):
            # h2 takes no frame after a GOAWAY; the streams up to its last stream id
            # still end (RFC 9113 §6.8), which is what the tests look at.
            self.h2.state_machine.state = h2.connection.ConnectionState.CLIENT_OPEN
        self.events += events
        self.flush()
        return events

    async def until_closed(self, within: float) -> Received:
        """Every frame until the server closes the connection (or fail after `within`)."""
        async with asyncio.timeout(within):
            while not self.received.closed and self._read_bytes < READ_LIMIT:
                await self.read_events()
        return self.received

    def _note_frames(self, data: bytes) -> None:
        self._read_bytes += len(data)
        buffer = self._buffer + data
        if not self.received.frames and buffer.startswith(b"PRI"):
            buffer = buffer[24:]
        while len(buffer) >= 9:
            frame, length = Frame.parse_frame_header(memoryview(buffer[:9]))
            if len(buffer) < 9 + length:
                break
            frame.parse_body(memoryview(buffer[9 : 9 + length]))
            self.received.frames.append(frame)
            buffer = buffer[9 + length :]
        self._buffer = buffer

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()
