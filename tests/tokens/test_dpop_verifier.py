"""The strict DPoP verifier the suite judges proofs with (RFC 9449 §4.3, §7.1).

It must accept the RFC's own example proofs and refuse every broken proof, each for its
own reason; a lenient verifier would let a broken signer pass.
"""

from __future__ import annotations

import base64
import json
import uuid
import warnings
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

import tests.support.dpop as dpop_module
from tests.support.dpop import (
    DpopClientKey,
    DpopProofError,
    DpopVerifier,
    Reason,
    access_token_hash,
    jwk_thumbprint,
    normalize_htu,
    single_dpop_header,
)

# RFC 9449 §4.1 (Figure 4): a proof for the token request of Figure 3.
RFC_TOKEN_PROOF = (
    "eyJ0eXAiOiJkcG9wK2p3dCIsImFsZyI6IkVTMjU2IiwiandrIjp7Imt0eSI6Ik"
    "VDIiwieCI6Imw4dEZyaHgtMzR0VjNoUklDUkRZOXpDa0RscEJoRjQyVVFVZldWQVdCR"
    "nMiLCJ5IjoiOVZFNGpmX09rX282NHpiVFRsY3VOSmFqSG10NnY5VERWclUwQ2R2R1JE"
    "QSIsImNydiI6IlAtMjU2In19.eyJqdGkiOiItQndDM0VTYzZhY2MybFRjIiwiaHRtIj"
    "oiUE9TVCIsImh0dSI6Imh0dHBzOi8vc2VydmVyLmV4YW1wbGUuY29tL3Rva2VuIiwia"
    "WF0IjoxNTYyMjYyNjE2fQ.2-GxA6T8lP4vfrg8v-FdWP0A0zdrj8igiMLvqRMUvwnQg"
    "4PtFLbdLXiOSsX0x7NVY-FNyJK70nfbV37xRZT3Lg"
)
RFC_TOKEN_IAT = 1562262616
# RFC 9449 §7.1 (Figure 14): a proof with `ath` for the access token of Figure 13.
RFC_RESOURCE_PROOF = (
    "eyJ0eXAiOiJkcG9wK2p3dCIsImFsZyI6IkVTMjU2IiwiandrIjp7Imt0eSI6IkVDIiwieCI6Imw4dEZyaHgt"
    "MzR0VjNoUklDUkRZOXpDa0RscEJoRjQyVVFVZldWQVdCRnMiLCJ5IjoiOVZFNGpmX09rX282NHpiVFRsY3VO"
    "SmFqSG10NnY5VERWclUwQ2R2R1JEQSIsImNydiI6IlAtMjU2In19.eyJqdGkiOiJlMWozVl9iS2ljOC1MQUVC"
    "IiwiaHRtIjoiR0VUIiwiaHR1IjoiaHR0cHM6Ly9yZXNvdXJjZS5leGFtcGxlLm9yZy9wcm90ZWN0ZWRyZXNv"
    "dXJjZSIsImlhdCI6MTU2MjI2MjYxOCwiYXRoIjoiZlVIeU8ycjJaM0RaNTNFc05yV0JiMHhXWG9hTnk1OUlp"
    "S0NBcWtzbVFFbyJ9.2oW9RP35yRqzhrtNP86L-Ey71EOptxRimPPToA1plemAgR6pxHF8y6-yqyVnmcw6Fy1d"
    "qd-jfxSYoMxhAJpLjA"
)
RFC_RESOURCE_IAT = 1562262618
RFC_ACCESS_TOKEN = "Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU"
RFC_ATH = "fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo"
# RFC 9449 §6.1: the thumbprint of the examples' key, as a token's cnf.jkt.
RFC_JKT = "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"
RFC_JWK = {
    "kty": "EC",
    "x": "l8tFrhx-34tV3hRICRDY9zCkDlpBhF42UQUfWVAWBFs",
    "y": "9VE4jf_Ok_o64zbTTlcuNJajHmt6v9TDVrU0CdvGRDA",
    "crv": "P-256",
}
# RFC 7638 §3.1.
RFC7638_JWK = {
    "kty": "RSA",
    "n": (
        "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_B"
        "JECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_F"
        "DW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4"
        "vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
    ),
    "e": "AQAB",
    "alg": "RS256",
    "kid": "2011-04-29",
}
RFC7638_THUMBPRINT = "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"

