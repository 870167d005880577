"""Protection of the HTTP/2 server connection against the known HTTP/2 floods.

`FrameGuard` reads the frame headers of what a client sends, ahead of h2, and raises
`Flood` when a client asks for work it is not allowed to ask for. h2 itself bounds a
frame's size (`max_inbound_frame_size`), a decoded header list (hpack's
`max_header_list_size`, answered with ENHANCE_YOUR_CALM) and a header block to 64
CONTINUATION frames; what it leaves open is bounded here:

* a header block's encoded bytes before END_HEADERS (CONTINUATION flood, 2024): the
  server gives the bound (twice the decoded list's: HPACK spends at most a few bytes
  per field beyond its name and value, less than the 32 the list size counts, and a
  Huffman-coded string may come out longer than it went in);
* client resets (rapid reset, CVE-2023-44487): each reset stream may have cost a token
  lookup and an upstream stream; at most `RESETS_PER_WINDOW` per `WINDOW_SECONDS`
  (Netty's default bound for the same attack);
* frames the server must answer or process without any request behind them: SETTINGS
  and PING (each wants an acknowledgement), PRIORITY, and empty DATA frames without
  END_STREAM (CVE-2019-9512, -9513, -9515, -9518): at most `CONTROL_FRAMES_PER_WINDOW`.

A flood ends the connection with GOAWAY ENHANCE_YOUR_CALM (RFC 9113 §7). Counting is
per fixed window: cheap, and an attacker gains at most one window's worth twice over.

The client's GOAWAY frames are read here too, and kept from h2 (see `inspect`).
"""

from __future__ import annotations

from typing import Final

# RFC 9113 §3.4: the client connection preface, ahead of the first frame.
PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

WINDOW_SECONDS: Final = 10.0
CONTROL_FRAMES_PER_WINDOW: Final = 1000
RESETS_PER_WINDOW: Final = 200

_FRAME_HEADER: Final = 9
_DATA: Final = 0x0
_HEADERS: Final = 0x1
_PRIORITY: Final = 0x2
_RST_STREAM: Final = 0x3
_SETTINGS: Final = 0x4
_PING: Final = 0x6
_GOAWAY: Final = 0x7
_CONTINUATION: Final = 0x9
_END_STREAM: Final = 0x1
_ACK: Final = 0x1
_END_HEADERS: Final = 0x4


class Flood(Exception):
    """The client exceeded a bound; the message says which (sent as GOAWAY debug data)."""


class FrameGuard:
    """Counts what one client connection sends, by frame header, before h2 reads it."""

    def __init__(
        self,
        *,
        max_header_block: int,
        now: float,
        control_frames: int = CONTROL_FRAMES_PER_WINDOW,
        resets: int = RESETS_PER_WINDOW,
        window: float = WINDOW_SECONDS,
    ) -> None:
        self._max_header_block = max_header_block
        self._control_limit = control_frames
        self._reset_limit = resets
        self._window = window
        self._window_start = now
        self._control_frames = 0
        self._resets = 0
        self._preface_left = len(PREFACE)
        self._pending = b""  # an incomplete frame header
        self._skip = 0  # payload bytes of the current frame still to come
        self._block_bytes = 0  # of the header block under way
        self._goaway_left = 0  # payload bytes of a client's GOAWAY still to come
        self._goaway_payload = b""
        # The client's last GOAWAY: (last stream id, error code).
        self.goaway: tuple[int, int] | None = None
        # When the header block under way began (None: none is): a client may not hold
        # one open for longer than a request head may take.
        self.header_block_since: float | None = None

    def inspect(self, data: bytes, now: float) -> bytes:
        """Account for `data` (what the client sent next); `Flood` past a bound.

        Returns the bytes for h2: `data` without the client's GOAWAY frames, which are
        read here (`goaway`): h2 stops taking frames and sending data once it has seen
        one, where RFC 9113 §6.8 has the streams up to its last stream id carry on. An
        incomplete frame header at the end is held back until the rest of it comes.
        """
        if now - self._window_start >= self._window:
            self._window_start = now
            self._control_frames = 0
            self._resets = 0
        if self._pending:
            data = self._pending + data
            self._pending = b""
        offset = 0
        size = len(data)
        if self._preface_left:
            taken = min(self._preface_left, size)
            self._preface_left -= taken
            offset = taken  # h2 checks the preface's bytes
        pieces: list[bytes] = []
        keep_from = 0  # the start of the bytes kept since the last piece cut out
        while offset < size:
            if self._skip:
                taken = min(self._skip, size - offset)
                if self._goaway_left:
                    if len(self._goaway_payload) < 8:  # the debug data is not read
                        self._goaway_payload += data[offset : offset + min(taken, 8)]
                    self._goaway_left -= taken
                    if not self._goaway_left:
                        self._read_goaway()
                    pieces.append(data[keep_from:offset])
                    keep_from = offset + taken
                self._skip -= taken
                offset += taken
                continue
            if size - offset < _FRAME_HEADER:
                self._pending = data[offset:]
                pieces.append(data[keep_from:offset])
                keep_from = size
                break
            start = offset
            length = int.from_bytes(data[offset : offset + 3], "big")
            kind = data[offset + 3]
            offset += _FRAME_HEADER
            self._skip = length
            if kind == _GOAWAY:
                pieces.append(data[keep_from:start])
                keep_from = offset
                self._goaway_left = length
                if not length:
                    self._read_goaway()
                continue
            self._frame(kind, data[start + 4], length, now)
        if not pieces:
            return data
        pieces.append(data[keep_from:])
        return b"".join(pieces)

    def _read_goaway(self) -> None:
        payload = self._goaway_payload
        self._goaway_payload = b""
        if len(payload) >= 8:
            last_stream_id = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
            self.goaway = (last_stream_id, int.from_bytes(payload[4:8], "big"))

    def _frame(self, kind: int, flags: int, length: int, now: float) -> None:
        if kind == _HEADERS or (kind == _CONTINUATION and self.header_block_since is not None):
            if kind == _HEADERS:
                self._block_bytes = 0
                self.header_block_since = now
            self._block_bytes += length
            if self._block_bytes > self._max_header_block:
                raise Flood("header block too large")
            if flags & _END_HEADERS:
                self.header_block_since = None
                self._block_bytes = 0
            return
        if kind == _RST_STREAM:
            self._resets += 1
            if self._resets > self._reset_limit:
                raise Flood("too many stream resets")
            return
        if (
            (kind in (_SETTINGS, _PING) and not flags & _ACK)
            or kind == _PRIORITY
            or (kind == _DATA and length == 0 and not flags & _END_STREAM)
        ):
            self._control_frames += 1
            if self._control_frames > self._control_limit:
                raise Flood("too many control frames")
