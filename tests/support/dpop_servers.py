"""DPoP (RFC 9449) for the test token endpoint and the test API.

A `DpopAuthority` is what an authorization server and its resource servers share: the
binding of each DPoP access token to its key's RFC 7638 thumbprint, and one
`DpopServer` for each side (`authorization`, `resource`) with its own strict
`DpopVerifier` (nonce, replay cache), the proofs it accepted and the requests it
refused. Give the same authority to `TokenServer(dpop=...)` and `Upstream(dpop=...)`;
without one, both servers behave exactly as before.

The token endpoint, for a request with a `DPoP` header (RFC 9449 §5, §8):
* verifies the proof (`htm` POST, `htu` the token endpoint URL); a bad one gets
  `400 invalid_dpop_proof`; a missing or stale nonce, when the side demands one
  (`authority.authorization.demand_nonce()`), gets `400 use_dpop_nonce` with the nonce
  in `DPoP-Nonce`;
* answers `token_type: DPoP` and binds the token to the proof's key (JWT tokens also
  carry `cnf.jkt`), or, with `authority.token_type = "Bearer"`, a plain bearer token.
A request without the header is served as before, unless `require_proof` is set.

The API, for `Authorization: DPoP <token>` (RFC 9449 §7, §9):
* the token must be one the token endpoint bound (and still valid for it), else
  `401 invalid_token`; the proof is verified against the request's method and URL
  (`origin` + raw path, query ignored: the origin is the API's own unless the test names
  another), the token's `ath` and thumbprint; failures get `401` with
  `WWW-Authenticate: DPoP error="invalid_dpop_proof"` (`invalid_token` when the proof's
  key is not the token's), a missing or stale nonce `error="use_dpop_nonce"` and
  `DPoP-Nonce`;
* a DPoP-bound token sent as `Bearer` is refused with `invalid_token` (§7.2); other
  requests go on to the API's `validate` as before, unless `require_dpop` is set.

Either side can hand out a new nonce on a successful answer (`rotate_nonce()` for the
next one, `rotate_every` for every n-th), sent as `DPoP-Nonce` and demanded from then on.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from aiohttp import web

from tests.support.dpop import (
    ASYMMETRIC_ALGORITHMS,
    DpopProofError,
    DpopVerifier,
    Reason,
    VerifiedProof,
    single_dpop_header,
)

__all__ = [
    "DPOP_RESPONSE_HEADERS",
    "DpopAuthority",
    "DpopRefusal",
    "DpopServer",
    "add_dpop_response_headers",
]

ServerName = Literal["authorization", "resource"]

DPOP_RESPONSE_HEADERS = web.RequestKey("dpop_response_headers", dict[str, str])
"""Headers a DPoP check wants on the response to this request (a new `DPoP-Nonce`)."""

_NONCE_REASONS = frozenset({Reason.NONCE_MISSING, Reason.NONCE_WRONG})
_NONCE_DESCRIPTIONS = {
    "authorization": "Authorization server requires nonce in DPoP proof",
    "resource": "Resource server requires nonce in DPoP proof",
}


async def add_dpop_response_headers(request: web.Request, response: web.StreamResponse) -> None:
    """An `on_response_prepare` signal handler: adds what a DPoP check asked for."""
    response.headers.update(request.get(DPOP_RESPONSE_HEADERS, {}))


@dataclass(frozen=True)
class DpopRefusal:
    """A request a DPoP check refused, and how it is answered."""

    server: ServerName
    error: str  # invalid_dpop_proof, use_dpop_nonce, invalid_token, invalid_request, or ""
    reason: str  # a `Reason` value, or what was wrong with the token or the request
    description: str
    nonce: str | None = None  # sent as DPoP-Nonce
    algorithms: tuple[str, ...] = ()

    @property
    def status(self) -> int:
        return 400 if self.server == "authorization" else 401

    def response(self) -> web.Response:
        """400 with a JSON error (RFC 6749 §5.2) at the token endpoint; 401 with a DPoP
        challenge (RFC 9449 §7.1, RFC 6750 §3) at the API."""
        headers = {"Cache-Control": "no-store"}
        if self.nonce is not None:
            headers["DPoP-Nonce"] = self.nonce
        if self.server == "resource":
            params = []
            if self.error:
                params.append(f'error="{self.error}"')
                params.append(f'error_description="{_quotable(self.description)}"')
            params.append(f'algs="{" ".join(self.algorithms)}"')
            headers["WWW-Authenticate"] = "DPoP " + ", ".join(params)
        body = {"error": self.error or "invalid_token", "error_description": self.description}
        return web.Response(
            status=self.status,
            body=json.dumps(body).encode(),
            content_type="application/json",
            headers=headers,
        )


class DpopServer:
    """The DPoP side of one server: its verifier and what it accepted and refused."""

    def __init__(self, name: ServerName, verifier: DpopVerifier) -> None:
        self.name: ServerName = name
        self.verifier = verifier
        self.proofs: list[VerifiedProof] = []  # every accepted proof, in order
        self.refusals: list[DpopRefusal] = []
        self.nonces: list[str] = []  # every nonce this side handed out, in order
        # Hand out a new nonce with every n-th accepted proof's answer (None: never).
        self.rotate_every: int | None = None
        # Send the current nonce with every successful answer, not only new ones.
        self.announce_nonce = False
        self._next_nonce: str | None = None

    @property
    def nonce(self) -> str | None:
        """The nonce proofs must carry (None: none demanded)."""
        return self.verifier.nonce

    @nonce.setter
    def nonce(self, value: str | None) -> None:
        self.verifier.nonce = value

    @property
    def verified(self) -> int:
        """How many proofs this side accepted."""
        return len(self.proofs)

    @property
    def jtis(self) -> list[str]:
        """The `jti` of every accepted proof, in order."""
        return [proof.jti for proof in self.proofs]

    def reasons(self) -> list[str]:
        """The reason of every refusal, in order."""
        return [refusal.reason for refusal in self.refusals]

    def demand_nonce(self, nonce: str | None = None) -> str:
        """Demand `nonce` (default: a fresh one) in every proof from now on."""
        self.nonce = nonce or _fresh_nonce()
        self.nonces.append(self.nonce)
        return self.nonce

    def stop_demanding_nonce(self) -> None:
        self.nonce = None

    def rotate_nonce(self, nonce: str | None = None) -> str:
        """Hand out `nonce` (default: a fresh one) with the next successful answer
        (`DPoP-Nonce` on a 200) and demand it from then on; the current nonce is
        accepted until then."""
        self._next_nonce = nonce or _fresh_nonce()
        return self._next_nonce

    def check(
        self,
        request: web.Request,
        url: str,
        *,
        access_token: str | None = None,
        jkt: str | None = None,
    ) -> VerifiedProof | DpopRefusal:
        """Verify the request's one DPoP proof for `url`; on success, the headers for
        the response are stored on `request` (see `add_dpop_response_headers`)."""
        try:
            proof = single_dpop_header(request.headers.getall("DPoP", []))
            verified = self.verifier.verify_proof(
                proof, method=request.method, url=url, access_token=access_token, jkt=jkt
            )
        except DpopProofError as error:
            return self._refuse_proof(error)
        self.proofs.append(verified)
        headers = self._nonce_headers()
        if headers:
            request[DPOP_RESPONSE_HEADERS] = headers
        return verified

    def refuse(self, error: str, reason: str, description: str) -> DpopRefusal:
        """Record and return a refusal that is not about the proof itself."""
        refusal = DpopRefusal(self.name, error, reason, description, algorithms=self._algs())
        self.refusals.append(refusal)
        return refusal

    def _refuse_proof(self, error: DpopProofError) -> DpopRefusal:
        if error.reason in _NONCE_REASONS:
            refusal = DpopRefusal(
                self.name,
                "use_dpop_nonce",
                error.reason,
                _NONCE_DESCRIPTIONS[self.name],
                nonce=self.nonce,
                algorithms=self._algs(),
            )
            self.refusals.append(refusal)
            return refusal
        # A proof by another key than the token's is a misused token (RFC 9449 §7.1).
        code = "invalid_token" if error.reason == Reason.JKT_MISMATCH else "invalid_dpop_proof"
        return self.refuse(code, error.reason, f"DPoP proof rejected: {error.reason}")

    def _algs(self) -> tuple[str, ...]:
        return tuple(sorted(self.verifier.algorithms))

    def _nonce_headers(self) -> dict[str, str]:
        new = None
        if self._next_nonce is not None:
            new, self._next_nonce = self._next_nonce, None
        elif self.rotate_every and self.verified % self.rotate_every == 0:
            new = _fresh_nonce()
        if new is not None:
            self.nonce = new
            self.nonces.append(new)
        if new is not None or (self.announce_nonce and self.nonce is not None):
            assert self.nonce is not None
            return {"DPoP-Nonce": self.nonce}
        return {}


@dataclass
class DpopAuthority:
    """DPoP state shared by a test token endpoint and the APIs that accept its tokens.

    `max_age`, `algorithms` and `allow_htu_query` configure both sides' verifiers when
    the authority is made; change them later on `authorization.verifier` or
    `resource.verifier`. `clock` may be swapped at any time."""

    max_age: float = 60.0  # how far `iat` may be from the clock, either way (seconds)
    clock: Callable[[], float] = time.time
    algorithms: Iterable[str] = ASYMMETRIC_ALGORITHMS
    allow_htu_query: bool = True  # False: an htu with a query or fragment is refused
    # What the token endpoint answers a request with a valid proof: a DPoP-bound token,
    # or a plain bearer token (an authorization server without DPoP support).
    token_type: Literal["DPoP", "Bearer"] = "DPoP"
    require_proof: bool = False  # the token endpoint refuses requests without a proof
    require_dpop: bool = False  # the API refuses requests without a DPoP token
    # Whether an issued token is still good (expiry, revocation); a TokenServer given
    # this authority sets its own `is_valid` here unless one is set already.
    token_valid: Callable[[str], bool] | None = None
    bindings: dict[str, str] = field(default_factory=dict)  # access token -> jkt
    authorization: DpopServer = field(init=False)
    resource: DpopServer = field(init=False)

    def __post_init__(self) -> None:
        self.algorithms = tuple(sorted(self.algorithms))
        self.authorization = DpopServer("authorization", self._verifier())
        self.resource = DpopServer("resource", self._verifier())

    @property
    def jtis(self) -> list[str]:
        """The `jti` of every proof either side accepted."""
        return self.authorization.jtis + self.resource.jtis

    def bind(self, token: str, jkt: str) -> None:
        self.bindings[token] = jkt

    # -- used by the servers -------------------------------------------------------

    def check_token_request(
        self, request: web.Request, token_url: str
    ) -> VerifiedProof | DpopRefusal | None:
        """The token endpoint's check: None for a request without a DPoP header (served
        as before), else the accepted proof or the refusal to answer with."""
        if "DPoP" not in request.headers:
            if self.require_proof:
                return self.authorization.refuse(
                    "invalid_dpop_proof", Reason.HEADER_COUNT, "a DPoP proof is required"
                )
            return None
        return self.authorization.check(request, token_url)

    def check_resource_request(
        self, request: web.Request, origin: str
    ) -> VerifiedProof | DpopRefusal | None:
        """The API's check, with `origin` (scheme://host[:port]) the one proofs must
        name: None for a request DPoP does not concern (left to `validate`), else the
        accepted proof or the refusal to answer with."""
        authorizations = request.headers.getall("Authorization", [])
        if not authorizations:
            if self.require_dpop:
                return self.resource.refuse("", "no_credentials", "a DPoP token is required")
            return None
        if len(authorizations) > 1:
            return self.resource.refuse(
                "invalid_request", "authorization_count", "more than one Authorization field"
            )
        scheme, _, token = authorizations[0].strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "dpop":
            if scheme.lower() == "bearer" and token in self.bindings:
                return self.resource.refuse(
                    "invalid_token", "bound_token_as_bearer", "a DPoP-bound token sent as Bearer"
                )
            if self.require_dpop:
                return self.resource.refuse("", "not_dpop", "a DPoP token is required")
            return None
        jkt = self.bindings.get(token)
        if jkt is None:
            return self.resource.refuse(
                "invalid_token", "unbound_token", "not a DPoP-bound token issued here"
            )
        if self.token_valid is not None and not self.token_valid(token):
            return self.resource.refuse("invalid_token", "token_invalid", "expired or revoked")
        target = request.raw_path.split("?", 1)[0].split("#", 1)[0]
        # An absolute-form target (RFC 9112 §3.2.2) names the URI itself.
        url = target if "://" in target else origin.rstrip("/") + target
        return self.resource.check(request, url, access_token=token, jkt=jkt)

    def metadata(self) -> Mapping[str, list[str]]:
        """RFC 9449 §5.1: the authorization server metadata for DPoP."""
        return {"dpop_signing_alg_values_supported": list(self.algorithms)}

    def _verifier(self) -> DpopVerifier:
        return DpopVerifier(
            self.max_age,
            algorithms=self.algorithms,
            allow_htu_query=self.allow_htu_query,
            clock=lambda: self.clock(),  # follows a clock the test swaps later
        )


def _fresh_nonce() -> str:
    return secrets.token_urlsafe(16)


def _quotable(text: str) -> str:
    return text.replace("\\", "").replace('"', "'")
