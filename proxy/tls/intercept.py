"""TLS interception of CONNECT tunnels to configured hosts (the `tls_intercept` section).

A client using `HTTPS_PROXY` sends `CONNECT host:port` and then speaks TLS end to end,
so a header can only be added inside that TLS. For a host an upstream matches,
`TunnelHandler` hands the client connection to `TlsInterceptor`, which

1. (`TunnelHandler` has answered ``200 Connection Established`` and seen a TLS
   ClientHello arrive);
2. completes the TLS handshake itself (`loop.start_tls`, server side, on asyncio and
   uvloop alike) with a leaf certificate for the CONNECT host, signed by a local CA
   that the application trusts; ALPN offers ``h2`` and ``http/1.1`` when the proxy
   serves HTTP/2 (an `Http2Front` is given) and the upstream may speak it (see
   `Http2Front.upstream_speaks_h2`), else ``http/1.1`` only;
3. serves the decrypted requests as a new `ClientConnection` whose handler is the
   forwarder's `tunnelled_handler("https", host, port)`: the same matching, token injection
   and metrics as plain HTTP, and a fresh, verified TLS connection to the real upstream;
   or, when the client chose ``h2``, as an HTTP/2 server connection
   (`proxy.datapath.http2.server`) that plans each stream with the same planner.

The decrypted connection takes the plain one's place in its `Listener`, so it counts
against `max_connections` and is timed out and drained like any other (an HTTP/2
connection keeps the plain one in the listener as its handle instead). A failed
handshake (typically: the client does not trust the CA) is logged and the connection
closed; nothing reaches the upstream.

The CA and the leaf certificates are `proxy.tls.local_ca`'s.
"""

from __future__ import annotations

import asyncio
import logging

from proxy.config import ConfigError, TlsInterceptConfig
from proxy.datapath.client_connection import ClientConnection
from proxy.datapath.http2.front import Http2Front
from proxy.datapath.tunnel import TunnelledHandlers
from proxy.tls.local_ca import (
    AuthorityError,
    CertificateAuthority,
    LeafCertificates,
    load_authority,
)

__all__ = ["TlsInterceptor"]

log = logging.getLogger("token_proxy.intercept")


class _Handover(asyncio.Protocol):
    """The TLS layer's first application protocol, until the decrypted connection exists.

    The TLS layer may deliver decrypted bytes (a request sent right behind the client's
    Finished) before `start_tls` returns, and may report the connection lost through a
    callback scheduled earlier; both are kept here and passed on to the connection.
    """

    def __init__(self) -> None:
        self._target: asyncio.Protocol | None = None
        self._data: list[bytes] = []
        self._eof = False
        self._lost = False
        self._lost_exc: Exception | None = None

    def data_received(self, data: bytes) -> None:
        if self._target is not None:
            self._target.data_received(data)
        else:
            self._data.append(data)

    def eof_received(self) -> bool | None:
        if self._target is not None:
            return self._target.eof_received()
        self._eof = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self._target is not None:
            self._target.connection_lost(exc)
        else:
            self._lost, self._lost_exc = True, exc

    def pause_writing(self) -> None:
        if self._target is not None:
            self._target.pause_writing()

    def resume_writing(self) -> None:
        if self._target is not None:
            self._target.resume_writing()

    def hand_over(self, conn: asyncio.Protocol, transport: asyncio.Transport) -> None:
        """Make `conn` the protocol of `transport` and give it what arrived so far."""
        self._target = conn
        transport.set_protocol(conn)
        conn.connection_made(transport)
        data, self._data = self._data, []
        if not transport.is_closing():  # the listener may have refused it (limits, draining)
            for chunk in data:
                conn.data_received(chunk)
            if self._eof and not conn.eof_received():
                transport.close()
        if self._lost:
            conn.connection_lost(self._lost_exc)


# ssl.SSLError reasons by which a client says it does not trust the certificate.
_DISTRUST_REASONS = frozenset(
    {
        "TLSV1_ALERT_UNKNOWN_CA",
        "SSLV3_ALERT_BAD_CERTIFICATE",
        "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
    }
)


