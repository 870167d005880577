"""Test certificates: TLS server contexts signed by a throwaway `trustme` CA.

The `server_ca` and `server_ca_file` fixtures (tests/conftest.py) give a test its CA
and the PEM file a proxy's `ca_file` names; `server_context()` makes the context a test
server (upstream, token endpoint) listens with.
"""

from __future__ import annotations

import ssl

import trustme


def server_context(ca: trustme.CA, *, client_ca: trustme.CA | None = None) -> ssl.SSLContext:
    """A server context for 127.0.0.1 and localhost signed by `ca`; with `client_ca`,
    clients must present a certificate it signed (mutual TLS)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    if client_ca is not None:
        client_ca.configure_trust(context)
        context.verify_mode = ssl.CERT_REQUIRED
    return context
