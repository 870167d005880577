"""Tests for `proxy.config.keys`: one rule for private keys, at load and when signing.

A key the loader accepts is a key `proxy.tokens.assertion` signs with (PEM or DER; RSA,
EC P-256, P-384 and P-521, each with its JWS algorithm), and a key it refuses is
refused by the signer for the same reason. Signatures are checked with PyJWT.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from proxy.config import load_config
from proxy.config.keys import UnusableKey, parse_signing_key
from proxy.errors import InvalidClient
from proxy.tokens.assertion import ASSERTION_LIFETIME, client_assertion, load_signing_key
from tests.config.documents import (
    DELETE,
    ENV,
    SECRET,
    TOKEN,
    Case,
    assert_problem,
    der,
    edited,
    pem,
    write,
)

NOT_RSA_OR_EC = (
    "must be an RSA (RS256) or EC P-256, P-384 or P-521 (ES256, ES384, ES512) private key"
)
NOT_A_KEY = "not a PEM- or DER-encoded private key"
ENCRYPTED = "the private key is encrypted; provide an unencrypted PEM or DER key"
BAD_KEYS = {
    "ed25519.pem": NOT_RSA_OR_EC,
    "secp256k1.pem": (
        "EC curve secp256k1 is not supported; use P-256 (ES256), P-384 (ES384) or P-521 (ES512)"
    ),
    "rsa1024.pem": "RSA key is 1024 bits; RS256 needs at least 2048",
    "encrypted.pem": ENCRYPTED,
    "encrypted.der": ENCRYPTED,
    "secret-not-a-key.pem": NOT_A_KEY,
    "client.crt": NOT_A_KEY,
    "empty": NOT_A_KEY,
}
TOKEN_URL = "https://auth.example.com/oauth/token"

CASES = [
    Case(
        f"private-key-{name}",
        {f"{TOKEN}.client_secret_file": DELETE, f"{TOKEN}.private_key_file": f"FILES/{name}"},
        f"{TOKEN}.private_key_file",
        problem,
    )
    for name, problem in BAD_KEYS.items()
] + [
    Case(
        "private-key-missing-file",
        {f"{TOKEN}.client_secret_file": DELETE, f"{TOKEN}.private_key_file": "FILES/nope.pem"},
        f"{TOKEN}.private_key_file",
        "file does not exist",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_each_problem_names_file_key_path_and_problem(
    case: Case, tmp_path: Path, files: Path
) -> None:
    assert_problem(case, tmp_path, files)


def _traditional_pem(key: Any) -> bytes:
    data: bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    return data


@pytest.fixture(scope="module")
def signing_keys() -> dict[str, tuple[Any, str]]:
    """One key per kind the signer takes, with the JWS algorithm it implies."""
    return {
        "rsa": (rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256"),
        "rsa3072": (rsa.generate_private_key(public_exponent=65537, key_size=3072), "RS256"),
        "p256": (ec.generate_private_key(ec.SECP256R1()), "ES256"),
        "p384": (ec.generate_private_key(ec.SECP384R1()), "ES384"),
        "p521": (ec.generate_private_key(ec.SECP521R1()), "ES512"),
    }


ENCODINGS = {"pem": pem, "der": der, "traditional-pem": _traditional_pem}


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("kind", ["rsa", "rsa3072", "p256", "p384", "p521"])
def test_a_key_the_loader_accepts_is_a_key_the_signer_signs_with(
    kind: str,
    encoding: str,
    signing_keys: dict[str, tuple[Any, str]],
    tmp_path: Path,
    files: Path,
) -> None:
    key, algorithm = signing_keys[kind]
    key_file = tmp_path / f"{kind}.{encoding}"
    key_file.write_bytes(ENCODINGS[encoding](key))
    document = edited(
        {
            f"{TOKEN}.client_secret_file": DELETE,
            f"{TOKEN}.private_key_file": str(key_file),
            f"{TOKEN}.key_id": "key-1",
        }
    )
    token = load_config(write(tmp_path, document, files), environ=ENV).upstreams[0].token
    assert (token.auth_method, token.private_key_file) == ("private_key_jwt", key_file)
    assert parse_signing_key(key_file.read_bytes())[1] == algorithm

    assertion = client_assertion(token, TOKEN_URL)
    assert jwt.get_unverified_header(assertion) == {"alg": algorithm, "kid": "key-1", "typ": "JWT"}
    claims = jwt.decode(assertion, key.public_key(), algorithms=[algorithm], audience=TOKEN_URL)
    assert (claims["iss"], claims["sub"], claims["aud"]) == ("order-service",) * 2 + (TOKEN_URL,)
    assert claims["exp"] - claims["iat"] == ASSERTION_LIFETIME


@pytest.mark.parametrize(("name", "problem"), BAD_KEYS.items(), ids=BAD_KEYS.keys())
def test_the_signer_refuses_what_the_loader_refuses_for_the_same_reason(
    name: str, problem: str, files: Path
) -> None:
    with pytest.raises(UnusableKey) as parsed:
        parse_signing_key((files / name).read_bytes())
    assert str(parsed.value) == problem
    with pytest.raises(InvalidClient) as signing:
        load_signing_key(files / name)
    assert problem in str(signing.value)
    assert str(files / name) in str(signing.value)
    assert SECRET not in str(signing.value)


def test_the_signer_reads_the_key_file_again_at_every_use(tmp_path: Path) -> None:
    """A rotated key file is used at the next assertion, by the same rule."""
    key_file = tmp_path / "key"
    first = ec.generate_private_key(ec.SECP256R1())
    key_file.write_bytes(der(first))
    assert load_signing_key(key_file)[1] == "ES256"
    rotated = ec.generate_private_key(ec.SECP384R1())
    key_file.write_bytes(pem(rotated))
    key, algorithm = load_signing_key(key_file)
    assert algorithm == "ES384"
    assert key.private_numbers() == rotated.private_numbers()
