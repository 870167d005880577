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

    __slots__ = ("_clock", "token", "usable_until")

    def __init__(self, clock: Callable[[], float]) -> None:
        self.token: str | None = None
        self.usable_until = -math.inf
        self._clock = clock

    def current(self) -> str | None:
        """The token if it may still be sent; never waits."""
        token = self.token
        if token is None or self._clock() >= self.usable_until:
            return None
        return token

    def drop(self) -> None:
        self.token = None
        self.usable_until = -math.inf
