"""CONNECT tunnels and the byte pipe under them (also used after a WebSocket upgrade).

`TunnelHandler.handle_connect` decides what a `CONNECT host:port` gets:

* a host no upstream matches: a byte-for-byte tunnel (or 403 under `unknown_hosts: deny`);
* a configured host: 200, then a look at the client's first bytes: TLS goes to
  interception (when `tls_intercept` is set, so the token can be added inside), plain
  HTTP is served as requests to that host with its token, anything else is refused.
  Without interception, port 443 is refused with 403 at once: it carries TLS, and a
  tunnel would carry the requests unauthenticated. Nothing to a configured host is ever
  tunnelled opaquely.

`splice()` joins a client connection and an upstream transport: both directions, with
back-pressure (a full write buffer on one side pauses reading on the other), half-close
passed through (RFC 9110 §9.3.6), and an idle timeout.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Protocol, cast

from proxy.datapath.client_connection import ClientConnection, RequestHandler
from proxy.datapath.messages import RequestHead
from proxy.datapath.planning import link_local_refusal
from proxy.datapath.routing import split_authority
from proxy.datapath.runtime import RuntimeHolder
from proxy.datapath.timeouts import TUNNEL_CONNECT_TIMEOUT
from proxy.errors import (
    BadRequest,
    HostNotAllowed,
    ProxyError,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from proxy.hosts import is_link_local_target
from proxy.ops.metrics import UNMATCHED, Metrics
from proxy.ops.throttled_log import ThrottledLog

log = logging.getLogger("token_proxy.tunnel")

CONNECTION_ESTABLISHED = b"HTTP/1.1 200 Connection Established\r\n\r\n"

# Answers an intercepted CONNECT: takes the client connection over and serves the
# requests inside the TLS session. Installed by the TLS interception module.
Interceptor = Callable[[ClientConnection, str, int], Awaitable[None]]

_TLS_HANDSHAKE_RECORD = 0x16  # the first byte of a ClientHello (RFC 8446 §5.1)
_PEEK_BYTES = 16


class TunnelledHandlers(Protocol):
    """What serves the requests inside a tunnel: `proxy.datapath.forward.Forwarder` is one."""

    def tunnelled_handler(self, scheme: str, host: str, port: int) -> RequestHandler: ...


class _UpstreamSide(asyncio.Protocol):
    """The upstream end of a splice."""

    def __init__(self, pipe: _Pipe) -> None:
        self._pipe = pipe

    def data_received(self, data: bytes) -> None:
        self._pipe.from_upstream(data)

    def eof_received(self) -> bool | None:
        self._pipe.upstream_eof()
        # Keep our write side open (half-close), which a TLS transport cannot do: it
        # closes anyway, and warns if told otherwise.
        return None if self._pipe.upstream_over_tls else True

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
        self.upstream_over_tls = upstream.get_extra_info("sslcontext") is not None
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
        self.handlers: TunnelledHandlers | None = None  # set by the application
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
                if (port == 443 and self.interceptor is None) or self.handlers is None:
                    # Port 443 carries TLS: without interception, say so before any tunnel.
                    raise HostNotAllowed(
                        f"{host}:{port} belongs to upstream '{upstream.name}', whose token "
                        "cannot be added inside an opaque TLS tunnel. Enable tls_intercept "
                        f"(and trust its CA), or call http://{host} and give the upstream "
                        f"url: https://{host}",
                        upstream=upstream.name,
                    )
                await self._open_claimed(conn, host, port, upstream.name)
                return False
            if config.unknown_hosts == "deny":
                raise HostNotAllowed(f"{host} matches no configured upstream (unknown_hosts: deny)")
            guard = not runtime.allow_link_local
            if guard and is_link_local_target(host):
                raise link_local_refusal(host)
            transport = await _open(host, port, guard_peer=guard)
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

    async def _open_claimed(
        self, conn: ClientConnection, host: str, port: int, upstream: str
    ) -> None:
        """A tunnel to a configured host: 200, then a look at the client's first bytes.

        A TLS ClientHello goes to interception; plain HTTP (undici's proxy agent, most
        WebSocket clients and `curl -p` send CONNECT even for http:// and ws://) is served
        as requests to that host, with its token, like absolute-form requests; anything
        else is refused. Nothing passes through opaquely.
        """
        transport = conn.transport
        if transport is None or conn.closed:
            return
        early = conn.take_over(_DETACHED)
        # take_over resumes reading; what follows stays in the socket, to be peeked at.
        conn.pause_reading()
        if early:
            # Bytes sent before our 200 would have to be fed to a TLS layer that does
            # not exist yet. Clients wait for the answer (it says whether there is a
            # tunnel at all); refuse the rare one that does not.
            self._refuse_inside(conn, upstream, "data was sent before the CONNECT response")
            conn.send_error(
                BadRequest("data was sent before the CONNECT response; wait for 200"),
                keep_alive=False,
            )
            conn.close()
            return
        conn.write(CONNECTION_ESTABLISHED)
        try:
            async with asyncio.timeout(conn.listener.limits.header_timeout):
                first = await _peek(transport)
        except (TimeoutError, OSError):
            first = b""
        if not first or conn.closed:
            conn.close()
            return
        if first[0] == _TLS_HANDSHAKE_RECORD:
            if self.interceptor is None:
                self._refuse_inside(
                    conn,
                    upstream,
                    f"TLS to {host}:{port} cannot carry a token without tls_intercept",
                )
                conn.close()
                return
            self._metrics.tunnels.labels(upstream=upstream, outcome="intercepted").inc()
            await self.interceptor(conn, host, port)
            return
        if not first[:1].isalpha() or self.handlers is None:  # a method is a token of letters
            self._refuse_inside(conn, upstream, "neither TLS nor HTTP inside the tunnel")
            conn.close()
            return
        self._metrics.tunnels.labels(upstream=upstream, outcome="plain_http").inc()
        listener = conn.listener
        conn.connection_lost(None)  # the plain connection below counts in its place
        plain = ClientConnection(
            listener, self.handlers.tunnelled_handler("http", host, port), listener.limits
        )
        transport.set_protocol(plain)
        plain.connection_made(transport)
        if not transport.is_closing():
            transport.resume_reading()  # paused for the peek, by the connection before

    def _refuse_inside(self, conn: ClientConnection, upstream: str, reason: str) -> None:
        self._metrics.tunnels.labels(upstream=upstream, outcome="refused").inc()
        self._refusals.log(
            logging.WARNING,
            f"{upstream}:inside:{reason[:40]}",
            "CONNECT tunnel of upstream %s from %s closed: %s",
            upstream,
            conn.peer,
            reason,
        )


async def _peek(transport: asyncio.BaseTransport) -> bytes:
    """The first bytes waiting in `transport`'s socket, left there (MSG_PEEK).

    The transport's reading must be paused. The event loop will not watch a descriptor
    that a transport owns, so a duplicate of it is watched instead.
    """
    sock = transport.get_extra_info("socket")
    if sock is None:
        return b""
    loop = asyncio.get_running_loop()
    duplicate = socket.socket(fileno=os.dup(sock.fileno()))
    duplicate.setblocking(False)
    arrived: asyncio.Future[bytes] = loop.create_future()

    def readable() -> None:
        if arrived.done():
            return
        try:
            arrived.set_result(duplicate.recv(_PEEK_BYTES, socket.MSG_PEEK))
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            arrived.set_exception(exc)

    loop.add_reader(duplicate.fileno(), readable)
    try:
        return await arrived
    finally:
        loop.remove_reader(duplicate.fileno())
        duplicate.close()


class _Detached:
    """The `RawSink` of a connection whose socket now belongs to another protocol."""

    def data_from_client(self, data: bytes) -> None:
        pass

    def client_eof(self) -> None:
        pass

    def client_lost(self) -> None:
        pass


_DETACHED = _Detached()


class _Holding(asyncio.Protocol):
    """Buffers nothing: reading is paused until the splice installs the real protocol."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.Transport, transport).pause_reading()


async def _open(host: str, port: int, *, guard_peer: bool) -> asyncio.Transport:
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(TUNNEL_CONNECT_TIMEOUT):
            transport, _ = await loop.create_connection(_Holding, host, port)
    except TimeoutError:
        raise UpstreamTimeout(f"connecting to {host}:{port} timed out") from None
    except OSError as exc:
        raise UpstreamUnreachable(
            f"cannot connect to {host}:{port}: {exc.strerror or exc}"
        ) from None
    if guard_peer:
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and is_link_local_target(str(peer[0])):
            # A name that resolved to a link-local or metadata address.
            transport.abort()
            raise link_local_refusal(f"{host} ({peer[0]})")
    return transport