NOW = 1_750_000_000.0
URL = "https://api.example.com/orders"


@pytest.fixture(scope="module")
def signer() -> DpopClientKey:
    return DpopClientKey.generate("ES256")


@pytest.fixture
def verifier() -> DpopVerifier:
    return DpopVerifier(max_age=60, clock=lambda: NOW)


def refused(verifier: DpopVerifier, proof: str, **request: Any) -> Reason:
    """The reason `verifier` refuses `proof` for `request` (GET URL unless told)."""
    with pytest.raises(DpopProofError) as caught:
        verifier.verify(proof, **{"method": "GET", "url": URL, **request})
    return caught.value.reason


def b64(data: dict[str, Any] | bytes) -> str:
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def claims(**changes: Any) -> dict[str, Any]:
    return {"jti": "Zq3v_8Hn2Lk0Wx9RtY6uBc", "htm": "GET", "htu": URL, "iat": NOW, **changes}


# -- the RFC's examples ------------------------------------------------------------


def test_the_rfc_token_request_proof_verifies() -> None:
    verifier = DpopVerifier(clock=lambda: RFC_TOKEN_IAT + 5)
    verified = verifier.verify_proof(
        RFC_TOKEN_PROOF, method="POST", url="https://server.example.com/token"
    )
    assert verified.claims == {
        "jti": "-BwC3ESc6acc2lTc",
        "htm": "POST",
        "htu": "https://server.example.com/token",
        "iat": RFC_TOKEN_IAT,
    }
    assert verified.header == {"typ": "dpop+jwt", "alg": "ES256", "jwk": RFC_JWK}
    assert verified.jkt == RFC_JKT


def test_the_rfc_resource_request_proof_verifies_with_its_token_and_key() -> None:
    verifier = DpopVerifier()
    got = verifier.verify(
        RFC_RESOURCE_PROOF,
        method="GET",
        url="https://resource.example.org/protectedresource",
        access_token=RFC_ACCESS_TOKEN,
        jkt=RFC_JKT,
        now=RFC_RESOURCE_IAT,
    )
    assert got["ath"] == RFC_ATH
    assert got["jti"] == "e1j3V_bKic8-LAEB"


def test_the_rfc_examples_are_refused_for_what_differs() -> None:
    def at(when: float) -> DpopVerifier:
        return DpopVerifier(clock=lambda: when)

    token_url = "https://server.example.com/token"
    resource_url = "https://resource.example.org/protectedresource"
    assert refused(at(RFC_TOKEN_IAT + 61), RFC_TOKEN_PROOF, method="POST", url=token_url) == (
        Reason.IAT_TOO_OLD
    )
    assert refused(DpopVerifier(), RFC_TOKEN_PROOF, method="POST", url=token_url) == (
        Reason.IAT_TOO_OLD
    )
    assert refused(at(RFC_TOKEN_IAT), RFC_TOKEN_PROOF, method="GET", url=token_url) == Reason.HTM
    assert refused(at(RFC_TOKEN_IAT), RFC_TOKEN_PROOF, method="POST", url=resource_url) == (
        Reason.HTU
    )
    resource = {"method": "GET", "url": resource_url}
    assert (
        refused(at(RFC_RESOURCE_IAT), RFC_RESOURCE_PROOF, **resource, access_token="other")
        == Reason.ATH_WRONG
    )
    assert (
        refused(at(RFC_RESOURCE_IAT), RFC_RESOURCE_PROOF, **resource, jkt=RFC7638_THUMBPRINT)
        == Reason.JKT_MISMATCH
    )
    with_nonce = at(RFC_RESOURCE_IAT)
    with_nonce.nonce = "eyJ7S_zG.eyJH0-Z.HX4w-7v"
    assert refused(with_nonce, RFC_RESOURCE_PROOF, **resource) == Reason.NONCE_MISSING


def test_the_rfc_access_token_hash() -> None:
    assert access_token_hash(RFC_ACCESS_TOKEN) == RFC_ATH


