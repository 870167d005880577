"""The local CA and its leaf certificates (`proxy.tls.local_ca`), and CA files as config."""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import stat
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from proxy.config import (
    ConfigError,
    TlsInterceptConfig,
)
from proxy.tls.intercept import TlsInterceptor
from proxy.tls.local_ca import (
    CertificateAuthority,
    LeafCertificates,
    load_authority,
    load_cert_chain_from_memory,
)

UTC = datetime.UTC


def test_generated_ca_writes_only_its_certificate(tmp_path: Path) -> None:
    out = tmp_path / "shared" / "token-proxy-ca.crt"
    out.parent.mkdir()
    authority = load_authority(TlsInterceptConfig(write_ca_cert_to=out))
    assert os.listdir(out.parent) == [out.name]  # no key, no temporary file left over
    text = out.read_text()
    assert "PRIVATE KEY" not in text
    assert text.count("BEGIN CERTIFICATE") == 1
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    written = x509.load_pem_x509_certificate(text.encode())
    assert written == authority.certificate
    constraints = written.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca
    assert isinstance(written.public_key(), ec.EllipticCurvePublicKey)
    # A new start-up is a new CA.
    again = load_authority(TlsInterceptConfig(write_ca_cert_to=out))
    assert again.fingerprint != authority.fingerprint
    assert x509.load_pem_x509_certificate(out.read_bytes()) == again.certificate


def test_ca_from_files_signs_the_leaves(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert_file, key_file = tmp_path / "ca.crt", tmp_path / "ca.key"
    ca.cert_pem.write_to_path(str(cert_file))
    ca.private_key_pem.write_to_path(str(key_file))
    out = tmp_path / "for-the-app.crt"
    authority = load_authority(
        TlsInterceptConfig(ca_cert_file=cert_file, ca_key_file=key_file, write_ca_cert_to=out)
    )
    assert out.read_bytes() == cert_file.read_bytes()
    leaf = authority.issue_leaf(
        "inventory.internal",
        ec.generate_private_key(ec.SECP256R1()).public_key(),
        now=datetime.datetime.now(UTC),
    )
    leaf.verify_directly_issued_by(authority.certificate)
    # A client trusting the file's CA accepts a handshake with a leaf from it.
    leaves = LeafCertificates(authority)
    assert _handshake(leaves.context_for("inventory.internal"), cert_file, "inventory.internal")


@pytest.mark.parametrize(
    ("break_it", "key_path", "words"),
    [
        ("missing_cert", "tls_intercept.ca_cert_file", "cannot read"),
        ("garbage_cert", "tls_intercept.ca_cert_file", "no PEM certificate"),
        ("not_a_ca", "tls_intercept.ca_cert_file", "not a CA certificate"),
        ("other_key", "tls_intercept.ca_key_file", "is not the key"),
        ("encrypted_key", "tls_intercept.ca_key_file", "encrypted"),
        ("garbage_key", "tls_intercept.ca_key_file", "no PEM private key"),
    ],
)
def test_unusable_ca_files_are_config_errors(
    tmp_path: Path, break_it: str, key_path: str, words: str
) -> None:
    ca = trustme.CA()
    cert_file, key_file = tmp_path / "ca.crt", tmp_path / "ca.key"
    ca.cert_pem.write_to_path(str(cert_file))
    ca.private_key_pem.write_to_path(str(key_file))
    if break_it == "missing_cert":
        cert_file.unlink()
    elif break_it == "garbage_cert":
        cert_file.write_text("not a certificate\n")
    elif break_it == "not_a_ca":
        leaf = ca.issue_cert("leaf.example")
        leaf.cert_chain_pems[0].write_to_path(str(cert_file))
        leaf.private_key_pem.write_to_path(str(key_file))
    elif break_it == "other_key":
        trustme.CA().private_key_pem.write_to_path(str(key_file))
    elif break_it == "encrypted_key":
        key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), password=None)
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"pass"),
            )
        )
    elif break_it == "garbage_key":
        key_file.write_text("-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    config = TlsInterceptConfig(ca_cert_file=cert_file, ca_key_file=key_file)
    with pytest.raises(ConfigError) as caught:
        TlsInterceptor.from_config(config, _NoHandlers(), source="proxy.yaml")
    assert caught.value.file == "proxy.yaml"
    assert caught.value.key_path == key_path
    assert words in caught.value.problem


def test_leaves_are_cached_per_host_bounded_and_renewed() -> None:
    now = [datetime.datetime(2030, 1, 1, tzinfo=UTC)]
    authority = CertificateAuthority.generate(clock=lambda: now[0])
    leaves = LeafCertificates(authority, max_hosts=2, clock=lambda: now[0])
    first = leaves.context_for("a.internal")
    assert leaves.context_for("a.internal") is first
    second = leaves.context_for("b.internal")
    assert second is not first
    leaves.context_for("a.internal")  # a is now the most recently used
    leaves.context_for("c.internal")  # evicts b
    assert len(leaves) == 2
    assert leaves.context_for("a.internal") is first
    assert leaves.context_for("b.internal") is not second
    # Close to its end a leaf is replaced for new connections.
    now[0] += datetime.timedelta(hours=23, minutes=30)
    assert leaves.context_for("a.internal") is not first


def test_leaf_for_an_ip_literal_and_a_long_name() -> None:
    authority = CertificateAuthority.generate()
    public_key = ec.generate_private_key(ec.SECP256R1()).public_key()
    now = datetime.datetime.now(UTC)
    v6 = authority.issue_leaf("::1", public_key, now=now)
    san = v6.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert list(san.value) == [x509.IPAddress(ipaddress.ip_address("::1"))]
    long_name = ".".join(["a" * 60, "b" * 60, "internal"])
    leaf = authority.issue_leaf(long_name, public_key, now=now)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert list(san.value) == [x509.DNSName(long_name)]
    assert san.critical  # the subject is empty: a CN is limited to 64 characters
    assert len(leaf.subject) == 0


@pytest.mark.parametrize("use_memfd", [True, False])
def test_leaf_chain_loads_from_memory_either_way(tmp_path: Path, use_memfd: bool) -> None:
    authority = CertificateAuthority.generate()
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = authority.issue_leaf("svc.internal", key.public_key(), now=datetime.datetime.now(UTC))
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    chain = leaf.public_bytes(serialization.Encoding.PEM) + authority.pem()
    load_cert_chain_from_memory(context, chain, key_pem, use_memfd=use_memfd)
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(authority.pem())
    assert _handshake(context, ca_file, "svc.internal")


class _NoHandlers:
    def tunnelled_handler(self, scheme: str, host: str, port: int) -> Any:
        raise AssertionError("not reached")


def _handshake(server: ssl.SSLContext, ca_file: Path, host: str) -> bool:
    """A TLS handshake in memory between `server` and a client trusting `ca_file`."""
    client = ssl.create_default_context(cafile=str(ca_file))
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client_side = client.wrap_bio(c_in, c_out, server_hostname=host)
    server_side = server.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(10):
        for name, side in (("client", client_side), ("server", server_side)):
            if not done[name]:
                try:
                    side.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return True
    return False
