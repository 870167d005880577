"""Tests for the `token.dpop` section: the proof key and its algorithm, one rule at load
and when the key is loaded to sign (`proxy.config.keys.parse_dpop_key`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from proxy.config import DpopConfig, load_config
from proxy.config.keys import UnusableKey, parse_dpop_key
from proxy.tokens.dpop import DpopKey, ProofSigner
from tests.config.documents import ENV, TOKEN, UP, Case, assert_problem, der, edited, pem
from tests.config.documents import write as write_config

CASES = [
    Case(
        "dpop-null",
        {f"{TOKEN}.dpop": None},
        f"{TOKEN}.dpop",
        "expected a mapping, got null (write dpop: {} for a key generated at start-up, "
        "or remove the key)",
    ),
    Case(
        "dpop-unknown-alg",
        {f"{TOKEN}.dpop": {"alg": "HS256"}},
        f"{TOKEN}.dpop.alg",
        "'HS256': must be one of ES256, EdDSA, RS256, PS256 (did you mean RS256?)",
    ),
    Case(
        "dpop-unknown-key",
        {f"{TOKEN}.dpop": {"key": "FILES/ec.pem"}},
        f"{TOKEN}.dpop.key",
        "unknown key (expected one of: key_file, alg)",
    ),
    Case(
        "dpop-rsa-key-for-es256",
        {f"{TOKEN}.dpop": {"key_file": "FILES/rsa.pem"}},
        f"{TOKEN}.dpop.key_file",
        "alg ES256 needs an EC P-256 key; this file holds an RSA key of 2048 bits",
    ),
    Case(
        "dpop-p384-key-for-es256",
        {f"{TOKEN}.dpop": {"key_file": "FILES/ec384.pem", "alg": "ES256"}},
        f"{TOKEN}.dpop.key_file",
        "alg ES256 needs an EC P-256 key; this file holds an EC key on secp384r1",
    ),
    Case(
        "dpop-ec-key-for-eddsa",
        {f"{TOKEN}.dpop": {"key_file": "FILES/ec.pem", "alg": "EdDSA"}},
        f"{TOKEN}.dpop.key_file",
        "alg EdDSA needs an Ed25519 key; this file holds an EC key on secp256r1",
    ),
    Case(
        "dpop-short-rsa",
        {f"{TOKEN}.dpop": {"key_file": "FILES/rsa1024.pem", "alg": "PS256"}},
        f"{TOKEN}.dpop.key_file",
        "RSA key is 1024 bits; PS256 needs at least 2048",
    ),
    Case(
        "dpop-not-a-key",
        {f"{TOKEN}.dpop": {"key_file": "FILES/secret-not-a-key.pem"}},
        f"{TOKEN}.dpop.key_file",
        "not a PEM- or DER-encoded private key",
    ),
    Case(
        "dpop-encrypted",
        {f"{TOKEN}.dpop": {"key_file": "FILES/encrypted.pem", "alg": "RS256"}},
        f"{TOKEN}.dpop.key_file",
        "the private key is encrypted; provide an unencrypted PEM or DER key",
    ),
    Case(
        "dpop-missing-file",
        {f"{TOKEN}.dpop": {"key_file": "FILES/nope.pem"}},
        f"{TOKEN}.dpop.key_file",
        "file does not exist",
    ),
    Case(
        "dpop-custom-header",
        {f"{TOKEN}.dpop": {}, f"{UP}.header": "X-Api-Token"},
        f"{UP}.header",
        "must be Authorization with token.dpop (RFC 9449 §7.1)",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_each_problem_names_file_key_path_and_problem(
    case: Case, tmp_path: Path, files: Path
) -> None:
    assert_problem(case, tmp_path, files)


def test_an_empty_section_is_a_generated_es256_key(tmp_path: Path, files: Path) -> None:
    document = edited({f"{TOKEN}.dpop": {}})
    token = load_config(write_config(tmp_path, document, files), environ=ENV).upstreams[0].token
    assert token.dpop == DpopConfig(key_file=None, alg="ES256")


def test_no_section_is_no_dpop(tmp_path: Path, files: Path) -> None:
    token = load_config(write_config(tmp_path, edited({}), files), environ=ENV).upstreams[0].token
    assert token.dpop is None


KEYS: dict[str, Any] = {
    "ES256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "EdDSA": ed25519.Ed25519PrivateKey.generate,
    "RS256": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
    "PS256": lambda: rsa.generate_private_key(public_exponent=65537, key_size=3072),
}


@pytest.mark.parametrize("encoding", [pem, der], ids=["pem", "der"])
@pytest.mark.parametrize("alg", KEYS)
def test_a_key_file_the_loader_accepts_signs_proofs_pyjwt_verifies(
    alg: str, encoding: Any, tmp_path: Path, files: Path
) -> None:
    private = KEYS[alg]()
    key_file = tmp_path / "dpop.key"
    key_file.write_bytes(encoding(private))
    document = edited({f"{TOKEN}.dpop": {"key_file": str(key_file), "alg": alg}})
    token = load_config(write_config(tmp_path, document, files), environ=ENV).upstreams[0].token
    assert token.dpop == DpopConfig(key_file=key_file, alg=alg)  # type: ignore[arg-type]

    key = DpopKey.from_config(token.dpop)
    assert not key.generated
    proof = ProofSigner(key).proof("GET", "https://inventory.internal/items", "tok").decode()
    header = jwt.get_unverified_header(proof)
    assert header["typ"] == "dpop+jwt"
    assert header["alg"] == alg
    assert header["jwk"] == key.jwk
    # The embedded key is the file's public key, and nothing private.
    assert not {"d", "p", "q", "dp", "dq", "qi"} & header["jwk"].keys()
    claims = jwt.decode(proof, private.public_key(), algorithms=[alg])
    assert (claims["htm"], claims["htu"]) == ("GET", "https://inventory.internal/items")


def test_the_signer_refuses_what_the_loader_refuses(files: Path) -> None:
    with pytest.raises(UnusableKey, match="alg EdDSA needs an Ed25519 key"):
        parse_dpop_key((files / "rsa.pem").read_bytes(), "EdDSA")
    with pytest.raises(UnusableKey, match="alg ES256 needs an EC P-256 key"):
        DpopKey.from_config(DpopConfig(key_file=files / "ed25519.pem"))