def test_the_rfc_7638_thumbprint() -> None:
    assert jwk_thumbprint(RFC7638_JWK) == RFC7638_THUMBPRINT
    # Only the required members count, in whatever order they come.
    bare = {"e": RFC7638_JWK["e"], "n": RFC7638_JWK["n"], "kty": "RSA"}
    assert jwk_thumbprint(bare) == RFC7638_THUMBPRINT
    assert jwk_thumbprint({**RFC_JWK, "use": "sig", "kid": "k1"}) == RFC_JKT


@pytest.mark.parametrize(
    "jwk",
    [
        {"kty": "EC", "crv": "P-256", "x": "abc"},
        {"kty": "XYZ"},
        {"kty": "RSA", "n": 1, "e": "AQAB"},
    ],
)
def test_a_thumbprint_needs_every_required_member(jwk: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"kty|member"):
        jwk_thumbprint(jwk)


# -- the DPoP header field ------------------------------------------------------------


def test_exactly_one_dpop_header_field_is_accepted() -> None:
    assert single_dpop_header([RFC_TOKEN_PROOF]) == RFC_TOKEN_PROOF
    for values in ([], [RFC_TOKEN_PROOF, RFC_TOKEN_PROOF], [f"{RFC_TOKEN_PROOF}, x.y.z"], [" "]):
        with pytest.raises(DpopProofError) as caught:
            single_dpop_header(values)
        assert caught.value.reason == Reason.HEADER_COUNT


# -- well-formed proofs of every accepted algorithm -------------------------------------


@pytest.mark.parametrize("alg", ["ES256", "ES384", "ES512", "EdDSA", "RS256", "PS256"])
def test_proofs_of_every_asymmetric_algorithm_verify(alg: str, verifier: DpopVerifier) -> None:
    signer = DpopClientKey.generate(alg)
    proof = signer.proof("GET", URL, iat=NOW, access_token="tok-1")
    verified = verifier.verify_proof(
        proof, method="GET", url=URL, access_token="tok-1", jkt=signer.jkt
    )
    assert verified.header["alg"] == alg
    assert verified.jkt == signer.jkt


def test_an_algorithm_outside_the_accepted_set_is_refused() -> None:
    only_es256 = DpopVerifier(algorithms={"ES256"}, clock=lambda: NOW)
    proof = DpopClientKey.generate("EdDSA").proof("GET", URL, iat=NOW)
    assert refused(only_es256, proof) == Reason.ALG
    with pytest.raises(ValueError, match="not asymmetric"):
        DpopVerifier(algorithms={"ES256", "HS256"})


# -- broken proofs ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "proof",
    [
        "",
        "not-a-jwt",
        "a.b",
        "a.b.c.d",
        f"{b64({'typ': 'dpop+jwt'})}..sig",
        f"{b64(b'not json')}.{b64(claims())}.c2ln",
        f"{b64(b'[1, 2]')}.{b64(claims())}.c2ln",
        f"{b64({'typ': 'dpop+jwt'})}.{b64(b'not json')}.c2ln",
        b64({"typ": "dpop+jwt"}) + "." + b64(b'"a string"') + ".c2ln",
        f"{b64({'typ': 'dpop+jwt'})}.{b64(claims())}.not*base64",
    ],
)
def test_a_malformed_proof_is_refused(proof: str, verifier: DpopVerifier) -> None:
    assert refused(verifier, proof) == Reason.MALFORMED


@pytest.mark.parametrize("typ", ["JWT", "DPoP+JWT", "application/dpop+jwt", "", None])
def test_the_typ_must_be_dpop_jwt(typ: str | None, signer: DpopClientKey) -> None:
    verifier = DpopVerifier(clock=lambda: NOW)
    if typ is None:
        proof = signer.proof("GET", URL, iat=NOW, omit=["typ"])
    else:
        proof = signer.proof("GET", URL, iat=NOW, header={"typ": typ})
    assert refused(verifier, proof) == Reason.TYP


def test_alg_none_is_refused(signer: DpopClientKey, verifier: DpopVerifier) -> None:
    header = {"typ": "dpop+jwt", "alg": "none", "jwk": signer.public_jwk}
    assert refused(verifier, f"{b64(header)}.{b64(claims())}.") == Reason.ALG
    # Nor does a signature make "none" acceptable.
    assert refused(verifier, f"{b64(header)}.{b64(claims())}.c2ln") == Reason.ALG


