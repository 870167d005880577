"""The one place a credential goes into a request head.

An upstream's `Injector` knows its header (`header`, default `Authorization`), the
scheme (`Bearer`, RFC 6750 §2.1, or `DPoP`, RFC 9449 §7.1) and whether the
application's own field of that name is replaced (`overwrite: true`) or kept
(`overwrite: false`, and then nothing is added). Both request paths build the head
they send upstream through `Injector.inject`; which token goes in is the provider's
business (`proxy.tokens`), read by the request path from the route's `HeldToken`.

A DPoP-bound token (the held token says so) goes in with a fresh proof in a ``DPoP``
field, signed by the upstream's `DpopSession` for the request's method and the URL the
upstream receives; a ``DPoP`` field of the application's goes only with its own
credential.
"""

from __future__ import annotations

from typing import Final

from proxy.datapath.messages import Headers
from proxy.tokens.dpop import DpopSession
from proxy.tokens.held_token import HeldToken

BEARER: Final = b"Bearer "
DPOP: Final = b"DPoP "
_DPOP_FIELD: Final = b"dpop"

# What `Injector.inject` put in.
NO_CREDENTIAL: Final = 0
BEARER_TOKEN: Final = 1
DPOP_TOKEN: Final = 2  # a DPoP-bound token and its proof

# RFC 9110 §9.3.8: TRACE echoes the request back, so it never carries a credential.
_NEVER_CREDENTIALED: Final = "TRACE"


def may_carry_credential(method: str) -> bool:
    """Whether a request with `method` may be sent with a token at all."""
    return method != _NEVER_CREDENTIALED


class Injector:
    """Sets one upstream's credential field (and DPoP proof) in request heads."""

    __slots__ = ("_field", "_held", "_lowered", "_token", "dpop", "header_name", "overwrite")

    def __init__(
        self,
        header_name: str,
        overwrite: bool,
        dpop: DpopSession | None = None,
        held: HeldToken | None = None,
    ) -> None:
        self.header_name = header_name.encode("ascii")
        self._lowered = self.header_name.lower()
        self.overwrite = overwrite
        # Set for an upstream with `token.dpop`; its held token says whether it is bound.
        self.dpop = dpop
        self._held = held
        # The last token and the field made of it: a token serves many requests.
        self._token = ""
        self._field: tuple[bytes, bytes] = (self.header_name, BEARER)

    def field(self, token: str) -> tuple[bytes, bytes]:
        """The header field (name, value) that carries `token` as a bearer token."""
        if token != self._token:
            self._field = (self.header_name, BEARER + token.encode("ascii"))
            self._token = token
        return self._field

    def inject(
        self,
        headers: Headers,
        token: str,
        method: str,
        scheme: str,
        authority: bytes,
        target: bytes,
    ) -> tuple[Headers, int]:
        """End-to-end request fields to send upstream, with `token`'s field set once.

        With `overwrite`, fields of the credential's name the client sent are dropped
        (never duplicated or comma-joined); without it, a client's own field wins and
        nothing is added. Returns a new list, and what went in (`NO_CREDENTIAL`,
        `BEARER_TOKEN`, `DPOP_TOKEN`). `method`, `scheme`, `authority` and `target` are
        the request as the upstream receives it: a DPoP proof is made for them.
        """
        dpop = self.dpop
        if dpop is not None and self._held is not None and self._held.dpop:
            return self._inject_bound(dpop, headers, token, (method, scheme, authority, target))
        credential_name = self._lowered
        length = len(credential_name)
        overwrite = self.overwrite
        kept: Headers = []
        clients_own = False
        for name, value in headers:
            if len(name) == length and name.lower() == credential_name:
                clients_own = True
                if overwrite:
                    continue
            kept.append((name, value))
        if clients_own and not overwrite:
            return kept, NO_CREDENTIAL
        kept.append(self.field(token))
        return kept, BEARER_TOKEN

    def _inject_bound(
        self,
        dpop: DpopSession,
        headers: Headers,
        token: str,
        request: tuple[str, str, bytes, bytes],
    ) -> tuple[Headers, int]:
        """`inject` for a DPoP-bound token; `request` is (method, scheme, authority,
        target) as the upstream receives it."""
        credential_name = self._lowered
        clients_own = any(name.lower() == credential_name for name, _ in headers)
        if clients_own and not self.overwrite:
            return list(headers), NO_CREDENTIAL
        kept = [
            (name, value)
            for name, value in headers
            if name.lower() not in (credential_name, _DPOP_FIELD)
        ]
        method, scheme, authority, target = request
        proof = dpop.request_proof(
            method, scheme, authority.decode("latin-1"), target.decode("latin-1"), token
        )
        kept.append((self.header_name, DPOP + token.encode("ascii")))
        kept.append((b"DPoP", proof))
        return kept, DPOP_TOKEN
