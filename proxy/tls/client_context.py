"""Client-side TLS contexts for outbound connections (token endpoints and upstreams).

Verification is never optional here: every context checks the certificate chain and
the host name. A configured ``ca_file`` *replaces* the system trust store (a private
CA is then the only one trusted for that destination); a client certificate and key
give mutual TLS (RFC 8705 ``tls_client_auth``, or an upstream that wants one).

An upstream is spoken to in HTTP/2 when it selects ``h2`` in ALPN, but ALPN is a
property of a whole context, and the HTTP/1.1 pool and the token endpoints must go on
offering nothing. So each `TlsClientConfig` has two contexts, built alike from the same
files (the client certificate included): `client_ssl_context(tls)` and, offering
``h2`` and ``http/1.1``, `client_ssl_context(tls, offer_http2=True)`. Connections carry
the first; `http2_context()` finds the second from it.

Building a context parses certificate files and the system store, which costs
milliseconds, so contexts are cached per `TlsClientConfig` (a frozen, hashable value).
Files changed on disk are picked up only by a new config value (a config reload).
"""

from __future__ import annotations

import functools
import ssl
import weakref
from typing import Final

from proxy.config import TlsClientConfig

__all__ = ["HTTP2_ALPN", "client_ssl_context", "http2_context"]

# `http/1.1` as well: a server without HTTP/2 then still completes the handshake, and
# is told apart from a broken peer.
HTTP2_ALPN: Final = ("h2", "http/1.1")

_built_from: weakref.WeakKeyDictionary[ssl.SSLContext, TlsClientConfig] = (
    weakref.WeakKeyDictionary()
)


@functools.lru_cache(maxsize=256)
def client_ssl_context(tls: TlsClientConfig, *, offer_http2: bool = False) -> ssl.SSLContext:
    """A verifying client `SSLContext` for `tls`; the same object for equal arguments.

    Raises `OSError`/`ssl.SSLError` when a file cannot be read or parsed.
    """
    context = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH,
        cafile=str(tls.ca_file) if tls.ca_file is not None else None,
    )
    # create_default_context already sets both; stated so that no later edit weakens them.
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.client_cert_file is not None:
        context.load_cert_chain(
            certfile=str(tls.client_cert_file),
            keyfile=str(tls.client_key_file) if tls.client_key_file is not None else None,
        )
    elif tls.client_key_file is not None:
        raise ValueError("client_key_file is set without client_cert_file")
    if offer_http2:
        context.set_alpn_protocols(list(HTTP2_ALPN))
    _built_from[context] = tls
    return context


def http2_context(context: ssl.SSLContext) -> ssl.SSLContext:
    """The context offering ``h2`` built from the same config as `context`: the same
    trust and the same client certificate. `context` must come from
    `client_ssl_context` (ValueError otherwise)."""
    tls = _built_from.get(context)
    if tls is None:
        raise ValueError("this TLS context was not built by client_ssl_context")
    return client_ssl_context(tls, offer_http2=True)