@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
def test_a_mac_is_refused(alg: str, verifier: DpopVerifier) -> None:
    secret = b"k" * 64
    jwk = {"kty": "oct", "k": b64(secret)}
    proof = jwt.encode(claims(), secret, algorithm=alg, headers={"typ": "dpop+jwt", "jwk": jwk})
    assert refused(verifier, proof) == Reason.ALG


def test_a_proof_without_alg_is_refused(signer: DpopClientKey, verifier: DpopVerifier) -> None:
    header = {"typ": "dpop+jwt", "jwk": signer.public_jwk}
    assert refused(verifier, f"{b64(header)}.{b64(claims())}.c2ln") == Reason.ALG


def test_a_proof_without_jwk_is_refused(signer: DpopClientKey, verifier: DpopVerifier) -> None:
    proof = signer.proof("GET", URL, iat=NOW, omit=["jwk"], header={"kid": "k1"})
    assert refused(verifier, proof) == Reason.JWK_MISSING


def test_a_private_ec_key_in_the_header_is_refused(verifier: DpopVerifier) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    private_jwk = ECAlgorithm.to_jwk(key, as_dict=True)
    assert "d" in private_jwk
    proof = jwt.encode(
        claims(), key, algorithm="ES256", headers={"typ": "dpop+jwt", "jwk": private_jwk}
    )
    assert refused(verifier, proof) == Reason.JWK_PRIVATE


def test_a_private_rsa_key_in_the_header_is_refused(verifier: DpopVerifier) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_jwk = RSAAlgorithm.to_jwk(key, as_dict=True)
    for member in ("d", "p", "q"):
        leaky = {**RSAAlgorithm.to_jwk(key.public_key(), as_dict=True), member: private_jwk[member]}
        proof = jwt.encode(
            claims(), key, algorithm="RS256", headers={"typ": "dpop+jwt", "jwk": leaky}
        )
        with pytest.raises(DpopProofError) as caught:
            verifier.verify(proof, method="GET", url=URL)
        assert caught.value.reason == Reason.JWK_PRIVATE
        assert member in caught.value.detail


def test_a_key_of_another_type_than_alg_is_refused(verifier: DpopVerifier) -> None:
    rsa_signer = DpopClientKey.generate("RS256")
    ec_signer = DpopClientKey.generate("ES256")
    # An RSA signature, an EC key in the header.
    proof = rsa_signer.proof("GET", URL, iat=NOW, header={"jwk": ec_signer.public_jwk})
    assert refused(verifier, proof) == Reason.JWK_INVALID
    # ES256 names P-256; a P-384 key is not one it signs with.
    p384 = DpopClientKey.generate("ES384")
    proof = ec_signer.proof("GET", URL, iat=NOW, header={"jwk": p384.public_jwk})
    assert refused(verifier, proof) == Reason.JWK_INVALID
    broken = {**ec_signer.public_jwk, "x": "AAAA"}
    proof = ec_signer.proof("GET", URL, iat=NOW, header={"jwk": broken})
    assert refused(verifier, proof) == Reason.JWK_INVALID


def test_a_short_rsa_key_is_refused(verifier: DpopVerifier) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    jwk = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PyJWT warns when it signs with a short key
        proof = jwt.encode(
            claims(), key, algorithm="RS256", headers={"typ": "dpop+jwt", "jwk": jwk}
        )
    assert refused(verifier, proof) == Reason.JWK_INVALID


def test_a_signature_by_another_key_is_refused(
    signer: DpopClientKey, verifier: DpopVerifier
) -> None:
    other = DpopClientKey.generate("ES256")
    proof = other.proof("GET", URL, iat=NOW, header={"jwk": signer.public_jwk})
    assert refused(verifier, proof) == Reason.SIGNATURE


def test_a_changed_payload_breaks_the_signature(
    signer: DpopClientKey, verifier: DpopVerifier
) -> None:
    header, _, signature = signer.proof("GET", URL, iat=NOW).split(".")
    forged = f"{header}.{b64(claims(htm='DELETE'))}.{signature}"
    assert refused(verifier, forged, method="DELETE") == Reason.SIGNATURE
    assert refused(verifier, f"{header}.{b64(claims())}.") == Reason.SIGNATURE


