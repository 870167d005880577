"""The key DPoP proofs are signed with (RFC 9449 §4.2), its public JWK and thumbprint.

A `DpopKey` is loaded from `dpop.key_file` (checked by `proxy.config.keys`, the same
rule the config check applies) or generated in memory at start-up, and lives as long
as its upstream's token provider: a reload that keeps the token settings keeps the key,
so the tokens bound to it stay usable. Signing goes straight to `cryptography` and
returns the JWS signature bytes (RFC 7518 §3.4: ECDSA as the fixed-length R || S, not
DER).
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable
from typing import Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from proxy.config import DpopAlgorithm, DpopConfig
from proxy.config.keys import DpopKeyType, parse_dpop_key

__all__ = ["DpopKey", "b64url", "jwk_thumbprint"]

_Sign = Callable[[bytes], bytes]

_GENERATED_RSA_BITS: Final = 2048
# The members of each key type that define its RFC 7638 thumbprint (§3.2).
_THUMBPRINT_MEMBERS: Final = {
    "EC": ("crv", "kty", "x", "y"),
    "OKP": ("crv", "kty", "x"),
    "RSA": ("e", "kty", "n"),
}


def b64url(data: bytes) -> str:
    """Base64url without padding (RFC 7515 §2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unsigned_bytes(number: int) -> bytes:
    return number.to_bytes(max(1, (number.bit_length() + 7) // 8), "big")


def jwk_thumbprint(jwk: dict[str, str]) -> str:
    """The RFC 7638 SHA-256 thumbprint of a public JWK, base64url."""
    members = {name: jwk[name] for name in _THUMBPRINT_MEMBERS[jwk["kty"]]}
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True)
    return b64url(hashlib.sha256(canonical.encode("ascii")).digest())


def _generate(alg: DpopAlgorithm) -> DpopKeyType:
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if alg == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    return rsa.generate_private_key(public_exponent=65537, key_size=_GENERATED_RSA_BITS)


def _public_jwk(key: DpopKeyType) -> dict[str, str]:
    """The public JWK (RFC 7517) of `key`: only public members, in thumbprint order."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        numbers = key.public_key().public_numbers()
        return {
            "crv": "P-256",
            "kty": "EC",
            "x": b64url(numbers.x.to_bytes(32, "big")),
            "y": b64url(numbers.y.to_bytes(32, "big")),
        }
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.public_key().public_bytes_raw()
        return {"crv": "Ed25519", "kty": "OKP", "x": b64url(raw)}
    public = key.public_key().public_numbers()
    return {
        "e": b64url(_unsigned_bytes(public.e)),
        "kty": "RSA",
        "n": b64url(_unsigned_bytes(public.n)),
    }


class DpopKey:
    """One upstream's DPoP private key, its algorithm, public JWK and thumbprint.

    `generated` tells a key made at start-up (one per replica) from one read from a
    file (possibly the same on every replica: only then may tokens be shared).
    """

    __slots__ = ("_key", "_sign", "alg", "generated", "jwk", "thumbprint")

    def __init__(self, key: DpopKeyType, alg: DpopAlgorithm, *, generated: bool) -> None:
        self._key = key
        self.alg = alg
        self.generated = generated
        self.jwk = _public_jwk(key)
        self.thumbprint = jwk_thumbprint(self.jwk)
        self._sign = _signer(key, alg)

    @classmethod
    def from_config(cls, config: DpopConfig) -> DpopKey:
        """The key of `config`: read from `key_file`, or generated now.

        Raises `OSError` or `proxy.config.keys.UnusableKey` for a file that was fine at
        load and is not any more.
        """
        if config.key_file is None:
            return cls(_generate(config.alg), config.alg, generated=True)
        data = config.key_file.read_bytes()
        return cls(parse_dpop_key(data, config.alg), config.alg, generated=False)

    def sign(self, signing_input: bytes) -> bytes:
        """The JWS signature of `signing_input` (RFC 7515 §5.1) under this key's alg."""
        return self._sign(signing_input)

    def __repr__(self) -> str:
        return f"<DpopKey {self.alg} {self.thumbprint}>"


def _signer(key: DpopKeyType, alg: DpopAlgorithm) -> _Sign:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        ecdsa = ec.ECDSA(hashes.SHA256())

        def sign_ecdsa(data: bytes) -> bytes:
            r, s = decode_dss_signature(key.sign(data, ecdsa))
            return r.to_bytes(32, "big") + s.to_bytes(32, "big")

        return sign_ecdsa
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign
    sha256 = hashes.SHA256()
    scheme: padding.AsymmetricPadding
    if alg == "PS256":
        # RFC 7518 §3.5: MGF1 with SHA-256, a salt as long as the hash.
        scheme = padding.PSS(mgf=padding.MGF1(sha256), salt_length=sha256.digest_size)
    else:
        scheme = padding.PKCS1v15()

    def sign_rsa(data: bytes) -> bytes:
        return key.sign(data, scheme, sha256)

    return sign_rsa
