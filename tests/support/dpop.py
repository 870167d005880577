"""A strict DPoP proof verifier (RFC 9449), written from the RFC alone.

The tests judge the proxy's DPoP proofs with `DpopVerifier`, which shares no code with
the proxy's signer: a bug there cannot hide behind the same bug here. `verify()` makes
every check of RFC 9449 §4.3 (proofs at the token endpoint) and §7.1 (proofs with a
DPoP-bound access token) and raises `DpopProofError` naming the first one that fails
(`Reason`):

* exactly one `DPoP` header field (`single_dpop_header()`), holding one well-formed JWS
  in compact serialisation (§4.3 items 1-3);
* `typ` is `dpop+jwt`; `alg` an asymmetric algorithm this verifier accepts (never
  `none`, never a MAC); `jwk` a public key of that algorithm's type, without any
  private member; the signature verifies with that key (§4.3 items 4-7);
* `jti` present and unguessable: at least 96 bits (RFC 9449 §4.2), read as at least
  12 base64url-decoded bytes, 24 hex digits when the value is hex, otherwise at least
  16 characters; and not seen before within the acceptance window (§11.1);
* `htm` equal to the request's method and `htu` to its URI after RFC 3986 §6.2.2
  syntax-based and §6.2.3 scheme-based normalisation, query and fragment ignored (§4.3
  items 8-9); `allow_htu_query=False` also refuses an `htu` that carries either;
* `iat` inside the window `now - max_age .. now + max_future` (§4.3 item 11);
* `nonce` equal to the server's current nonce when it has one (§4.3 item 10, §8, §9);
* `ath` equal to base64url(SHA-256(access token)) when a token is presented, and the
  RFC 7638 thumbprint of `jwk` equal to the token's `cnf.jkt` when given (§4.3 item 12,
  §6.1, §7.1).

`DpopClientKey` makes proofs the way an RFC 9449 client does, for tests that play the
client; it too uses PyJWT and cryptography only.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

__all__ = [
    "ASYMMETRIC_ALGORITHMS",
    "DPOP_TYP",
    "DpopClientKey",
    "DpopProofError",
    "DpopVerifier",
    "Reason",
    "VerifiedProof",
    "access_token_hash",
    "jwk_thumbprint",
    "normalize_htu",
    "single_dpop_header",
]

DPOP_TYP = "dpop+jwt"

# alg -> the JWK key type (and curves) it signs with (RFC 7518 §3.1, RFC 8037 §3.1).
_KEY_TYPES: dict[str, tuple[str, frozenset[str]]] = {
    "ES256": ("EC", frozenset({"P-256"})),
    "ES384": ("EC", frozenset({"P-384"})),
    "ES512": ("EC", frozenset({"P-521"})),
    "EdDSA": ("OKP", frozenset({"Ed25519", "Ed448"})),
    **{
        f"{family}{bits}": ("RSA", frozenset())
        for family in ("RS", "PS")
        for bits in (256, 384, 512)
    },
}
ASYMMETRIC_ALGORITHMS: frozenset[str] = frozenset(_KEY_TYPES)
"""Every algorithm `DpopVerifier` can accept: digital signatures only (RFC 9449 §4.2)."""

# RFC 7518 §6.2.2, §6.3.2, RFC 8037 §2, and `k` of a symmetric key (RFC 7518 §6.4.1).
_PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")
# RFC 7638 §3.2: the required members of each key type, the only ones hashed.
_THUMBPRINT_MEMBERS = {
    "EC": ("crv", "kty", "x", "y"),
    "RSA": ("e", "kty", "n"),
    "OKP": ("crv", "kty", "x"),
    "oct": ("k", "kty"),
}
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")
_HEX = re.compile(r"[0-9A-Fa-f]+")
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_PERCENT = re.compile(r"%([0-9A-Fa-f]{2})")


class Reason(StrEnum):
    """Why a proof was refused: one value per check."""

    HEADER_COUNT = "header_count"  # not exactly one DPoP header field
    MALFORMED = "malformed"  # not a compact JWS with JSON-object header and payload
    TYP = "typ"
    ALG = "alg"  # none, a MAC, or not accepted here
    CRIT = "crit"  # a critical header extension this verifier does not understand
    JWK_MISSING = "jwk_missing"
    JWK_PRIVATE = "jwk_private"  # the header's key carries private members
    JWK_INVALID = "jwk_invalid"  # not a usable key, or not one `alg` signs with
    SIGNATURE = "signature"
    JTI_MISSING = "jti_missing"
    JTI_SHORT = "jti_short"  # fewer than 96 bits
    JTI_REPLAYED = "jti_replayed"
    HTM = "htm"
    HTU = "htu"
    HTU_QUERY = "htu_query"  # htu carries a query or fragment (allow_htu_query=False)
    IAT_MISSING = "iat_missing"
    IAT_TOO_OLD = "iat_too_old"
    IAT_IN_FUTURE = "iat_in_future"
    NONCE_MISSING = "nonce_missing"
    NONCE_WRONG = "nonce_wrong"
    ATH_MISSING = "ath_missing"
    ATH_WRONG = "ath_wrong"
    JKT_MISMATCH = "jkt_mismatch"  # signed by another key than the token is bound to


class DpopProofError(Exception):
    """A DPoP proof failed a check; `reason` says which."""

    def __init__(self, reason: Reason, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else str(reason))
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class VerifiedProof:
    """A proof that passed every check."""

    proof: str
    header: dict[str, Any]
    claims: dict[str, Any]
    jkt: str  # RFC 7638 thumbprint of the header's jwk

    @property
    def jti(self) -> str:
        return str(self.claims["jti"])


def single_dpop_header(values: Iterable[str]) -> str:
    """The one DPoP header field value of a request (RFC 9449 §4.3 item 1).

    `values` are all the request's `DPoP` field values, e.g. `headers.getall("DPoP", [])`;
    none, several, or one holding a comma-separated list are refused."""
    values = list(values)
    if len(values) != 1:
        raise DpopProofError(Reason.HEADER_COUNT, f"{len(values)} DPoP header fields")
    value = values[0].strip()
    if not value or "," in value:
        raise DpopProofError(Reason.HEADER_COUNT, "the DPoP header does not hold one JWT")
    return value


def access_token_hash(access_token: str) -> str:
    """`ath` (RFC 9449 §4.2): base64url of the SHA-256 of the token's ASCII bytes."""
    return _b64url(hashlib.sha256(access_token.encode("ascii")).digest())


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """The RFC 7638 SHA-256 thumbprint: the key type's required members only, in
    lexicographic order, as JSON without whitespace, hashed and base64url-encoded.

    Raises ValueError for an unknown key type or a missing or non-string member."""
    members = _THUMBPRINT_MEMBERS.get(jwk.get("kty"))  # type: ignore[arg-type]
    if members is None:
        raise ValueError(f"no RFC 7638 members known for kty {jwk.get('kty')!r}")
    required: dict[str, str] = {}
    for name in members:
        value = jwk.get(name)
        if not isinstance(value, str):
            raise ValueError(f"JWK member {name!r} is missing or not a string")
        required[name] = value
    canonical = json.dumps(required, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return _b64url(hashlib.sha256(canonical.encode("utf-8")).digest())


def normalize_htu(uri: str) -> str:
    """`uri` after RFC 3986 §6.2.2 and §6.2.3 normalisation, without query and fragment.

    Scheme and host are lower-cased, a default or empty port removed, an empty path
    becomes "/", dot-segments are removed, percent-encodings use upper-case hex and
    encode only what must be encoded. Raises ValueError for a URI that is not absolute."""
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"not a URI: {uri!r} ({exc})") from None
    scheme = parts.scheme.lower()
    host = parts.hostname
    if not scheme or not host:
        raise ValueError(f"not an absolute URI with an authority: {uri!r}")
    host = _normalize_percent(host).lower()
    if ":" in host:
        host = f"[{host}]"
    authority = host
    if port is not None and port != _DEFAULT_PORTS.get(scheme):
        authority = f"{host}:{port}"
    if parts.username is not None or parts.password is not None:
        userinfo = parts.netloc.rpartition("@")[0]
        authority = f"{_normalize_percent(userinfo)}@{authority}"
    path = _remove_dot_segments(_normalize_percent(parts.path)) or "/"
    return f"{scheme}://{authority}{path}"


