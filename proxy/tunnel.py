"""CONNECT tunnels and the byte pipe under them (also used after a WebSocket upgrade).

`TunnelHandler.handle_connect` decides what a `CONNECT host:port` gets:

* a host no upstream matches: a byte-for-byte tunnel (or 403 under `unknown_hosts: deny`);
* a configured host: TLS interception when `tls_intercept` is set, so the token can be
  added inside; otherwise 403, because a tunnel would carry the request unauthenticated.

`splice()` joins a client connection and an upstream transport: both directions, with
back-pressure (a full write buffer on one side pauses reading on the other), half-close
passed through (RFC 9110 §9.3.6), and an idle timeout.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import cast

from proxy.client_connection import ClientConnection
from proxy.errors import (
    BadRequest,
    HostNotAllowed,
    ProxyError,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from proxy.messages import RequestHead
from proxy.metrics import UNMATCHED, Metrics
from proxy.routing import split_authority
from proxy.runtime import RuntimeHolder
from proxy.throttled_log import ThrottledLog

log = logging.getLogger("token_proxy.tunnel")

CONNECT_TIMEOUT = 10.0

CONNECTION_ESTABLISHED = b"HTTP/1.1 200 Connection Established\r\n\r\n"

# Answers an intercepted CONNECT: takes the client connection over and serves the
# requests inside the TLS session. Installed by the TLS interception module.
Interceptor = Callable[[ClientConnection, str, int], Awaitable[None]]


class _UpstreamSide(asyncio.Protocol):
    """The upstream end of a splice."""

    def __init__(self, pipe: _Pipe) -> None:
        self._pipe = pipe

    def data_received(self, data: bytes) -> None:
        self._pipe.from_upstream(data)

    def eof_received(self) -> bool | None:
        self._pipe.upstream_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._pipe.upstream_lost()

    def pause_writing(self) -> None:
        self._pipe.client.pause_reading()

    def resume_writing(self) -> None:
        self._pipe.client.resume_reading()


class _Pipe:
    """Relays bytes between a client connection and an upstream transport."""

    def __init__(
        self, client: ClientConnection, upstream: asyncio.Transport, idle_timeout: float
    ) -> None:
        self.client = client
        self.upstream = upstream
        self._idle_timeout = idle_timeout
        self._loop = asyncio.get_running_loop()
        self._last_activity = self._loop.time()
        self._client_eof = False
        self._upstream_eof = False
        self._timer: asyncio.TimerHandle | None = self._loop.call_later(
            idle_timeout, self._check_idle
        )
        client.on_resume_writing = self._resume_upstream

    def _resume_upstream(self) -> None:
        if not self.upstream.is_closing():
            self.upstream.resume_reading()

    # client -> upstream (RawSink)
    def data_from_client(self, data: bytes) -> None:
        self._last_activity = self._loop.time()
        if not self.upstream.is_closing():
            self.upstream.write(data)

    def client_eof(self) -> None:
        self._client_eof = True
        if self._upstream_eof:
            self.close()
        elif self.upstream.can_write_eof() and not self.upstream.is_closing():
            self.upstream.write_eof()

    def client_lost(self) -> None:
        self.close()

    # upstream -> client
    def from_upstream(self, data: bytes) -> None:
        self._last_activity = self._loop.time()
        self.client.write(data)
        if self.client.write_paused:
            self.upstream.pause_reading()

    def upstream_eof(self) -> None:
        self._upstream_eof = True
        transport = self.client.transport
        if self._client_eof or transport is None:
            self.close()
        elif transport.can_write_eof() and not transport.is_closing():
            transport.write_eof()

    def upstream_lost(self) -> None:
        self.close()

    def _check_idle(self) -> None:
        idle = self._loop.time() - self._last_activity
        if idle >= self._idle_timeout:
            self._timer = None
            self.close()
            return
        self._timer = self._loop.call_later(self._idle_timeout - idle, self._check_idle)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.client.on_resume_writing = None
        if not self.upstream.is_closing():
            self.upstream.close()
        self.client.close()


def splice(
    client: ClientConnection,
    upstream: asyncio.Transport,
    upstream_tail: bytes,
    *,
    idle_timeout: float,
) -> None:
    """Relay bytes both ways between `client` and `upstream` until either side ends."""
    pipe = _Pipe(client, upstream, idle_timeout)
    upstream.set_protocol(_UpstreamSide(pipe))
    client_tail = client.take_over(pipe)
    if upstream_tail:
        pipe.from_upstream(upstream_tail)
    if client_tail:
        pipe.data_from_client(client_tail)
    upstream.resume_reading()


class TunnelHandler:
    """Answers CONNECT requests on the forward-proxy port."""

    def __init__(self, holder: RuntimeHolder, metrics: Metrics) -> None:
        self._holder = holder
        self._metrics = metrics
        self.interceptor: Interceptor | None = None
        self._refusals = ThrottledLog(log)

    async def handle_connect(self, conn: ClientConnection, head: RequestHead) -> bool:
        runtime = self._holder.current
        config = runtime.config
        label = UNMATCHED
        target = head.target.decode("ascii", "replace")
        try:
            try:
                host, port = split_authority(head.target.decode("ascii"), None)
            except UnicodeDecodeError:
                raise BadRequest("CONNECT target is not ASCII") from None
            claimants = runtime.router.claimants(host, port)
            if claimants:
                label = claimants[0].name
            if port not in config.connect_ports:
                raise HostNotAllowed(
                    f"CONNECT to port {port} is not allowed (add it to connect_ports)",
                    upstream=claimants[0].name if claimants else None,
                )
            if claimants:
                upstream = claimants[0]
                if self.interceptor is None:
                    raise HostNotAllowed(
                        f"{host}:{port} belongs to upstream '{upstream.name}', whose token "
                        "cannot be added inside an opaque TLS tunnel. Enable tls_intercept "
                        f"(and trust its CA), or call http://{host} and give the upstream "
                        f"url: https://{host}",
                        upstream=upstream.name,
                    )
                self._metrics.tunnels.labels(upstream=label, outcome="intercepted").inc()
                await self.interceptor(conn, host, port)
                return False
            if config.unknown_hosts == "deny":
                raise HostNotAllowed(f"{host} matches no configured upstream (unknown_hosts: deny)")
            transport = await _open(host, port)
        except ProxyError as error:
            self._metrics.tunnels.labels(upstream=label, outcome="refused").inc()
            self._refusals.log(
                logging.WARNING,
                f"{label}:{type(error).__name__}",
                "CONNECT %s refused with %d (upstream %s): %s",
                target[:300],
                error.status,
                label,
                error.detail,
            )
            conn.send_error(error, keep_alive=False)
            return False
        self._metrics.tunnels.labels(upstream=UNMATCHED, outcome="opened").inc()
        conn.write(CONNECTION_ESTABLISHED)
        splice(conn, transport, b"", idle_timeout=conn.listener.limits.tunnel_idle_timeout)
        return False


class _Holding(asyncio.Protocol):
    """Buffers nothing: reading is paused until the splice installs the real protocol."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.Transport, transport).pause_reading()


async def _open(host: str, port: int) -> asyncio.Transport:
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            transport, _ = await loop.create_connection(_Holding, host, port)
    except TimeoutError:
        raise UpstreamTimeout(f"connecting to {host}:{port} timed out") from None
    except OSError as exc:
        raise UpstreamUnreachable(
            f"cannot connect to {host}:{port}: {exc.strerror or exc}"
        ) from None
    return transport
