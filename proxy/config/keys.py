"""Private keys the proxy signs with: one rule for the config check and the signer.

`parse_signing_key()` decides which keys sign client assertions, `parse_dpop_key()`
which keys sign DPoP proofs. The config loader calls them to refuse an unusable
`private_key_file` or `dpop.key_file` at load, and the token code calls the same
functions when it loads the key to sign with, so a key that passes `token-proxy check`
is a key the proxy can sign with.

Accepted: unencrypted PEM or DER (PKCS#8, or the traditional RSA/EC forms).
Client assertions: RSA of at least 2048 bits (RS256, RFC 7518 §3.3) and EC on P-256,
P-384 or P-521 (ES256, ES384, ES512, RFC 7518 §3.4). DPoP proofs: the key that fits
the configured `alg` (EC P-256 for ES256, Ed25519 for EdDSA, RSA of at least 2048 bits
for RS256 and PS256). Messages never quote the key or a library's text about it.
"""

from __future__ import annotations

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.serialization import (
    load_der_private_key,
    load_pem_private_key,
)

__all__ = [
    "MIN_RSA_KEY_BITS",
    "DpopKeyType",
    "SigningKey",
    "UnusableKey",
    "parse_dpop_key",
    "parse_signing_key",
]

SigningKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
DpopKeyType = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey

MIN_RSA_KEY_BITS = 2048
# The JWS algorithm each curve implies (RFC 7518 §3.4).
_EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
# What each DPoP `alg` signs with, as said in messages.
_DPOP_KEY_KINDS = {
    "ES256": "an EC P-256 key",
    "EdDSA": "an Ed25519 key",
    "RS256": f"an RSA key of at least {MIN_RSA_KEY_BITS} bits",
    "PS256": f"an RSA key of at least {MIN_RSA_KEY_BITS} bits",
}


class UnusableKey(ValueError):
    """Why some bytes are no key the proxy signs with; the text never quotes the key."""


def _load_private_key(data: bytes) -> PrivateKeyTypes:
    try:
        if b"-----BEGIN" in data:
            return load_pem_private_key(data, password=None)
        return load_der_private_key(data, password=None)
    except TypeError:
        raise UnusableKey(
            "the private key is encrypted; provide an unencrypted PEM or DER key"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        # The library's messages are not shown: they could quote parts of the key.
        raise UnusableKey("not a PEM- or DER-encoded private key") from None


def _check_rsa_size(key: rsa.RSAPrivateKey, alg: str) -> None:
    if key.key_size < MIN_RSA_KEY_BITS:
        raise UnusableKey(
            f"RSA key is {key.key_size} bits; {alg} needs at least {MIN_RSA_KEY_BITS}"
        )


def parse_signing_key(data: bytes) -> tuple[SigningKey, str]:
    """The client-assertion key in `data` (PEM or DER, unencrypted) and its JWS algorithm."""
    key = _load_private_key(data)
    if isinstance(key, rsa.RSAPrivateKey):
        _check_rsa_size(key, "RS256")
        return key, "RS256"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        algorithm = _EC_ALGORITHMS.get(key.curve.name)
        if algorithm is None:
            raise UnusableKey(
                f"EC curve {key.curve.name} is not supported; use P-256 (ES256), "
                "P-384 (ES384) or P-521 (ES512)"
            )
        return key, algorithm
    raise UnusableKey(
        "must be an RSA (RS256) or EC P-256, P-384 or P-521 (ES256, ES384, ES512) private key"
    )


def _kind(key: PrivateKeyTypes) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        return f"an RSA key of {key.key_size} bits"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return f"an EC key on {key.curve.name}"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "an Ed25519 key"
    return "a key of another kind"


def parse_dpop_key(data: bytes, alg: str) -> DpopKeyType:
    """The DPoP key in `data` (PEM or DER, unencrypted), which must fit `alg`."""
    key = _load_private_key(data)
    wanted = _DPOP_KEY_KINDS.get(alg)
    if wanted is None:
        raise UnusableKey(f"alg {alg} is not supported for DPoP")
    if alg == "ES256":
        if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1":
            return key
    elif alg == "EdDSA":
        if isinstance(key, ed25519.Ed25519PrivateKey):
            return key
    elif isinstance(key, rsa.RSAPrivateKey):
        _check_rsa_size(key, alg)
        return key
    raise UnusableKey(f"alg {alg} needs {wanted}; this file holds {_kind(key)}")
