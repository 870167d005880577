"""The one place a credential goes into a request head.

An upstream's `Injector` knows its header (`header`, default `Authorization`), the
scheme (`Bearer`, RFC 6750 §2.1) and whether the application's own field of that name
is replaced (`overwrite: true`) or kept (`overwrite: false`, and then nothing is added).
Both request paths build the head they send upstream through `Injector.inject`; which
token goes in is the provider's business (`proxy.tokens`), read by the request path
from the route's `HeldToken`.
"""

from __future__ import annotations

from typing import Final

from proxy.datapath.messages import Headers

BEARER: Final = b"Bearer "

# RFC 9110 §9.3.8: TRACE echoes the request back, so it never carries a credential.
_NEVER_CREDENTIALED: Final = "TRACE"


def may_carry_credential(method: str) -> bool:
    """Whether a request with `method` may be sent with a token at all."""
    return method != _NEVER_CREDENTIALED


class Injector:
    """Sets one upstream's credential field in request heads."""

    __slots__ = ("_field", "_lowered", "_token", "header_name", "overwrite")

    def __init__(self, header_name: str, overwrite: bool) -> None:
        self.header_name = header_name.encode("ascii")
        self._lowered = self.header_name.lower()
        self.overwrite = overwrite
        # The last token and the field made of it: a token serves many requests.
        self._token = ""
        self._field: tuple[bytes, bytes] = (self.header_name, BEARER)

    def field(self, token: str) -> tuple[bytes, bytes]:
        """The header field (name, value) that carries `token`."""
        if token != self._token:
            self._field = (self.header_name, BEARER + token.encode("ascii"))
            self._token = token
        return self._field

    def inject(self, headers: Headers, token: str) -> tuple[Headers, bool]:
        """End-to-end request fields to send upstream, with `token`'s field set once.

        With `overwrite`, fields of the credential's name the client sent are dropped
        (never duplicated or comma-joined); without it, a client's own field wins and
        nothing is added. Returns a new list, and whether the credential is in it.
        """
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
            return kept, False
        kept.append(self.field(token))
        return kept, True
