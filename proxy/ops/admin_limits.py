"""Limits on the admin port: a connection cap, a header timeout and a stall timeout.

The admin port listens on all interfaces (probes and scrapes come from the kubelet and
Prometheus), so anyone on the pod network can open connections to it. aiohttp alone
holds a connection that never finishes its request head for ever, and a keep-alive
connection for an hour. `AdminConnectionGuard` wraps each of aiohttp's protocol
objects so that the admin port has the proxy ports' kind of limits:

* at most `max_connections` at once; more are closed at accept, before aiohttp sees
  them. The cap is also kept under an eighth of the process's descriptor limit, so a
  flood of the admin port leaves the proxy ports descriptors to accept with;
* a request head must be complete within `header_timeout` of its first byte (or of the
  connection's start), and within `max_header_size` bytes: else 408, or the connection
  is closed;
* a response the client does not read (writing paused) for `idle_timeout` is aborted;
  idle keep-alive connections are aiohttp's `keepalive_timeout`, set to the same.

The admin endpoints take no request bodies, so every byte after a complete head is
the start of the next head.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections.abc import Callable
from typing import cast

from proxy.ops.throttled_log import ThrottledLog

__all__ = ["AdminConnectionGuard", "admin_connection_cap"]

log = logging.getLogger("token_proxy.admin")

_HEAD_END = b"\r\n\r\n"
_REQUEST_TIMEOUT = (
    b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 33\r\n\r\nrequest head not received in time"
)
# The share of the descriptor limit the admin port may hold at most.
_DESCRIPTOR_SHARE = 8


def admin_connection_cap(configured: int) -> int:
    """`configured`, lowered to an eighth of the soft descriptor limit (at least 4)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    return max(4, min(configured, soft // _DESCRIPTOR_SHARE))


class AdminConnectionGuard:
    """Counts the admin port's connections and makes the guarded protocol for each."""

    def __init__(
        self,
        make_handler: Callable[[], asyncio.Protocol],
        *,
        max_connections: int,
        header_timeout: float,
        idle_timeout: float,
        max_header_size: int,
    ) -> None:
        self._make_handler = make_handler
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        self.max_header_size = max_header_size
        self.open = 0
        self.refusals = ThrottledLog(log)

    def __call__(self) -> asyncio.Protocol:
        return _GuardedConnection(self)

    def make_handler(self) -> asyncio.Protocol:
        return self._make_handler()


class _GuardedConnection(asyncio.Protocol):
    """One admin connection: aiohttp's handler inside, with the guard's limits around it."""

    def __init__(self, guard: AdminConnectionGuard) -> None:
        self._guard = guard
        self._inner: asyncio.Protocol | None = None
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._in_head = False  # a head has begun (or the connection is new) and not ended
        self._head_size = 0
        self._tail = b""  # the last bytes of the head so far, to find an end split by reads

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio's, but have their methods.
        transport = cast(asyncio.Transport, transport)
        guard = self._guard
        if guard.open >= guard.max_connections:
            guard.refusals.log(
                logging.WARNING,
                "cap",
                "admin connection refused: %d connections open, the most allowed "
                "(limits.admin_max_connections, and an eighth of the descriptor limit)",
                guard.open,
            )
            transport.abort()
            return
        guard.open += 1
        self._transport = transport
        self._inner = guard.make_handler()
        self._inner.connection_made(transport)
        self._begin_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        if self._inner is None:
            return
        self._guard.open -= 1
        inner, self._inner = self._inner, None
        inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._inner is None:
            return
        if not self._watch_heads(data):
            return
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is None:
            return
        self._inner.pause_writing()
        # A client that stops reading its answer would hold the connection for ever.
        self._arm(self._guard.idle_timeout, self._abort)

    def resume_writing(self) -> None:
        if self._inner is None:
            return
        self._inner.resume_writing()
        if self._in_head:
            self._arm(self._guard.header_timeout, self._head_timed_out)
        else:
            self._cancel_timer()

    # -- request heads ----------------------------------------------------------------

    def _watch_heads(self, data: bytes) -> bool:
        """Track head boundaries in `data`; False if the connection was closed for it."""
        start = 0
        while start < len(data):
            if not self._in_head:
                self._begin_head()
            window = self._tail + data[start:]
            end = window.find(_HEAD_END)
            if end < 0:
                self._head_size += len(data) - start
                self._tail = window[-3:]
                break
            consumed = end + len(_HEAD_END) - len(self._tail)
            self._head_size += consumed
            start += consumed
            self._in_head = False
            self._tail = b""
            self._cancel_timer()
        if self._in_head and self._head_size > self._guard.max_header_size:
            self._guard.refusals.log(
                logging.WARNING, "size", "admin connection closed: request head too large"
            )
            self._abort()
            return False
        return True

    def _begin_head(self) -> None:
        self._in_head = True
        self._head_size = 0
        self._tail = b""
        self._arm(self._guard.header_timeout, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self._timer = None
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if self._head_size:  # RFC 9110 §15.5.9: say why, to a client that began a request
            transport.write(_REQUEST_TIMEOUT)
        transport.close()

    # -- timers -------------------------------------------------------------------------

    def _arm(self, delay: float, callback: Callable[[], None]) -> None:
        self._cancel_timer()
        self._timer = asyncio.get_running_loop().call_later(delay, callback)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _abort(self) -> None:
        self._cancel_timer()
        if self._transport is not None:
            self._transport.abort()
