"""Test certificates: TLS server contexts signed by a throwaway `trustme` CA.

The `server_ca` and `server_ca_file` fixtures (tests/conftest.py) give a test its CA
and the PEM file a proxy's `ca_file` names; `server_context()` makes the context a test
server (upstream, token endpoint) listens with. The `client_ca` fixture signs client
certificates for mutual TLS, and `client_certificate_files()` writes one for a proxy's
`client_cert_file` and `client_key_file`.
"""

from __future__ import annotations

import ssl
from pathlib import Path

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


def client_certificate_files(ca: trustme.CA, name: str, directory: Path) -> tuple[Path, Path]:
    """A client certificate for `name` signed by `ca`, as (certificate, key) PEM files."""
    issued = ca.issue_cert(name)
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    return cert, key