class DpopVerifier:
    """Checks DPoP proofs as RFC 9449 §4.3 and §7.1 say, and remembers their `jti`.

    One verifier per server: its replay cache and its `nonce` (None: no nonce demanded;
    settable at any time) belong to that server. `clock` gives the current Unix time;
    `verify(now=...)` overrides it for one call."""

    def __init__(
        self,
        max_age: float = 60.0,
        nonce: str | None = None,
        *,
        max_future: float | None = None,
        algorithms: Iterable[str] = ASYMMETRIC_ALGORITHMS,
        allow_htu_query: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`max_age`: how old `iat` may be, in seconds; `max_future`: how far ahead of
        the clock (default: `max_age`). `algorithms`: the `alg` values accepted, a
        subset of `ASYMMETRIC_ALGORITHMS`."""
        accepted = frozenset(algorithms)
        if not accepted <= ASYMMETRIC_ALGORITHMS:
            raise ValueError(f"not asymmetric: {sorted(accepted - ASYMMETRIC_ALGORITHMS)}")
        self.max_age = max_age
        self.max_future = max_age if max_future is None else max_future
        self.nonce = nonce
        self.algorithms = accepted
        self.allow_htu_query = allow_htu_query
        self.clock = clock
        self._seen: dict[str, float] = {}  # jti -> when it may be forgotten

    def verify(
        self,
        proof: str,
        *,
        method: str,
        url: str,
        access_token: str | None = None,
        jkt: str | None = None,
        now: float | None = None,
    ) -> dict[str, Any]:
        """The proof's claims if it passes every check; else `DpopProofError`.

        `method` and `url` are the request's (the URL as this server received it; its
        query is ignored); `access_token` is the token of `Authorization: DPoP`, and
        `jkt` the thumbprint that token is bound to (its `cnf.jkt`)."""
        return self.verify_proof(
            proof, method=method, url=url, access_token=access_token, jkt=jkt, now=now
        ).claims

    def verify_proof(
        self,
        proof: str,
        *,
        method: str,
        url: str,
        access_token: str | None = None,
        jkt: str | None = None,
        now: float | None = None,
    ) -> VerifiedProof:
        """As `verify()`, returning the header and the key's thumbprint too."""
        current = self.clock() if now is None else now
        header = _unverified_header(proof)
        self._check_header(header)
        public_jwk = header["jwk"]
        claims = self._check_signature(proof, header)
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti:
            raise DpopProofError(Reason.JTI_MISSING)
        if not _enough_entropy(jti):
            raise DpopProofError(Reason.JTI_SHORT, f"{jti!r} carries fewer than 96 bits")
        self._check_replay(jti, current)
        if claims.get("htm") != method:
            raise DpopProofError(Reason.HTM, f"htm {claims.get('htm')!r}, request {method!r}")
        self._check_htu(claims.get("htu"), url)
        self._check_iat(claims.get("iat"), current)
        if self.nonce is not None:
            if "nonce" not in claims:
                raise DpopProofError(Reason.NONCE_MISSING)
            if claims["nonce"] != self.nonce:
                raise DpopProofError(Reason.NONCE_WRONG, f"nonce {claims['nonce']!r}")
        if access_token is not None:
            if "ath" not in claims:
                raise DpopProofError(Reason.ATH_MISSING)
            if not access_token.isascii() or claims["ath"] != access_token_hash(access_token):
                raise DpopProofError(Reason.ATH_WRONG, "ath is not the hash of this token")
        thumbprint = jwk_thumbprint(public_jwk)
        if jkt is not None and thumbprint != jkt:
            raise DpopProofError(Reason.JKT_MISMATCH, f"key {thumbprint}, token bound to {jkt}")
        return VerifiedProof(proof, header, claims, thumbprint)

    def forget(self) -> None:
        """Empty the replay cache."""
        self._seen.clear()

    # -- checks ------------------------------------------------------------------

    def _check_header(self, header: dict[str, Any]) -> None:
        if header.get("typ") != DPOP_TYP:
            raise DpopProofError(Reason.TYP, f"typ {header.get('typ')!r}")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise DpopProofError(Reason.ALG, f"alg {alg!r} is not an accepted signature")
        if "crit" in header:
            raise DpopProofError(Reason.CRIT, f"crit {header['crit']!r}")
        public_jwk = header.get("jwk")
        if public_jwk is None:
            raise DpopProofError(Reason.JWK_MISSING)
        if not isinstance(public_jwk, dict):
            raise DpopProofError(Reason.JWK_INVALID, "jwk is not a JSON object")
        private = [name for name in _PRIVATE_MEMBERS if name in public_jwk]
        if private:
            raise DpopProofError(Reason.JWK_PRIVATE, f"jwk carries {', '.join(private)}")
        kty, curves = _KEY_TYPES[alg]
        if public_jwk.get("kty") != kty:
            raise DpopProofError(Reason.JWK_INVALID, f"{alg} needs kty {kty}")
        if curves and public_jwk.get("crv") not in curves:
            raise DpopProofError(Reason.JWK_INVALID, f"{alg} needs crv in {sorted(curves)}")
        try:
            jwk_thumbprint(public_jwk)
        except ValueError as exc:
            raise DpopProofError(Reason.JWK_INVALID, str(exc)) from None

    def _check_signature(self, proof: str, header: dict[str, Any]) -> dict[str, Any]:
        alg = header["alg"]
        try:
            key = jwt.PyJWK(header["jwk"], algorithm=alg)
        except jwt.PyJWTError as exc:
            raise DpopProofError(Reason.JWK_INVALID, str(exc)) from None
        try:
            decoded = jwt.PyJWS().decode_complete(
                proof,
                key,
                algorithms=[alg],
                options={"verify_signature": True, "enforce_minimum_key_length": True},
            )
        except jwt.InvalidSignatureError as exc:
            raise DpopProofError(Reason.SIGNATURE, str(exc)) from None
        except jwt.InvalidKeyError as exc:
            raise DpopProofError(Reason.JWK_INVALID, str(exc)) from None
        except jwt.PyJWTError as exc:
            raise DpopProofError(Reason.MALFORMED, str(exc)) from None
        return _json_object(decoded["payload"], "payload")

    def _check_replay(self, jti: str, now: float) -> None:
        for seen, until in list(self._seen.items()):
            if until < now:
                del self._seen[seen]
        if jti in self._seen:
            raise DpopProofError(Reason.JTI_REPLAYED, f"jti {jti!r} was used already")
        # Kept as long as a proof made now could still be accepted, whatever its iat.
        self._seen[jti] = now + self.max_age + self.max_future

    def _check_htu(self, htu: Any, url: str) -> None:
        if not isinstance(htu, str):
            raise DpopProofError(Reason.HTU, "htu is missing or not a string")
        try:
            claimed = normalize_htu(htu)
        except ValueError as exc:
            raise DpopProofError(Reason.HTU, str(exc)) from None
        expected = normalize_htu(url)
        if claimed != expected:
            raise DpopProofError(Reason.HTU, f"htu {htu!r} is not {expected!r}")
        if not self.allow_htu_query:
            parts = urlsplit(htu)
            if "?" in htu or "#" in htu or parts.query or parts.fragment:
                raise DpopProofError(Reason.HTU_QUERY, f"htu {htu!r} has a query or fragment")

    def _check_iat(self, iat: Any, now: float) -> None:
        if isinstance(iat, bool) or not isinstance(iat, int | float) or not math.isfinite(iat):
            raise DpopProofError(Reason.IAT_MISSING, f"iat {iat!r}")
        if iat < now - self.max_age:
            raise DpopProofError(Reason.IAT_TOO_OLD, f"iat is {now - iat:.0f} s old")
        if iat > now + self.max_future:
            raise DpopProofError(Reason.IAT_IN_FUTURE, f"iat is {iat - now:.0f} s ahead")


