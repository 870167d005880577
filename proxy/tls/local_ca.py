"""The local certificate authority that TLS interception presents to the application.

* `CertificateAuthority`: the CA, loaded from PEM files or generated at start-up
  (EC P-256, the key only ever in this process's memory), whose certificate can be
  written atomically to `write_ca_cert_to` for the application to trust.
* `LeafCertificates`: server `SSLContext`s, one per host, each holding a short-lived
  leaf (24 h) that names exactly that host (SAN dNSName or iPAddress), in a bounded LRU.
  One leaf key serves every leaf; like the CA key it never leaves memory.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import logging
import os
import secrets
import ssl
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proxy.config import TlsInterceptConfig

__all__ = [
    "AuthorityError",
    "CertificateAuthority",
    "LeafCertificates",
    "load_authority",
    "load_cert_chain_from_memory",
]

log = logging.getLogger("token_proxy.intercept")

LEAF_LIFETIME = datetime.timedelta(hours=24)
# A cached leaf is replaced for new connections when less than this is left of it.
LEAF_RENEW_BEFORE = datetime.timedelta(hours=1)
# Certificates start a little in the past, for a client whose clock is slightly behind.
CLOCK_SKEW = datetime.timedelta(minutes=10)
# A generated CA dies with the process (its key is nowhere else), so its validity
# only has to outlast any process; the application re-trusts it at every restart.
GENERATED_CA_LIFETIME = datetime.timedelta(days=3650)
LEAF_CACHE_SIZE = 256
# What a leaf's context offers in ALPN: HTTP/1.1 only, or HTTP/2 first where the proxy
# serves it to the client and the upstream speaks it (`proxy.datapath.http2`).
ALPN_PROTOCOLS = ["http/1.1"]
ALPN_WITH_HTTP2 = ["h2", "http/1.1"]

CAPrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
Clock = Callable[[], datetime.datetime]


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class AuthorityError(Exception):
    """The CA cannot be loaded or written: `key` names the `tls_intercept` key at fault."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


# ---------------------------------------------------------------------------
# The local CA
# ---------------------------------------------------------------------------


class CertificateAuthority:
    """The local CA that signs interception leaves: its certificate chain and its key.

    The key is held in memory only; nothing here writes it anywhere.
    """

    def __init__(
        self,
        certificate: x509.Certificate,
        key: CAPrivateKey,
        issuers: Sequence[x509.Certificate] = (),
    ) -> None:
        self.certificate = certificate
        self._key = key
        # The CA and the certificates above it from its file, in order: sent after each
        # leaf so that a client trusting only the root can build the path.
        self.chain: tuple[x509.Certificate, ...] = (certificate, *issuers)

    def __repr__(self) -> str:
        return f"CertificateAuthority({self.certificate.subject.rfc4514_string()!r})"

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the CA certificate, hex: for logs and for comparing with a trust store."""
        return self.certificate.fingerprint(hashes.SHA256()).hex()

    def pem(self) -> bytes:
        """The CA's certificate chain in PEM: what the application should trust."""
        return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in self.chain)

    @classmethod
    def generate(cls, *, clock: Clock = _utcnow) -> CertificateAuthority:
        """A new CA with an EC P-256 key that exists only in this process."""
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "token-proxy"),
                # A random suffix tells one start-up's CA from the next in a trust store.
                x509.NameAttribute(
                    NameOID.COMMON_NAME, f"token-proxy interception CA {secrets.token_hex(4)}"
                ),
            ]
        )
        now = clock()
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + GENERATED_CA_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        return cls(certificate, key)

    @classmethod
    def load(
        cls, cert_file: Path, key_file: Path, *, clock: Clock = _utcnow
    ) -> CertificateAuthority:
        """The CA from PEM files: the CA certificate first (then any issuers), and its key.

        Raises `AuthorityError` naming `ca_cert_file` or `ca_key_file`.
        """
        try:
            certificates = x509.load_pem_x509_certificates(cert_file.read_bytes())
        except OSError as exc:
            raise AuthorityError(
                "ca_cert_file", f"cannot read {cert_file}: {_os_reason(exc)}"
            ) from None
        except ValueError:
            raise AuthorityError("ca_cert_file", f"{cert_file} holds no PEM certificate") from None
        try:
            key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
        except OSError as exc:
            raise AuthorityError(
                "ca_key_file", f"cannot read {key_file}: {_os_reason(exc)}"
            ) from None
        except TypeError:
            raise AuthorityError(
                "ca_key_file", f"{key_file} is encrypted; give the key unencrypted"
            ) from None
        except (ValueError, UnsupportedAlgorithm):
            raise AuthorityError("ca_key_file", f"{key_file} holds no PEM private key") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise AuthorityError("ca_key_file", "the CA key must be an RSA or EC key")
        certificate = certificates[0]
        if _public_der(key.public_key()) != _public_der(certificate.public_key()):
            raise AuthorityError(
                "ca_key_file", f"{key_file} is not the key of the first certificate in ca_cert_file"
            )
        _check_is_usable_ca(certificate, clock())
        return cls(certificate, key, certificates[1:])

    def write_certificate(self, path: Path) -> None:
        """Write the CA chain to `path` atomically (readers never see a partial file)."""
        try:
            fd, temporary = tempfile.mkstemp(
                dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
            )
        except OSError as exc:
            raise AuthorityError(
                "write_ca_cert_to", f"cannot write {path}: {_os_reason(exc)}"
            ) from None
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(self.pem())
                file.flush()
                os.fsync(file.fileno())
            # A certificate is public, and the application may run as another user.
            os.chmod(temporary, 0o644)
            os.replace(temporary, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise AuthorityError(
                "write_ca_cert_to", f"cannot write {path}: {_os_reason(exc)}"
            ) from None

    def issue_leaf(
        self,
        host: str,
        public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
        *,
        now: datetime.datetime,
        lifetime: datetime.timedelta = LEAF_LIFETIME,
    ) -> x509.Certificate:
        """A server certificate for exactly `host` (a DNS name, or an IP literal)."""
        try:
            san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            san = x509.DNSName(host)
        # RFC 5280 §4.1.2.6: CN is at most 64 characters; the SAN is what clients check.
        subject = x509.Name(
            [x509.NameAttribute(NameOID.COMMON_NAME, host)] if len(host) <= 64 else []
        )
        not_after = min(now + lifetime, self.certificate.not_valid_after_utc)
        issuer_key = self._key.public_key()
        try:
            ski = self.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
            authority_key_id = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                ski.value
            )
        except x509.ExtensionNotFound:
            authority_key_id = x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(not_after)
            # RFC 5280 §4.2.1.6: critical when the subject is empty.
            .add_extension(x509.SubjectAlternativeName([san]), critical=not subject)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=isinstance(public_key, rsa.RSAPublicKey),
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), False)
            .add_extension(authority_key_id, False)
            .sign(self._key, hashes.SHA256())
        )