def test_an_unknown_critical_header_is_refused(
    signer: DpopClientKey, verifier: DpopVerifier
) -> None:
    proof = signer.proof("GET", URL, iat=NOW, header={"crit": ["exp"], "exp": 1})
    assert refused(verifier, proof) == Reason.CRIT


@pytest.mark.parametrize("jti", [None, "", 12345678901234567890])
def test_a_proof_without_jti_is_refused(
    jti: Any, signer: DpopClientKey, verifier: DpopVerifier
) -> None:
    if jti is None:
        proof = signer.proof("GET", URL, iat=NOW, omit=["jti"])
    else:
        proof = signer.proof("GET", URL, iat=NOW, claims={"jti": jti})
    assert refused(verifier, proof) == Reason.JTI_MISSING


@pytest.mark.parametrize(
    ("jti", "accepted"),
    [
        ("-BwC3ESc6acc2lTc", True),  # 16 base64url characters: 12 bytes
        ("-BwC3ESc6acc2lT", False),  # 11 bytes
        ("0123456789abcdef01234567", True),  # 24 hex digits: 96 bits
        ("0123456789abcdef", False),  # 16 hex digits: 64 bits
        (str(uuid.uuid4()), True),
        ("proof #1 of 1000", True),  # 16 characters of another kind
        ("proof #1 of 100", False),
    ],
)
def test_the_jti_carries_at_least_96_bits(
    jti: str, accepted: bool, signer: DpopClientKey, verifier: DpopVerifier
) -> None:
    proof = signer.proof("GET", URL, iat=NOW, jti=jti)
    if accepted:
        assert verifier.verify(proof, method="GET", url=URL)["jti"] == jti
    else:
        assert refused(verifier, proof) == Reason.JTI_SHORT


def test_a_replayed_proof_is_refused(signer: DpopClientKey, verifier: DpopVerifier) -> None:
    proof = signer.proof("GET", URL, iat=NOW)
    verifier.verify(proof, method="GET", url=URL)
    assert refused(verifier, proof) == Reason.JTI_REPLAYED
    # Another proof with the same jti is a replay too, whatever else it says.
    jti = "Zq3v_8Hn2Lk0Wx9RtY6uBc"
    verifier.verify(signer.proof("POST", URL, iat=NOW, jti=jti), method="POST", url=URL)
    twin = signer.proof("GET", URL, iat=NOW + 1, jti=jti)
    assert refused(verifier, twin) == Reason.JTI_REPLAYED


def test_the_replay_cache_forgets_only_after_the_window(signer: DpopClientKey) -> None:
    clock = [NOW]
    verifier = DpopVerifier(max_age=60, clock=lambda: clock[0])
    jti = "Zq3v_8Hn2Lk0Wx9RtY6uBc"
    verifier.verify(signer.proof("GET", URL, iat=NOW, jti=jti), method="GET", url=URL)
    clock[0] = NOW + 100  # a proof made now with the same jti: still inside the window
    assert refused(verifier, signer.proof("GET", URL, iat=NOW + 100, jti=jti)) == (
        Reason.JTI_REPLAYED
    )
    clock[0] = NOW + 121  # past any proof that could have carried the first jti
    verifier.verify(signer.proof("GET", URL, iat=NOW + 121, jti=jti), method="GET", url=URL)


@pytest.mark.parametrize(("claimed", "method"), [("GET", "POST"), ("get", "GET"), ("GET ", "GET")])
def test_htm_must_be_the_method(
    claimed: str, method: str, signer: DpopClientKey, verifier: DpopVerifier
) -> None:
    assert refused(verifier, signer.proof(claimed, URL, iat=NOW), method=method) == Reason.HTM


def test_a_proof_without_htm_is_refused(signer: DpopClientKey, verifier: DpopVerifier) -> None:
    assert refused(verifier, signer.proof("GET", URL, iat=NOW, omit=["htm"])) == Reason.HTM


@pytest.mark.parametrize(
    "htu",
    [
        "https://api.example.com/order",
        "https://api.example.com/orders/",
        "https://api.example.com/ORDERS",
        "http://api.example.com/orders",
        "https://api.example.com:8443/orders",
        "https://other.example.com/orders",
        "https://api.example.com/orders%2F",
        "/orders",
        "api.example.com/orders",
        "https:///orders",
        "https://api.example.com:99999/orders",
    ],
)
def test_htu_must_name_the_request_uri(
    htu: str, signer: DpopClientKey, verifier: DpopVerifier
) -> None:
    assert refused(verifier, signer.proof("GET", htu, iat=NOW)) == Reason.HTU


