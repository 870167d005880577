"""The body of one request as it arrives from the client: buffered within bounds, read
by the request path, failed when the client or the parser says so.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Protocol

from proxy.errors import BadRequest, ProxyError

__all__ = ["BODY_HIGH_WATER", "BODY_LOW_WATER", "ReadPacer", "RequestBody"]

# A request body buffered beyond this pauses reading from the client until it drains.
BODY_HIGH_WATER = 256 * 1024
BODY_LOW_WATER = 64 * 1024


class ReadPacer(Protocol):
    """What a body paces: its client connection's reading (`ClientConnection`)."""

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class RequestBody:
    """The body of one request, streamed from the client with bounded buffering.

    A body `held_whole` (chunked, with `limits.max_body_size` set) is read to its end,
    up to that limit, before its request is sent on: only then is it known not to be
    refused, and a request that will be refused must not reach the upstream.
    """

    __slots__ = (
        "_chunks",
        "_conn",
        "_error",
        "_failed",
        "_high_water",
        "_size",
        "_waiter",
        "done",
        "held_whole",
        "received",
    )

    def __init__(self, conn: ReadPacer, hold_up_to: int | None = None) -> None:
        self._conn = conn
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._waiter: asyncio.Future[None] | None = None
        self._failed: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self.done = False
        self.received = 0
        self.held_whole = hold_up_to is not None
        # A body held whole is never paused below its limit (it could not end then).
        high_water = BODY_HIGH_WATER
        if hold_up_to is not None and hold_up_to > high_water:
            high_water = hold_up_to
        self._high_water = high_water

    def feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        self.received += len(data)
        if self._size > self._high_water:
            self._conn.pause_reading()
        self._wake()

    def finish(self) -> None:
        self.done = True
        self._wake()

    def fail(self, error: BaseException) -> None:
        if not self.done:
            self._error = error
            self.done = True
            self._wake()
            failed = self._failed
            if failed is not None and not failed.done():
                failed.set_result(None)

    def failure(self) -> ProxyError | None:
        """Why the body failed (too large, malformed, the client went), or None."""
        error = self._error
        if error is None or isinstance(error, ProxyError):
            return error
        return BadRequest("the client closed the connection before the request body ended")

    def failed(self) -> asyncio.Future[None]:
        """Resolved when the body fails (at once if it has)."""
        failed = self._failed
        if failed is None:
            failed = self._failed = asyncio.get_running_loop().create_future()
            if self._error is not None:
                failed.set_result(None)
        return failed

    async def whole(self) -> None:
        """Until the body has arrived whole (it stays buffered); its failure if it fails."""
        while not self.done:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        failure = self.failure()
        if failure is not None:
            raise failure

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def read(self) -> bytes | None:
        """The next chunk, or None at the end of the body."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self.done:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = self._chunks.popleft()
        self._size -= len(data)
        if self._size < BODY_LOW_WATER:
            self._conn.resume_reading()
        return data
