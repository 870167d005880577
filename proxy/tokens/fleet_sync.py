"""One provider's side of the fleet token cache: what it takes from it and gives back.

`TokenProvider` (`proxy.tokens.provider`) calls a `FleetSync` from its fetch task only,
never on the request path; `SharedSlot` (`proxy.tokens.shared_cache`) does the Redis
work. A `FleetSync` owns what ties the held token to the shared entry:

* before a token request (`find`): the purge of an entry whose token an upstream
  refused, then the shared entry, taken if it holds a token other than the one held or
  refused that is still valid beyond the refresh margin on this replica's wall clock;
  otherwise the credential's lock, or a wait of up to ``lock_timeout`` for the entry of
  the replica that holds it;
* after a token request (`share`): the write-back, to expire from Redis when the token
  expires, and the exact value written (what a later 401 purges);
* on a 401 (`refused`): the refused token, never taken from the cache again, and the
  value to purge, removed by the next fetch only if the entry still holds it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from proxy.tokens.cache_crypto import CacheEntry
from proxy.tokens.held_token import HeldToken
from proxy.tokens.shared_cache import LockHeld, SharedEntry, SharedSlot

__all__ = ["FleetSync", "remaining_life"]

log = logging.getLogger("token_proxy.tokens")


def remaining_life(entry: CacheEntry, wall_now: float) -> float:
    """Seconds `entry`'s token has left: a writer's clock behind ours cannot make a
    token live longer than its lifetime."""
    return min(entry.expires_at - wall_now, entry.lifetime)


class FleetSync:
    """The held token's relation to its shared entry; counts what it took."""

    def __init__(
        self,
        slot: SharedSlot,
        held: HeldToken,
        *,
        margin: Callable[[float], float],
        wall_clock: Callable[[], float],
    ) -> None:
        self.slot = slot
        self._held = held
        self._margin = margin
        self._wall_clock = wall_clock
        # The exact shared value that holds the held token (for the 401 purge), a value
        # to purge, and the token refused last.
        self._value: bytes | None = None
        self._purge_value: bytes | None = None
        self._refused_token: str | None = None
        self.hits = 0

    async def find(self) -> tuple[SharedEntry | None, LockHeld | None]:
        """A shared entry to take, or else the lock if it is to be had.

        (entry, None): take `entry`'s token (see `taken`). (None, lock or None): request
        a token, holding `lock` if not None, and `release` it afterwards.
        """
        slot = self.slot
        if self._purge_value is not None:
            value, self._purge_value = self._purge_value, None
            if await slot.purge(value):
                log.info(
                    "removed the token %s refused from the shared cache",
                    slot.upstream,
                    extra={"event": "token_cache_purge", "upstream": slot.upstream},
                )
        found = await slot.lookup(self._acceptable)
        if found is None:
            outcome = await slot.lock_or_wait(self._acceptable)
            if not isinstance(outcome, SharedEntry):
                return None, outcome
            found = outcome
        return found, None

    def taken(self, found: SharedEntry) -> None:
        """`found`'s token is now the one held."""
        self._value = found.value
        self.hits += 1

    def fetched(self) -> None:
        """The held token was fetched here and is not (yet) in the cache."""
        self._value = None

    async def share(self, token: str, token_type: str, ttl: float, lifetime: float) -> None:
        """Write the token just fetched back, to expire from Redis in `ttl` seconds."""
        entry = CacheEntry(
            token, token_type, expires_at=self._wall_clock() + ttl, lifetime=lifetime
        )
        value = await self.slot.store(entry, ttl)
        if self._held.token == token:
            self._value = value

    async def release(self, lock: LockHeld) -> None:
        await self.slot.release(lock)

    def refused(self, token: str) -> None:
        """An upstream refused `token`: never take it again; purge its entry next time."""
        self._refused_token = token
        self._purge_value, self._value = self._value, None

    def _acceptable(self, entry: CacheEntry) -> bool:
        """Whether a shared entry is worth taking: a token other than the one held or
        refused, valid beyond its refresh margin on this replica's wall clock."""
        if entry.access_token == self._held.token or entry.access_token == self._refused_token:
            return False
        return remaining_life(entry, self._wall_clock()) > self._margin(entry.lifetime)