@dataclass
class DpopClientKey:
    """A DPoP client's key pair that signs proofs (RFC 9449 §4.2), for tests."""

    private_key: Any
    alg: str = "ES256"

    @classmethod
    def generate(cls, alg: str = "ES256") -> DpopClientKey:
        """A fresh key for `alg` (ES256/384/512, EdDSA, RS*/PS* with 2048 bits)."""
        curves: dict[str, ec.EllipticCurve] = {
            "ES256": ec.SECP256R1(),
            "ES384": ec.SECP384R1(),
            "ES512": ec.SECP521R1(),
        }
        key: Any
        if alg in curves:
            key = ec.generate_private_key(curves[alg])
        elif alg == "EdDSA":
            key = ed25519.Ed25519PrivateKey.generate()
        elif alg[:2] in ("RS", "PS"):
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        else:
            raise ValueError(f"no key for {alg}")
        return cls(key, alg)

    @property
    def public_jwk(self) -> dict[str, Any]:
        public = self.private_key.public_key()
        if isinstance(public, ec.EllipticCurvePublicKey):
            return dict(ECAlgorithm.to_jwk(public, as_dict=True))
        if isinstance(public, rsa.RSAPublicKey):
            return dict(RSAAlgorithm.to_jwk(public, as_dict=True))
        return dict(OKPAlgorithm.to_jwk(public, as_dict=True))

    @property
    def jkt(self) -> str:
        return jwk_thumbprint(self.public_jwk)

    def proof(
        self,
        htm: str,
        htu: str,
        *,
        access_token: str | None = None,
        nonce: str | None = None,
        iat: float | None = None,
        jti: str | None = None,
        claims: Mapping[str, Any] | None = None,
        header: Mapping[str, Any] | None = None,
        omit: Sequence[str] = (),
    ) -> str:
        """A proof for `htm` and `htu`; `claims` and `header` add or replace fields and
        `omit` leaves claims or header fields out (to build broken proofs)."""
        payload: dict[str, Any] = {
            "jti": jti if jti is not None else secrets.token_urlsafe(16),
            "htm": htm,
            "htu": htu,
            "iat": int(time.time()) if iat is None else iat,
        }
        if access_token is not None:
            payload["ath"] = access_token_hash(access_token)
        if nonce is not None:
            payload["nonce"] = nonce
        payload.update(claims or {})
        fields: dict[str, Any] = {"typ": DPOP_TYP, "jwk": self.public_jwk, **(header or {})}
        for name in omit:
            payload.pop(name, None)
            fields.pop(name, None)
        if "typ" in omit:
            fields["typ"] = None  # PyJWT would write typ "JWT"; None leaves it out
        return jwt.encode(payload, self.private_key, algorithm=self.alg, headers=fields)


