"""Where the request under way lies in the bytes a client connection is parsing.

llhttp reports no offsets, yet a chunked body's sizes are read ahead of it
(`proxy.datapath.chunk_sizes`), from where the body begins in the read that holds it,
before the head or any of the body is handed on. `MessageBounds` follows the messages
through the reads: where the one under way began in the current read (or that it began
in an earlier one), where its head ends, where the one before it ended (pipelining),
and its body's length or its chunk sizes.
"""

from __future__ import annotations

from typing import Final

from proxy.datapath.chunk_sizes import ChunkSizes
from proxy.datapath.request_body import RequestBody

__all__ = ["MessageBounds"]

_CR: Final = 13
_LF: Final = 10
# Where a message began, when not at an offset of the current read.
_EARLIER_READ: Final = -1
_UNKNOWN: Final = -2


class MessageBounds:
    """The bounds of the request under way in the read being parsed, for one connection.

    The connection reports each read and what llhttp's callbacks say about it; a chunked
    body's sizes are scanned as they arrive, and a size too long raises its `ProxyError`.
    """

    def __init__(self) -> None:
        # The read being parsed (empty between reads: only its callbacks look at it).
        self.read = b""
        # Where the message under way began in it, or `_EARLIER_READ` (then
        # `_head_carried` says whether the read began inside its head), or `_UNKNOWN`.
        self._offset = 0
        self._head_carried = False
        self._head_tail = b""  # the last bytes of an unfinished head
        # The message's body length (-1: chunked) and how much of it earlier reads brought.
        self._body_length = 0
        self._body_read_before = 0
        self._chunks: ChunkSizes | None = None

    def read_continues(self, data: bytes, in_head: bool, body: RequestBody | None) -> None:
        """`data` is read while a message that began in an earlier read is under way (in
        its head if `in_head`); its chunk-size lines in `data` are checked before llhttp
        reads on past them."""
        self.read = data
        self._offset = _EARLIER_READ
        self._head_carried = in_head
        if in_head:
            return
        if body is not None:
            self._body_read_before = body.received
        chunks = self._chunks
        if chunks is not None and not chunks.finished and self._body_length < 0:
            chunks.scan(data, 0)

    def head_unfinished(self, data: bytes, continued: bool) -> None:
        """A head did not end in `data` (`continued`: nor in the reads before): keep its
        last bytes, to find its end if it is split there."""
        tail = self._head_tail + data if continued else data
        self._head_tail = tail[-3:]

    def message_begins(self, at_read_start: bool) -> None:
        """A message begins: at the start of the read, or after another that ended in it
        (pipelining)."""
        self._offset = 0 if at_read_start else self._end_of_last_message()

    def sized_body(self, length: int) -> None:
        """The head ended, with a body of `length` bytes."""
        self._body_length = length

    def chunked_body(self, check: bool) -> None:
        """The head ended, with a chunked body whose sizes are checked if `check`, from
        this read on (BadRequest at a size too long)."""
        self._body_length = -1
        if not check:
            return
        chunks = self._chunks = ChunkSizes()
        start = self._end_of_head()
        if start >= 0:
            chunks.scan(self.read, start)
        else:
            chunks.finished = True  # not located (never expected): not checked

    def _end_of_head(self) -> int:
        """Where, in the current read, the head of the message under way ends (the
        offset after its blank line), or -1 if it does not end in this read."""
        data = self.read
        start = self._offset
        if start == _UNKNOWN:
            return -1
        if start == _EARLIER_READ:
            # The head began in an earlier read: its blank line may be split across them.
            tail = self._head_tail
            probe = (tail + data[:3]).find(b"\r\n\r\n")
            if probe >= 0:
                return probe + 4 - len(tail)
            start = 0
        else:
            # llhttp skips empty lines before a request line (RFC 9112 §2.2).
            while start < len(data) and (data[start] == _CR or data[start] == _LF):
                start += 1
        end = data.find(b"\r\n\r\n", start)
        return end + 4 if end >= 0 else -1

    def _end_of_last_message(self) -> int:
        """Where, in the current read, the message that has just ended ends: called when
        another begins in the same read, before its state is replaced by the new one's.
        `_UNKNOWN` if that cannot be told (then a chunked body after it is not checked)."""
        length = self._body_length
        if length < 0:
            chunks = self._chunks
            end = chunks.end if chunks is not None else -1
            return end if end >= 0 else _UNKNOWN
        if self._offset == _EARLIER_READ and not self._head_carried:
            # Its head ended in an earlier read: what was left of its body came first.
            return length - self._body_read_before
        end = self._end_of_head()
        return end + length if end >= 0 else _UNKNOWN