def _check_is_usable_ca(certificate: x509.Certificate, now: datetime.datetime) -> None:
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise AuthorityError(
            "ca_cert_file",
            "the first certificate is not a CA certificate (basicConstraints CA:TRUE)",
        )
    try:
        usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is not None and not usage.key_cert_sign:
        raise AuthorityError("ca_cert_file", "the CA certificate's keyUsage lacks keyCertSign")
    if now >= certificate.not_valid_after_utc:
        raise AuthorityError(
            "ca_cert_file",
            f"the CA certificate expired on {certificate.not_valid_after_utc:%Y-%m-%d}",
        )
    if now < certificate.not_valid_before_utc:
        raise AuthorityError(
            "ca_cert_file",
            f"the CA certificate is not valid before {certificate.not_valid_before_utc:%Y-%m-%d}",
        )


def load_authority(config: TlsInterceptConfig, *, clock: Clock = _utcnow) -> CertificateAuthority:
    """The CA `config` describes (loaded, or generated), written to `write_ca_cert_to` if set."""
    if config.ca_cert_file is not None and config.ca_key_file is not None:
        authority = CertificateAuthority.load(config.ca_cert_file, config.ca_key_file, clock=clock)
        origin = "file"
    else:
        authority = CertificateAuthority.generate(clock=clock)
        origin = "generated"
    if config.write_ca_cert_to is not None:
        authority.write_certificate(config.write_ca_cert_to)
    log.info(
        "TLS interception CA ready",
        extra={
            "event": "intercept_ca",
            "origin": origin,
            "subject": authority.certificate.subject.rfc4514_string(),
            "sha256": authority.fingerprint,
            "written_to": str(config.write_ca_cert_to) if config.write_ca_cert_to else "-",
        },
    )
    return authority


def _public_der(key: object) -> bytes:
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        return b""
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _os_reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


# ---------------------------------------------------------------------------
# Leaf certificates and the server-side TLS contexts that carry them
# ---------------------------------------------------------------------------


class _Leaf:
    """One host's leaf: its contexts (the HTTP/2 one made when first asked for)."""

    __slots__ = ("chain", "context", "host", "http2_context", "renew_at")

    def __init__(
        self, host: str, chain: bytes, context: ssl.SSLContext, renew_at: datetime.datetime
    ) -> None:
        self.host = host
        self.chain = chain
        self.context = context
        self.http2_context: ssl.SSLContext | None = None
        self.renew_at = renew_at