# -- internals -------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    if not _BASE64URL.fullmatch(text) or len(text) % 4 == 1:
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, ValueError):
        raise DpopProofError(Reason.MALFORMED, f"the {what} is not JSON") from None
    if not isinstance(value, dict):
        raise DpopProofError(Reason.MALFORMED, f"the {what} is not a JSON object")
    return value


def _unverified_header(proof: str) -> dict[str, Any]:
    """The header of a compact JWS, unverified; MALFORMED if `proof` is not one whose
    header and payload are JSON objects."""
    if not isinstance(proof, str):
        raise DpopProofError(Reason.MALFORMED, "not a string")
    parts = proof.split(".")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise DpopProofError(Reason.MALFORMED, "not three dot-separated parts")
    try:
        raw_header, raw_payload = _b64url_decode(parts[0]), _b64url_decode(parts[1])
        if parts[2]:
            _b64url_decode(parts[2])
    except (ValueError, binascii.Error):
        raise DpopProofError(Reason.MALFORMED, "a part is not base64url") from None
    _json_object(raw_payload, "payload")
    return _json_object(raw_header, "header")


def _enough_entropy(jti: str) -> bool:
    """At least 96 bits, as far as the value's form tells (RFC 9449 §4.2, §11.1)."""
    if _HEX.fullmatch(jti):
        return len(jti) >= 24
    if _BASE64URL.fullmatch(jti):
        return len(jti) * 6 // 8 >= 12
    return len(jti) >= 16


def _normalize_percent(text: str) -> str:
    """RFC 3986 §6.2.2.1-2: upper-case hex; decode percent-encoded unreserved octets."""

    def one(match: re.Match[str]) -> str:
        octet = int(match.group(1), 16)
        return chr(octet) if octet in _UNRESERVED else f"%{match.group(1).upper()}"

    return _PERCENT.sub(one, text)


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4."""
    output: list[str] = []
    while path:
        if path.startswith("../"):
            path = path[3:]
        elif path.startswith(("./", "/./")):
            path = path[2:]
        elif path == "/.":
            path = "/"
        elif path.startswith("/../"):
            path = path[3:]
            if output:
                output.pop()
        elif path == "/..":
            path = "/"
            if output:
                output.pop()
        elif path in (".", ".."):
            path = ""
        else:
            start = 1 if path.startswith("/") else 0
            end = path.find("/", start)
            end = len(path) if end == -1 else end
            output.append(path[:end])
            path = path[end:]
    return "".join(output)
