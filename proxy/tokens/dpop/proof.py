"""DPoP proofs (RFC 9449 §4.2): one fresh signed JWT per request.

`ProofSigner.proof()` is on the request path of every request sent with a DPoP token,
so the parts that do not change are prepared once: the base64url header (``typ``,
``alg`` and the public ``jwk``) and, per token, the ``ath`` claim. What is left per
request is a random ``jti`` (128 bits), the time, the JSON of the claims, base64url and
one signature, done by `cryptography` directly (`DpopKey.sign`).

`target_uri()` is the ``htu`` rule: the URI the upstream receives, without query and
fragment, normalised as RFC 9449 §4.3 compares it (RFC 3986 §6.2.2 and §6.2.3).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from collections.abc import Callable
from typing import Final

from proxy.tokens.clock import wall_time
from proxy.tokens.dpop.key import DpopKey, b64url

__all__ = ["ProofSigner", "access_token_hash", "target_uri"]

_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
# RFC 3986 §2.3: unreserved characters, which percent-encoding must not hide (§6.2.2.2).
_UNRESERVED: Final = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
)
_PERCENT_ENCODED: Final = re.compile(r"%([0-9A-Fa-f]{2})")
_JTI_BYTES: Final = 16  # RFC 9449 §11.1: at least 96 bits of randomness; 128 here


def access_token_hash(token: str) -> str:
    """The ``ath`` claim: base64url SHA-256 of the access token's ASCII (RFC 9449 §4.2)."""
    return b64url(hashlib.sha256(token.encode("ascii")).digest())


def _normalise_escape(match: re.Match[str]) -> str:
    octet = int(match.group(1), 16)
    return chr(octet) if octet in _UNRESERVED else "%" + match.group(1).upper()


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4."""
    output: list[str] = []
    for segment in path.split("/")[1:]:
        if segment == "..":
            if output:
                output.pop()
        elif segment != ".":
            output.append(segment)
    tail = "/" if path.endswith(("/.", "/..")) else ""
    return "/" + "/".join(output) + tail


def target_uri(scheme: str, authority: str, target: str) -> str:
    """``htu`` for a request sent with `target` (origin form) to `scheme://authority`.

    Scheme and host lower-cased, the scheme's default port left out, query and fragment
    cut, percent-encodings in upper case and unreserved characters decoded, dot-segments
    removed, an empty path made "/".
    """
    scheme = scheme.lower()
    authority = authority.lower()
    default = _DEFAULT_PORTS.get(scheme)
    if default is not None and authority.endswith(f":{default}"):
        authority = authority[: -len(str(default)) - 1]
    path = target.split("?", 1)[0].split("#", 1)[0] or "/"
    if "%" in path:
        path = _PERCENT_ENCODED.sub(_normalise_escape, path)
    if "/." in path:
        path = _remove_dot_segments(path)
    return f"{scheme}://{authority}{path}"


class ProofSigner:
    """Makes DPoP proofs with one `DpopKey`; `wall_clock` gives ``iat`` (tests step it)."""

    __slots__ = ("_ath", "_header", "_key", "_token", "_wall_clock")

    def __init__(self, key: DpopKey, wall_clock: Callable[[], float] = wall_time) -> None:
        self._key = key
        header = {"typ": "dpop+jwt", "alg": key.alg, "jwk": key.jwk}
        encoded = json.dumps(header, separators=(",", ":")).encode("ascii")
        self._header = base64.urlsafe_b64encode(encoded).rstrip(b"=") + b"."
        self._wall_clock = wall_clock
        # The last token and its `ath`: a token serves many requests.
        self._token = ""
        self._ath = ""

    def proof(
        self, method: str, htu: str, token: str | None = None, nonce: str | None = None
    ) -> bytes:
        """A proof for one request: `method` and `htu` (see `target_uri`), with ``ath``
        when sent with `token`, and the server's `nonce` when it gave one."""
        jti = base64.urlsafe_b64encode(os.urandom(_JTI_BYTES)).rstrip(b"=").decode("ascii")
        iat = int(self._wall_clock())
        claims = f'{{"jti":"{jti}","htm":"{method}","htu":{json.dumps(htu)},"iat":{iat}'
        if token is not None:
            if token != self._token:
                self._ath = access_token_hash(token)
                self._token = token
            claims += f',"ath":"{self._ath}"'
        if nonce is not None:
            claims += f',"nonce":{json.dumps(nonce)}'
        payload = base64.urlsafe_b64encode((claims + "}").encode("ascii")).rstrip(b"=")
        signing_input = self._header + payload
        signature = base64.urlsafe_b64encode(self._key.sign(signing_input)).rstrip(b"=")
        return signing_input + b"." + signature
