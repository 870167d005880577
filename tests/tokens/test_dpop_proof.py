"""Tests for `proxy.tokens.dpop`: proofs, ``htu`` normalisation, thumbprints, nonces.

Proofs are checked with PyJWT (an implementation of JWS of its own), thumbprints
against RFC 7638's example.
"""

from __future__ import annotations

import base64
import hashlib

import jwt
import pytest

from proxy.config import DpopConfig
from proxy.tokens.dpop import (
    DpopKey,
    DpopSession,
    ProofSigner,
    access_token_hash,
    asks_for_nonce,
    jwk_thumbprint,
    target_uri,
    valid_nonce,
)
from proxy.tokens.dpop.nonces import MAX_ORIGINS, NonceBook

# RFC 7638 §3.1.
RFC7638_JWK = {
    "kty": "RSA",
    "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSo"
    "c_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0"
    "_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4"
    "vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
    "e": "AQAB",
    "alg": "RS256",
    "kid": "2011-04-29",
}


def test_the_thumbprint_is_rfc_7638s() -> None:
    assert jwk_thumbprint(RFC7638_JWK) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


@pytest.mark.parametrize("alg", ["ES256", "EdDSA", "RS256", "PS256"])
def test_a_proof_has_every_claim_and_verifies_with_its_embedded_key(alg: str) -> None:
    key = DpopKey.from_config(DpopConfig(alg=alg))  # type: ignore[arg-type]
    assert key.generated
    signer = ProofSigner(key, wall_clock=lambda: 1_700_000_000.7)
    proof = signer.proof("POST", "https://api.example/v1/items", "the-token", "n-1").decode()
    header = jwt.get_unverified_header(proof)
    assert header == {"typ": "dpop+jwt", "alg": alg, "jwk": key.jwk}
    public = jwt.PyJWK(header["jwk"], algorithm=alg)
    claims = jwt.decode(proof, public.key, algorithms=[alg])
    assert claims.keys() == {"jti", "htm", "htu", "iat", "ath", "nonce"}
    assert (claims["htm"], claims["htu"], claims["iat"]) == (
        "POST",
        "https://api.example/v1/items",
        1_700_000_000,
    )
    digest = hashlib.sha256(b"the-token").digest()
    assert claims["ath"] == base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    assert claims["nonce"] == "n-1"
    assert len(base64.urlsafe_b64decode(claims["jti"] + "==")) >= 12  # >= 96 bits
    assert key.thumbprint == jwk_thumbprint(header["jwk"])


def test_every_proof_has_its_own_jti_and_no_ath_without_a_token() -> None:
    signer = ProofSigner(DpopKey.from_config(DpopConfig()))
    proofs = [signer.proof("GET", "https://a.example/") for _ in range(200)]
    claims = [jwt.decode(p, options={"verify_signature": False}) for p in proofs]
    assert len({c["jti"] for c in claims}) == 200
    assert all("ath" not in c and "nonce" not in c for c in claims)


def test_ath_follows_the_token() -> None:
    signer = ProofSigner(DpopKey.from_config(DpopConfig()))
    for token in ("first", "second", "first"):
        claims = jwt.decode(
            signer.proof("GET", "https://a.example/", token), options={"verify_signature": False}
        )
        assert claims["ath"] == access_token_hash(token)


@pytest.mark.parametrize(
    ("scheme", "authority", "target", "htu"),
    [
        ("https", "api.example", "/items?limit=5", "https://api.example/items"),
        ("https", "API.Example:443", "/items#frag", "https://api.example/items"),
        ("http", "api.example:80", "", "http://api.example/"),
        ("http", "api.example:8080", "/", "http://api.example:8080/"),
        ("https", "api.example:80", "/x", "https://api.example:80/x"),
        ("HTTPS", "[::1]:443", "/x", "https://[::1]/x"),
        ("https", "a.example", "/%7euser/%2f%3a", "https://a.example/~user/%2F%3A"),
        ("https", "a.example", "/a/./b/../c", "https://a.example/a/c"),
        ("https", "a.example", "/a/b/..", "https://a.example/a/"),
        ("https", "a.example", "/Items/ABC", "https://a.example/Items/ABC"),
    ],
)
def test_htu_is_normalised_as_rfc_9449_compares_it(
    scheme: str, authority: str, target: str, htu: str
) -> None:
    assert target_uri(scheme, authority, target) == htu


def test_a_token_request_proof_is_for_post_to_the_endpoint_with_the_servers_nonce() -> None:
    session = DpopSession(DpopKey.from_config(DpopConfig()))
    first = jwt.decode(
        session.token_request_proof("https://Auth.example:443/oauth/token?x=1"),
        options={"verify_signature": False},
    )
    assert (first["htm"], first["htu"]) == ("POST", "https://auth.example/oauth/token")
    assert "nonce" not in first
    assert "ath" not in first
    assert session.note_authorization_nonce("eyJ7S_zG.eyJH0-Z.HX4w-7v")
    assert not session.note_authorization_nonce('bad "nonce"')
    second = jwt.decode(
        session.token_request_proof("https://auth.example/oauth/token"),
        options={"verify_signature": False},
    )
    assert second["nonce"] == "eyJ7S_zG.eyJH0-Z.HX4w-7v"


def test_resource_nonces_are_kept_per_origin() -> None:
    session = DpopSession(DpopKey.from_config(DpopConfig()))
    assert session.note_resource_nonce("https", "a.example:443", "n-a")
    assert session.note_resource_nonce("https", "b.example", "n-b")

    def nonce_of(authority: str, path: str) -> object:
        proof = session.request_proof("GET", "https", authority, path, "tok")
        return jwt.decode(proof, options={"verify_signature": False}).get("nonce")

    assert nonce_of("A.example", "/x?y") == "n-a"
    assert nonce_of("b.example:443", "/") == "n-b"
    assert nonce_of("c.example", "/") is None
    assert session.note_resource_nonce("https", "a.example", "n-a2")
    assert nonce_of("a.example", "/") == "n-a2"


def test_the_nonce_book_is_bounded() -> None:
    book = NonceBook()
    for index in range(MAX_ORIGINS + 50):
        assert book.note(f"https://h{index}.example", f"n{index}")
    assert len(book) == MAX_ORIGINS
    assert book.get("https://h0.example") is None
    assert book.get(f"https://h{MAX_ORIGINS + 49}.example") == f"n{MAX_ORIGINS + 49}"


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        ("abc", "abc"),
        (" abc ", "abc"),
        ("", None),
        ('a"b', None),
        ("a\\b", None),
        ("a b", None),
        ("é", None),
        ("x" * 513, None),
        (None, None),
    ],
)
def test_only_nonces_of_rfc_9449_syntax_are_kept(value: str | None, valid: str | None) -> None:
    assert valid_nonce(value) == valid


@pytest.mark.parametrize(
    ("challenge", "asks"),
    [
        ('DPoP error="use_dpop_nonce", error_description="Resource server requires nonce"', True),
        ('Bearer realm="x", DPoP algs="ES256", error="use_dpop_nonce"', True),
        ("DPoP error=use_dpop_nonce", True),
        ('DPoP error="invalid_token"', False),
        ('DPoP error="invalid_dpop_proof"', False),
        ('Bearer error="invalid_token"', False),
        ("", False),
    ],
)
def test_a_challenge_asks_for_a_nonce_only_with_use_dpop_nonce(challenge: str, asks: bool) -> None:
    assert asks_for_nonce(challenge) is asks