class TlsInterceptor:
    """Completes intercepted CONNECTs: TLS with a local-CA leaf, then serves the requests inside.

    Install it as `TunnelHandler.interceptor`; build it with `from_config()`.
    """

    def __init__(
        self,
        leaves: LeafCertificates,
        handlers: TunnelledHandlers,
        http2: Http2Front | None = None,
    ) -> None:
        self.leaves = leaves
        self._handlers = handlers
        self._http2 = http2

    @classmethod
    def from_config(
        cls,
        config: TlsInterceptConfig,
        handlers: TunnelledHandlers,
        *,
        source: str = "<config>",
        http2: Http2Front | None = None,
    ) -> TlsInterceptor:
        """Load or generate the CA (writing `write_ca_cert_to`); `ConfigError` if it cannot.
        With `http2`, clients may choose HTTP/2."""
        try:
            authority = load_authority(config)
        except AuthorityError as error:
            raise ConfigError(source, f"tls_intercept.{error.key}", error.problem) from None
        return cls(LeafCertificates(authority), handlers, http2)

    @property
    def authority(self) -> CertificateAuthority:
        return self.leaves.authority

    async def __call__(self, conn: ClientConnection, host: str, port: int) -> None:
        """Take over `conn`, whose client was answered 200 and is about to start TLS (its
        ClientHello waits in the socket: `TunnelHandler` has only peeked at it)."""
        transport = conn.transport
        if transport is None or conn.closed:
            return
        http2 = self._http2
        offer_h2 = http2 is not None and await http2.upstream_speaks_h2(host, port)
        if transport.is_closing():
            return  # the client went away meanwhile
        context = self.leaves.context_for(host, http2=offer_h2)
        handover = _Handover()
        loop = asyncio.get_running_loop()
        listener = conn.listener
        tls_transport: asyncio.Transport | None = None
        try:
            tls_transport = await loop.start_tls(
                transport,
                handover,
                context,
                server_side=True,
                ssl_handshake_timeout=listener.limits.header_timeout,
            )
        except Exception as exc:  # any failure ends this client's connection only
            _log_handshake_failure(conn, host, port, exc)
        finally:
            ssl_object = tls_transport.get_extra_info("ssl_object") if tls_transport else None
            speaks_h2 = ssl_object is not None and ssl_object.selected_alpn_protocol() == "h2"
            # From start_tls on, the socket's events go to the TLS layer and the plain
            # connection gets none: end it here, so that the listener counts the
            # decrypted connection in its place (or nothing, if the handshake failed).
            # An HTTP/2 connection keeps it in the listener as its handle instead.
            if not conn.closed and not (speaks_h2 and http2 is not None):
                conn.connection_lost(None)
        if tls_transport is None:
            return
        if speaks_h2 and http2 is not None:
            handover.hand_over(http2.serve_tunnelled(conn, host, port), tls_transport)
        else:
            decrypted = ClientConnection(
                listener, self._handlers.tunnelled_handler("https", host, port), listener.limits
            )
            handover.hand_over(decrypted, tls_transport)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "intercepting CONNECT",
                extra={
                    "event": "intercept",
                    "host": host,
                    "port": port,
                    "client": conn.peer,
                    "tls": ssl_object.version() if ssl_object is not None else "-",
                    "alpn": "h2" if speaks_h2 else "http/1.1",
                },
            )


def _log_handshake_failure(conn: ClientConnection, host: str, port: int, exc: Exception) -> None:
    reason = getattr(exc, "reason", None)
    fields = {
        "event": "intercept_handshake_failed",
        "host": host,
        "port": port,
        "client": conn.peer,
        "error": f"{type(exc).__name__}: {reason or exc}"[:300],
    }
    if reason in _DISTRUST_REASONS:
        fields["hint"] = (
            "the client rejected the interception certificate: make it trust the token-proxy "
            "CA (the certificate written to tls_intercept.write_ca_cert_to)"
        )
    elif isinstance(exc, ConnectionResetError):
        # Many TLS clients (asyncio's among them) close without an alert when they
        # reject a certificate, so a silent close is the usual sign of distrust.
        fields["hint"] = (
            "the client closed the connection during the TLS handshake; if it does not "
            "trust the token-proxy CA, give it the certificate written to "
            "tls_intercept.write_ca_cert_to"
        )
    log.warning("TLS handshake with an intercepted client failed", extra=fields)
