"""TLS settings: trust and client certificates for outbound connections, and interception.

`TLS_KEYS` are the YAML keys an upstream and a token section read their
`TlsClientConfig` from (`ca_file`, `client_cert_file`, `client_key_file`, flat in the
section); `tls_intercept` is the top-level section of the local CA that lets the proxy
inject into CONNECT tunnels. Only readability is checked here: the certificates and
keys themselves are loaded when the TLS contexts and the CA are built.
"""

from __future__ import annotations

from proxy.config.model import TlsClientConfig, TlsInterceptConfig
from proxy.config.source import KeyPath, Reader, Section, yaml_keys

__all__ = ["TLS_KEYS", "tls_client", "tls_intercept"]

TLS_KEYS = yaml_keys(TlsClientConfig)
_INTERCEPT_KEYS = yaml_keys(TlsInterceptConfig)


def tls_client(section: Section) -> TlsClientConfig:
    """The `TLS_KEYS` of an upstream or token section."""
    tls = TlsClientConfig(
        ca_file=section.optional("ca_file", Reader.file),
        client_cert_file=section.optional("client_cert_file", Reader.file),
        client_key_file=section.optional("client_key_file", Reader.file),
    )
    if tls.client_key_file is not None and tls.client_cert_file is None:
        section.fail("client_cert_file", "missing (client_key_file needs it)")
    return tls


def tls_intercept(reader: Reader, path: KeyPath, value: object) -> TlsInterceptConfig:
    if value is None:
        reader.fail(
            path,
            "expected a mapping, got null (write tls_intercept: {} to intercept with a "
            "generated CA, or remove the key)",
        )
    section = reader.section(path, value, _INTERCEPT_KEYS)
    ca_cert_file = section.optional("ca_cert_file", Reader.file)
    ca_key_file = section.optional("ca_key_file", Reader.file)
    if (ca_cert_file is None) != (ca_key_file is None):
        missing = "ca_key_file" if ca_key_file is None else "ca_cert_file"
        section.fail(
            missing,
            "missing (give both ca_cert_file and ca_key_file, or neither to generate a CA)",
        )
    return TlsInterceptConfig(
        ca_cert_file=ca_cert_file,
        ca_key_file=ca_key_file,
        write_ca_cert_to=section.optional("write_ca_cert_to", Reader.output_file),
    )
