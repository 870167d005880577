"""Client-side TLS contexts for outbound connections (token endpoints and upstreams).

Verification is never optional here: every context checks the certificate chain and
the host name. A configured ``ca_file`` *replaces* the system trust store (a private
CA is then the only one trusted for that destination); a client certificate and key
give mutual TLS (RFC 8705 ``tls_client_auth``, or an upstream that wants one).

Building a context parses certificate files and the system store, which costs
milliseconds, so contexts are cached per `TlsClientConfig` (a frozen, hashable value).
Files changed on disk are picked up only by a new config value (a config reload).
"""

from __future__ import annotations

import functools
import ssl

from proxy.config import TlsClientConfig

__all__ = ["client_ssl_context"]


@functools.lru_cache(maxsize=128)
def client_ssl_context(tls: TlsClientConfig) -> ssl.SSLContext:
    """A verifying client `SSLContext` for `tls`; the same object for equal configs.

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
    return context
