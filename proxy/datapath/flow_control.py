"""Back-pressure shared by both ends of a relay: the client and the upstream connection.

A relay reads from one side and writes to the other. When the writing side's transport
buffer fills, asyncio calls its `pause_writing`; whoever feeds it then pauses reading
from the other side, and resumes on `resume_writing`. `FlowControlledProtocol` keeps the
two flags and the guarded pause/resume of reading; `drain()` lets a coroutine wait for
the buffer to empty. Either end is closed (after what is buffered is sent) or aborted
the same way.
"""

from __future__ import annotations

import asyncio
from typing import cast


class FlowControlledProtocol(asyncio.Protocol):
    """A protocol whose reading a relay can pause, and which can be waited on to drain."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reading_paused = False
        self.write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionResetError("connection lost"))

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def drain(self) -> None:
        """Wait until the transport takes writes again; ConnectionResetError once closed."""
        if self.write_paused and not self.closed:
            self._drain_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None
        if self.closed:
            raise ConnectionResetError("connection lost")

    def pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
