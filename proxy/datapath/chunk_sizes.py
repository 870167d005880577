"""Chunk sizes of a chunked request body, read ahead of llhttp.

llhttp checks a chunk size's value but not its length, so `00000000000000005` passes
it; a size longer than 64 bits' worth of hex digits is refused here, in the read it
arrives in, before anything is handed on (together with the head, if they came in one
read). llhttp reports no offsets, so `ChunkSizes` follows the chunked framing itself.
"""

from __future__ import annotations

from typing import Final

from proxy.errors import BadRequest

__all__ = ["MAX_CHUNK_SIZE_DIGITS", "ChunkSizes"]

# RFC 9112 §7.1 sets no limit; 16 hex digits are 64 bits, the most any parser on the way
# holds (llhttp checks the value only, so `00000000000000005` passes it).
MAX_CHUNK_SIZE_DIGITS: Final = 16
_HEX_DIGITS: Final = frozenset(b"0123456789abcdefABCDEF")
# Chunk-size line states of `ChunkSizes`.
_SIZE_LINE: Final = 0
_DATA: Final = 1
_TRAILER_LINE: Final = 2


class ChunkSizes:
    """Reads the framing of a chunked request body, ahead of llhttp, to refuse chunk
    sizes of more than `MAX_CHUNK_SIZE_DIGITS` hex digits.

    llhttp checks the syntax (and refuses what breaks it); this follows the same bytes
    from the first chunk-size line: a size line, that many bytes of data and CRLF, and
    so on to the last chunk and its trailer section, whose end it records (`end`, an
    offset in the read it ended in).
    """

    __slots__ = ("_left", "_line", "_state", "end", "finished")

    def __init__(self) -> None:
        self._state = _SIZE_LINE
        self._line = b""  # the start of a line split across reads (enough to read a size)
        self._left = 0  # data bytes and their CRLF still to come
        self.end = -1
        self.finished = False

    def scan(self, data: bytes, pos: int) -> None:
        """Follow `data` from `pos`; BadRequest at a chunk size that is too long."""
        length = len(data)
        while pos < length and not self.finished:
            if self._state == _DATA:
                step = min(self._left, length - pos)
                pos += step
                self._left -= step
                if not self._left:
                    self._state = _SIZE_LINE
                continue
            lf = data.find(b"\n", pos)
            line = self._line + data[pos : pos + MAX_CHUNK_SIZE_DIGITS + 2]
            if lf < 0:
                self._line = line[: MAX_CHUNK_SIZE_DIGITS + 2]
                return
            line = line[: len(self._line) + lf + 1 - pos]
            self._line = b""
            pos = lf + 1
            if self._state == _TRAILER_LINE:
                if line == b"\r\n":  # the blank line that ends the message
                    self.finished = True
                    self.end = pos
                continue
            digits = 0
            while digits < len(line) and line[digits] in _HEX_DIGITS:
                digits += 1
            if digits > MAX_CHUNK_SIZE_DIGITS:
                raise BadRequest(f"chunk size of more than {MAX_CHUNK_SIZE_DIGITS} hex digits")
            if not digits:
                self.finished = True  # llhttp refuses the line
                return
            size = int(line[:digits], 16)
            if size:
                self._left = size + 2
                self._state = _DATA
            else:
                self._state = _TRAILER_LINE