def test_a_proof_without_htu_is_refused(signer: DpopClientKey, verifier: DpopVerifier) -> None:
    assert refused(verifier, signer.proof("GET", URL, iat=NOW, omit=["htu"])) == Reason.HTU
    proof = signer.proof("GET", URL, iat=NOW, claims={"htu": ["https://api.example.com/orders"]})
    assert refused(verifier, proof) == Reason.HTU


@pytest.mark.parametrize(
    ("htu", "url"),
    [
        ("HTTPS://API.Example.COM/orders", URL),
        ("https://api.example.com:443/orders", URL),
        ("https://api.example.com/orders", "https://api.example.com:443/orders"),
        ("https://api.example.com/orders?page=2", URL),  # query and fragment ignored
        ("https://api.example.com/orders#top", URL),
        ("https://api.example.com/orders", URL + "?page=2"),
        ("https://api.example.com/%6Frders", URL),  # an encoded unreserved character
        ("https://api.example.com/a/../orders", URL),
        ("https://api.example.com/./orders", URL),
        ("https://api.example.com/x%2fy", "https://api.example.com/x%2Fy"),
        ("http://api.example.com", "http://api.example.com/"),
        ("http://api.example.com:80/", "http://api.example.com/"),
        ("http://127.0.0.1:8080/v1/items", "http://127.0.0.1:8080/v1/items?id=3"),
        ("http://[::ABCD]:8080/v1", "http://[::abcd]:8080/v1?x=1"),
    ],
)
def test_normalised_variants_of_the_uri_are_accepted(
    htu: str, url: str, signer: DpopClientKey, verifier: DpopVerifier
) -> None:
    assert verifier.verify(signer.proof("GET", htu, iat=NOW), method="GET", url=url)["htu"] == htu


@pytest.mark.parametrize(
    ("uri", "normal"),
    [
        ("HTTP://Example.COM", "http://example.com/"),
        ("https://example.com:443", "https://example.com/"),
        ("https://example.com:0443/a", "https://example.com/a"),
        ("http://example.com:8080/a/b/../c/./d?q#f", "http://example.com:8080/a/c/d"),
        ("http://example.com/%7euser/%2f%41", "http://example.com/~user/%2FA"),
        ("http://example.com:/a", "http://example.com/a"),
        ("ws://example.com:80/socket", "ws://example.com/socket"),
        ("wss://example.com:443/socket", "wss://example.com/socket"),
    ],
)
def test_uri_normalisation(uri: str, normal: str) -> None:
    assert normalize_htu(uri) == normal


def test_a_query_in_htu_can_be_refused(signer: DpopClientKey) -> None:
    """The proxy promises an `htu` without query and fragment (RFC 9449 §4.2)."""
    strict = DpopVerifier(allow_htu_query=False, clock=lambda: NOW)
    strict.verify(signer.proof("GET", URL, iat=NOW), method="GET", url=URL + "?page=2")
    for htu in (URL + "?page=2", URL + "#top", URL + "?"):
        assert refused(strict, signer.proof("GET", htu, iat=NOW)) == Reason.HTU_QUERY


@pytest.mark.parametrize(
    ("iat", "reason"),
    [
        (NOW - 61, Reason.IAT_TOO_OLD),
        (NOW - 3600, Reason.IAT_TOO_OLD),
        (NOW + 61, Reason.IAT_IN_FUTURE),
        (NOW + 86400, Reason.IAT_IN_FUTURE),
        ("1750000000", Reason.IAT_MISSING),
        (True, Reason.IAT_MISSING),
        (None, Reason.IAT_MISSING),
    ],
)
def test_iat_must_be_inside_the_window(
    iat: Any, reason: Reason, signer: DpopClientKey, verifier: DpopVerifier
) -> None:
    proof = signer.proof("GET", URL, iat=0, claims={"iat": iat})
    if iat is None:
        proof = signer.proof("GET", URL, omit=["iat"])
    assert refused(verifier, proof) == reason


