"""The token an upstream's provider holds, as the request path reads it.

`TokenProvider` (`proxy.tokens`) owns a token's whole life: fetching, refreshing,
backoff, invalidation. All a request asks is whether there is a token it may send now.
A `HeldToken` answers that: the provider keeps it up to date, and the request path
(compiled with the rest of the data path) reads it without a call into the provider.
"""

from __future__ import annotations

import math
from collections.abc import Callable


class HeldToken:
    """A token and the time, on its provider's clock, until which it may be sent."""

    __slots__ = ("_clock", "dpop", "token", "usable_until")

    def __init__(self, clock: Callable[[], float]) -> None:
        self.token: str | None = None
        self.usable_until = -math.inf
        # Whether the token is DPoP-bound (RFC 9449): sent with a proof, scheme `DPoP`.
        # An upstream's tokens are all of one kind unless its server changes its mind.
        self.dpop = False
        self._clock = clock

    def current(self) -> str | None:
        """The token if it may still be sent; never waits."""
        token = self.token
        if token is None or self._clock() >= self.usable_until:
            return None
        return token

    def hold(self, token: str, usable_until: float, *, dpop: bool = False) -> None:
        """Hold `token` from now on, to be sent until `usable_until` (a DPoP-bound one
        with `dpop`)."""
        self.token = token
        self.usable_until = usable_until
        self.dpop = dpop

    def drop(self) -> None:
        """Hold no token (invalidated, or the provider closed)."""
        self.token = None
        self.usable_until = -math.inf
