"""Private keys that sign client assertions: one rule for the config check and the signer.

`parse_signing_key()` is the only place that decides which keys the proxy signs with:
the config loader calls it to refuse an unusable `private_key_file` at load, and the
token code (`proxy.tokens.assertion`) calls it for every assertion it signs, so a key
that passes `token-proxy check` is a key the proxy can sign with.

Accepted: unencrypted PEM or DER (PKCS#8, or the traditional RSA/EC forms), RSA of at
least 2048 bits (RS256, RFC 7518 §3.3) and EC on P-256, P-384 or P-521 (ES256, ES384,
ES512, RFC 7518 §3.4). Messages never quote the key or a library's text about it.
"""

from __future__ import annotations

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import (
    load_der_private_key,
    load_pem_private_key,
)

__all__ = ["MIN_RSA_KEY_BITS", "SigningKey", "UnusableKey", "parse_signing_key"]

SigningKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

MIN_RSA_KEY_BITS = 2048
# The JWS algorithm each curve implies (RFC 7518 §3.4).
_EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}


class UnusableKey(ValueError):
    """Why some bytes are no key the proxy signs with; the text never quotes the key."""


def parse_signing_key(data: bytes) -> tuple[SigningKey, str]:
    """The private key in `data` (PEM or DER, unencrypted) and its JWS algorithm."""
    try:
        if b"-----BEGIN" in data:
            key = load_pem_private_key(data, password=None)
        else:
            key = load_der_private_key(data, password=None)
    except TypeError:
        raise UnusableKey(
            "the private key is encrypted; provide an unencrypted PEM or DER key"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        # The library's messages are not shown: they could quote parts of the key.
        raise UnusableKey("not a PEM- or DER-encoded private key") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_KEY_BITS:
            raise UnusableKey(
                f"RSA key is {key.key_size} bits; RS256 needs at least {MIN_RSA_KEY_BITS}"
            )
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