def test_the_window_is_inclusive_and_configurable(signer: DpopClientKey) -> None:
    verifier = DpopVerifier(max_age=60, clock=lambda: NOW)
    for iat in (NOW - 60, NOW + 60, NOW - 0.5):
        verifier.verify(signer.proof("GET", URL, iat=iat), method="GET", url=URL)
    narrow = DpopVerifier(max_age=5, max_future=1, clock=lambda: NOW)
    assert refused(narrow, signer.proof("GET", URL, iat=NOW - 6)) == Reason.IAT_TOO_OLD
    assert refused(narrow, signer.proof("GET", URL, iat=NOW + 2)) == Reason.IAT_IN_FUTURE
    narrow.verify(signer.proof("GET", URL, iat=NOW - 5), method="GET", url=URL)


def test_now_overrides_the_clock_for_one_call(signer: DpopClientKey) -> None:
    verifier = DpopVerifier(clock=lambda: NOW)
    proof = signer.proof("GET", URL, iat=NOW - 3600)
    assert refused(verifier, proof) == Reason.IAT_TOO_OLD
    verifier.verify(signer.proof("GET", URL, iat=NOW - 3600), method="GET", url=URL, now=NOW - 3600)


def test_the_nonce_must_be_the_current_one(signer: DpopClientKey, verifier: DpopVerifier) -> None:
    verifier.verify(signer.proof("GET", URL, iat=NOW, nonce="ignored"), method="GET", url=URL)
    verifier.nonce = "n-2"
    assert refused(verifier, signer.proof("GET", URL, iat=NOW)) == Reason.NONCE_MISSING
    assert refused(verifier, signer.proof("GET", URL, iat=NOW, nonce="n-1")) == Reason.NONCE_WRONG
    verifier.verify(signer.proof("GET", URL, iat=NOW, nonce="n-2"), method="GET", url=URL)
    constructed = DpopVerifier(nonce="n-3", clock=lambda: NOW)
    assert refused(constructed, signer.proof("GET", URL, iat=NOW, nonce="n-2")) == (
        Reason.NONCE_WRONG
    )


def test_ath_must_hash_the_presented_token(signer: DpopClientKey, verifier: DpopVerifier) -> None:
    assert refused(verifier, signer.proof("GET", URL, iat=NOW), access_token="tok-1") == (
        Reason.ATH_MISSING
    )
    proof = signer.proof("GET", URL, iat=NOW, access_token="tok-2")
    assert refused(verifier, proof, access_token="tok-1") == Reason.ATH_WRONG
    plain = signer.proof("GET", URL, iat=NOW, claims={"ath": "tok-1"})
    assert refused(verifier, plain, access_token="tok-1") == Reason.ATH_WRONG
    padded = signer.proof("GET", URL, iat=NOW, claims={"ath": access_token_hash("tok-1") + "="})
    assert refused(verifier, padded, access_token="tok-1") == Reason.ATH_WRONG
    good = signer.proof("GET", URL, iat=NOW, access_token="tok-1")
    assert verifier.verify(good, method="GET", url=URL, access_token="tok-1")["ath"] == (
        access_token_hash("tok-1")
    )


def test_the_key_must_be_the_one_the_token_is_bound_to(
    signer: DpopClientKey, verifier: DpopVerifier
) -> None:
    other = DpopClientKey.generate("ES256")
    proof = other.proof("GET", URL, iat=NOW, access_token="tok-1")
    assert refused(verifier, proof, access_token="tok-1", jkt=signer.jkt) == Reason.JKT_MISMATCH
    mine = signer.proof("GET", URL, iat=NOW, access_token="tok-1")
    verifier.verify(mine, method="GET", url=URL, access_token="tok-1", jkt=signer.jkt)


def test_the_error_names_its_reason() -> None:
    error = DpopProofError(Reason.HTU, "htu 'x' is not 'y'")
    assert str(error) == "htu: htu 'x' is not 'y'"
    assert error.reason == "htu"  # a StrEnum: compares with plain strings


def test_the_verifier_shares_no_code_with_the_proxy() -> None:
    source = Path(dpop_module.__file__).read_text()
    assert "from proxy" not in source
    assert "import proxy" not in source