class LeafCertificates:
    """Server `SSLContext`s for intercepted hosts: one short-lived leaf per host, LRU-cached.

    A context presents the leaf for its host and the CA chain, offers ALPN ``http/1.1``
    (or ``h2`` and ``http/1.1``, asked for with `http2`), and refuses (alert
    ``unrecognized_name``) a client whose SNI names another host: the CA signs only for
    the host the client asked the proxy to CONNECT to, and the requests inside must name
    that host anyway.
    """

    def __init__(
        self,
        authority: CertificateAuthority,
        *,
        lifetime: datetime.timedelta = LEAF_LIFETIME,
        max_hosts: int = LEAF_CACHE_SIZE,
        clock: Clock = _utcnow,
    ) -> None:
        self.authority = authority
        self._lifetime = lifetime
        self._max_hosts = max_hosts
        self._clock = clock
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._key_pem = self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        self._chain_pem = authority.pem()
        self._cache: OrderedDict[str, _Leaf] = OrderedDict()

    def __len__(self) -> int:
        return len(self._cache)

    def context_for(self, host: str, *, http2: bool = False) -> ssl.SSLContext:
        """The server context for `host` (normalised: lower-case, IPv6 without brackets);
        with `http2`, the one that offers h2 as well."""
        now = self._clock()
        leaf = self._cache.get(host)
        if leaf is not None and now < leaf.renew_at:
            self._cache.move_to_end(host)
        else:
            leaf = self._build(host, now)
            self._cache[host] = leaf
            self._cache.move_to_end(host)
            while len(self._cache) > self._max_hosts:
                self._cache.popitem(last=False)
        if not http2:
            return leaf.context
        if leaf.http2_context is None:
            leaf.http2_context = self._context(leaf.host, leaf.chain, ALPN_WITH_HTTP2)
        return leaf.http2_context

    def _build(self, host: str, now: datetime.datetime) -> _Leaf:
        certificate = self.authority.issue_leaf(
            host, self._key.public_key(), now=now, lifetime=self._lifetime
        )
        chain = certificate.public_bytes(serialization.Encoding.PEM) + self._chain_pem
        context = self._context(host, chain, ALPN_PROTOCOLS)
        not_after = certificate.not_valid_after_utc
        renew_at = not_after - min(LEAF_RENEW_BEFORE, (not_after - now) / 2)
        return _Leaf(host, chain, context, renew_at)

    def _context(self, host: str, chain: bytes, alpn: list[str]) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(alpn)
        load_cert_chain_from_memory(context, chain, self._key_pem)
        context.sni_callback = _SniCheck(host)
        return context


class _SniCheck:
    """The `sni_callback` of one host's context: SNI, when sent, must name that host."""

    def __init__(self, host: str) -> None:
        self._host = host

    def __call__(
        self, ssl_object: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: ssl.SSLContext
    ) -> int | None:
        # No SNI (clients send none for IP literals): the CONNECT host's leaf it is.
        if server_name is None or server_name.lower().rstrip(".") == self._host:
            return None
        log.warning(
            "TLS client asked for another host (SNI) than it sent CONNECT to; refused",
            extra={"event": "intercept_sni_mismatch", "host": self._host, "sni": server_name[:253]},
        )
        return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME


def load_cert_chain_from_memory(
    context: ssl.SSLContext, chain_pem: bytes, key_pem: bytes, *, use_memfd: bool = True
) -> None:
    """`context.load_cert_chain` from bytes; the private key is never written to a disk.

    `ssl` reads certificate chains only from files. On Linux these are anonymous
    in-memory files (memfd); elsewhere temporary files in a private directory, the key
    encrypted with a random password that exists only in memory, deleted at once.
    """
    if use_memfd and hasattr(os, "memfd_create"):
        descriptors: list[int] = []
        try:
            for name, data in (("leaf-chain", chain_pem), ("leaf-key", key_pem)):
                fd = os.memfd_create(f"token-proxy-{name}", os.MFD_CLOEXEC)
                descriptors.append(fd)
                _write_all(fd, data)
            cert_fd, key_fd = descriptors
            context.load_cert_chain(f"/proc/self/fd/{cert_fd}", f"/proc/self/fd/{key_fd}")
            return
        except FileNotFoundError:
            pass  # no /proc (an unusual container): fall back to encrypted temporary files
        finally:
            for fd in descriptors:
                os.close(fd)
    password = secrets.token_urlsafe(32).encode("ascii")
    key = serialization.load_pem_private_key(key_pem, password=None)
    encrypted_key = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(password),
    )
    with tempfile.TemporaryDirectory(prefix="token-proxy-leaf-") as directory:
        cert_path = Path(directory, "chain.pem")
        key_path = Path(directory, "key.pem")
        cert_path.write_bytes(chain_pem)
        key_path.write_bytes(encrypted_key)
        context.load_cert_chain(cert_path, key_path, password=password)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


# ---------------------------------------------------------------------------
# The interceptor
# ---------------------------------------------------------------------------
