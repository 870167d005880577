"""Keep-alive connections to upstream origins: opening, reusing and timing them out.

`UpstreamPool` hands out an `UpstreamConnection` (`proxy.datapath.upstream_connection`)
per origin, reusing idle ones last-in first-out. One sweeper per pool, ticking a few
times a second, asks each busy connection to check its upstream's silence and closes
connections idle in the pool for longer than the idle timeout: no timer per request.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque

from proxy.datapath.timeouts import (
    MAX_IDLE_PER_ORIGIN,
    UPSTREAM_IDLE_TIMEOUT,
    UPSTREAM_SWEEP_INTERVAL,
)
from proxy.datapath.upstream_connection import Origin, UpstreamConnection
from proxy.errors import UpstreamTimeout, UpstreamUnreachable


class UpstreamPool:
    """Idle keep-alive connections per origin, and the sweeper that times them out."""

    def __init__(
        self,
        *,
        max_idle_per_origin: int = MAX_IDLE_PER_ORIGIN,
        idle_timeout: float = UPSTREAM_IDLE_TIMEOUT,
    ) -> None:
        self._idle: dict[Origin, deque[UpstreamConnection]] = {}
        self._max_idle = max_idle_per_origin
        self._idle_timeout = idle_timeout
        self._all: set[UpstreamConnection] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._closed = False

    async def connect(self, origin: Origin, *, connect_timeout: float) -> UpstreamConnection:
        """A new connection to `origin`; errors map to 502/504."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(connect_timeout):
                _, protocol = await loop.create_connection(
                    lambda: UpstreamConnection(self, origin),
                    origin.host,
                    origin.port,
                    ssl=origin.ssl,
                    server_hostname=origin.host if origin.ssl is not None else None,
                )
        except TimeoutError:
            raise UpstreamTimeout(f"connecting to {origin.host}:{origin.port} timed out") from None
        except ssl.SSLCertVerificationError as exc:
            raise UpstreamUnreachable(
                f"TLS verification of {origin.host}:{origin.port} failed: {exc.verify_message}"
            ) from None
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamUnreachable(
                f"cannot connect to {origin.host}:{origin.port}: {exc.strerror or exc}"
                if isinstance(exc, OSError)
                else f"TLS handshake with {origin.host}:{origin.port} failed"
            ) from None
        assert isinstance(protocol, UpstreamConnection)
        self._all.add(protocol)
        if self._sweeper is None and not self._closed:
            self._sweeper = loop.create_task(self._sweep())
        return protocol

    def take_idle(self, origin: Origin) -> UpstreamConnection | None:
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                return conn
        return None

    def release(self, conn: UpstreamConnection) -> None:
        """Return `conn` after its exchange: kept if reusable, closed otherwise."""
        reusable = conn.reusable()
        conn.exchange = None
        if not reusable:
            conn.close()
            return
        idle = self._idle.get(conn.origin)
        if idle is None:
            idle = self._idle[conn.origin] = deque()
        if len(idle) >= self._max_idle:
            conn.close()
            return
        conn.idle_since = conn.last_activity
        idle.append(conn)

    def discard(self, conn: UpstreamConnection) -> None:
        conn.exchange = None
        conn.abort()

    def forget(self, conn: UpstreamConnection) -> None:
        self._all.discard(conn)
        idle = self._idle.get(conn.origin)
        if idle is not None and conn in idle:
            idle.remove(conn)

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        while self._all:
            await asyncio.sleep(UPSTREAM_SWEEP_INTERVAL)
            now = loop.time()
            stale_before = now - self._idle_timeout
            for conn in list(self._all):
                if conn.exchange is not None:
                    conn.check_silence(now)
                elif conn.idle_since and conn.idle_since < stale_before:
                    conn.close()
        self._sweeper = None

    def close(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conn in list(self._all):
            conn.abort()
        self._idle.clear()
