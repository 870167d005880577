"""Server-provided DPoP nonces (RFC 9449 §8, §9): what servers said, and how they said it.

A server that wants fresh proofs answers with a ``DPoP-Nonce`` header: on an error
(``use_dpop_nonce``: an authorization server's 400, a resource server's 401 with a
``WWW-Authenticate: DPoP error="use_dpop_nonce"`` challenge) or on any other answer,
to rotate it. `NonceBook` keeps the newest per origin, bounded; the value is checked
against the ``NONCE`` syntax of §8.1 before it goes into a proof.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["MAX_ORIGINS", "NonceBook", "asks_for_nonce", "valid_nonce"]

# RFC 9449 §8.1: nonce = 1*NQCHAR, NQCHAR = %x21 / %x23-5B / %x5D-7E.
_NONCE: Final = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]{1,512}")
_USE_DPOP_NONCE: Final = re.compile(r'error\s*=\s*"?use_dpop_nonce"?', re.IGNORECASE)
# An upstream's requests go to the hosts it matches, a bounded set; the bound only
# matters for a misconfiguration, and then the oldest origin is forgotten.
MAX_ORIGINS: Final = 1024


def valid_nonce(value: str | None) -> str | None:
    """`value` if it is a nonce a proof may carry, else None."""
    if value is None:
        return None
    value = value.strip()
    return value if _NONCE.fullmatch(value) else None


def asks_for_nonce(challenges: str) -> bool:
    """Whether a ``WWW-Authenticate`` value (or the error code of a token endpoint's
    answer) says ``use_dpop_nonce`` (RFC 9449 §9: only DPoP defines that error)."""
    return challenges == "use_dpop_nonce" or _USE_DPOP_NONCE.search(challenges) is not None


class NonceBook:
    """The newest nonce each origin (``scheme://authority``) gave."""

    __slots__ = ("_nonces",)

    def __init__(self) -> None:
        self._nonces: dict[str, str] = {}

    def get(self, origin: str) -> str | None:
        return self._nonces.get(origin)

    def note(self, origin: str, value: str | None) -> bool:
        """Keep `value` (a ``DPoP-Nonce`` field) for `origin`; whether it was usable."""
        nonce = valid_nonce(value)
        if nonce is None:
            return False
        nonces = self._nonces
        if origin not in nonces and len(nonces) >= MAX_ORIGINS:
            del nonces[next(iter(nonces))]
        nonces[origin] = nonce
        return True

    def __len__(self) -> int:
        return len(self._nonces)
