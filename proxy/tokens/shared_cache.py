"""The fleet token cache as the providers use it: one `SharedSlot` per shared credential.

Only the providers' refresh machinery calls in here; the request path never does.
Every step can fail, and a failure only ever means "no cache this time": the Redis
side (`proxy.tokens.redis_backend.CacheBackend`, imported only when `token_cache` is
set) answers `CacheUnavailable`, and the slot goes on without the cache.

The lock (cf. redis-py's ``redis/asyncio/lock.py``) is ``SET <name>:lock <owner> NX PX
<ttl>`` with a random owner value, so it expires by itself if its holder dies, and is
released with a compare-and-delete script, so a holder whose lock expired never
removes another's. The same script deletes a token entry only while it still holds the
value a replica read (the 401 purge): AES-GCM values carry a random nonce, so equal
values mean the very entry, and the comparison happens on the server, atomically.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from proxy.config import TokenConfig
from proxy.ops.metrics import Metrics
from proxy.ops.throttled_log import ThrottledLog
from proxy.tokens.cache_crypto import (
    CacheEntry,
    CacheKeys,
    CredentialUnreadable,
    EntryRejected,
    credential_identity,
)

if TYPE_CHECKING:
    from proxy.tokens.redis_backend import CacheBackend

__all__ = ["CacheUnavailable", "LockHeld", "SharedEntry", "SharedSlot"]

log = logging.getLogger("token_proxy.tokens.cache")

# Waiting for another replica's fetch: poll the entry (and the lock) from this often
# to this seldom, with jitter.
POLL_INITIAL: Final = 0.02
POLL_MAX: Final = 0.25
# The lock outlives a token request (timeout + this) but expires early enough in the
# waiters' `lock_timeout` for one of them to take it over from a holder that died.
LOCK_SLACK: Final = 1.0
LOCK_TTL_FRACTION: Final = 0.75
LOCK_TTL_MIN: Final = 0.5

# Jitter of the lock waits: one generator for every slot.
_SHARED_RNG = random.Random()


class CacheUnavailable(Exception):
    """The cache could not answer this time; the caller goes on without it."""


@dataclass(frozen=True)
class SharedEntry:
    """An entry read from Redis: the token it holds, and the exact value (for the purge)."""

    entry: CacheEntry
    value: bytes


@dataclass(frozen=True)
class LockHeld:
    """This replica holds the fetch lock of a credential until `release()`."""

    name: str
    owner: bytes


class SharedSlot:
    """One credential's place in the fleet cache: its entry and its fetch lock.

    `lookup()`, `lock_or_wait()`, `store()`, `release()` and `purge()` are the steps the
    provider takes around a token request; each counts its outcome and none raises
    for a Redis failure (the provider then behaves as if there were no cache).
    """

    def __init__(
        self,
        backend: CacheBackend,
        keys: CacheKeys,
        upstream: str,
        config: TokenConfig,
        metrics: Metrics,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backend = backend
        self._keys = keys
        self.upstream = upstream
        self._config = config
        self._metrics = metrics
        self._rng = rng if rng is not None else _SHARED_RNG
        self._clock = clock
        cache = backend.config
        self.lock_timeout = cache.lock_timeout
        self.lock_ttl = max(
            LOCK_TTL_MIN, min(config.timeout + LOCK_SLACK, LOCK_TTL_FRACTION * cache.lock_timeout)
        )
        self._throttled = ThrottledLog(log, interval=60.0)
        metrics.register_cache_upstream(upstream)

    def entry_name(self) -> str | None:
        """The Redis key of this credential's entry now (files are re-read), or None."""
        try:
            identity = credential_identity(self._config, self._keys)
        except CredentialUnreadable as unreadable:
            self._throttled.log(
                logging.WARNING,
                f"unreadable:{self.upstream}",
                "credential of %s unreadable (%s); its token is not shared this time",
                self.upstream,
                str(unreadable),
            )
            return None
        return self._keys.entry_name(self.backend.config.key_prefix, identity)

    # -- the steps -------------------------------------------------------------------

    async def lookup(self, accept: Callable[[CacheEntry], bool]) -> SharedEntry | None:
        """The shared entry if there is one `accept` takes; counted as hit, miss or error."""
        name = self.entry_name()
        if name is None:
            self._count_lookup("error")
            return None
        try:
            found = await self._read(name, accept, report=True)
        except CacheUnavailable:
            self._count_lookup("error")
            return None
        self._count_lookup("hit" if found is not None else "miss")
        return found

    async def lock_or_wait(
        self, accept: Callable[[CacheEntry], bool]
    ) -> LockHeld | SharedEntry | None:
        """Take the fetch lock, or wait up to `lock_timeout` for the holder's new entry.

        `LockHeld`: fetch, `store()`, then `release()`. `SharedEntry`: another replica's
        fetch brought a token `accept` takes. None: fetch without the lock (the wait
        timed out, or the cache failed).
        """
        name = self.entry_name()
        if name is None:
            return None
        lock = LockHeld(f"{name}:lock", secrets.token_hex(16).encode())
        deadline = self._clock() + self.lock_timeout
        delay = POLL_INITIAL
        waited = False
        while True:
            try:
                found = await self._read(name, accept) if waited else None
                if found is None and await self.backend.set_if_absent(
                    lock.name, lock.owner, self.lock_ttl
                ):
                    # Checked again under the lock: the previous holder may have written
                    # its entry and released between our read and our SET.
                    found = await self._read(name, accept)
                    if found is None:
                        if waited:
                            # The holder gave up or died (its lock expired) without an entry.
                            self._count_wait("acquired")
                        return lock
                    await self.release(lock)
                if found is not None:
                    if waited:
                        self._count_wait("entry")
                    return found
            except CacheUnavailable:
                if waited:
                    self._count_wait("error")
                return None
            remaining = deadline - self._clock()
            if remaining <= 0:
                self._count_wait("timeout")
                log.warning(
                    "waited %.1f s for another replica's token request for %s; requesting one here",
                    self.lock_timeout,
                    self.upstream,
                    extra={"event": "token_cache_wait", "upstream": self.upstream},
                )
                return None
            waited = True
            await asyncio.sleep(min(remaining, self._rng.uniform(delay / 2, delay)))
            delay = min(POLL_MAX, delay * 2)

    async def store(self, entry: CacheEntry, ttl: float) -> bytes | None:
        """Write `entry` back, to expire from Redis in `ttl` seconds; the value, or None."""
        name = self.entry_name()
        if name is None or ttl <= 0:
            return None
        value = self._keys.seal(name, entry)
        try:
            await self.backend.set(name, value, ttl)
        except CacheUnavailable:
            self._metrics.token_cache_write_failures.labels(upstream=self.upstream).inc()
            return None
        return value

    async def release(self, lock: LockHeld) -> None:
        """Release `lock` if this replica still owns it (otherwise it expires by itself)."""
        with contextlib.suppress(CacheUnavailable):
            await self.backend.delete_if_equal(lock.name, lock.owner)

    async def purge(self, value: bytes) -> bool:
        """Delete the entry only if it still holds `value` (the token an upstream refused)."""
        name = self.entry_name()
        if name is None:
            return False
        try:
            return await self.backend.delete_if_equal(name, value)
        except CacheUnavailable:
            return False

    # -- helpers ---------------------------------------------------------------------

    async def _read(
        self, name: str, accept: Callable[[CacheEntry], bool], *, report: bool = False
    ) -> SharedEntry | None:
        """The entry under `name` if `accept` takes it; `report`: count and log a value
        that does not open (once per lookup, not again for each poll)."""
        value = await self.backend.get(name)
        if value is None:
            return None
        try:
            entry = self._keys.open_entry(name, value)
        except EntryRejected as rejected:
            if not report:
                return None
            self._metrics.token_cache_rejected_entries.labels(reason=rejected.reason).inc()
            self._throttled.log(
                logging.WARNING,
                f"rejected:{self.upstream}",
                "shared token entry for %s is %s (written with another encryption key, "
                "or damaged); requesting a token instead",
                self.upstream,
                rejected.reason,
            )
            return None
        return SharedEntry(entry, value) if accept(entry) else None

    def _count_lookup(self, result: str) -> None:
        self._metrics.token_cache_lookups.labels(upstream=self.upstream, result=result).inc()

    def _count_wait(self, outcome: str) -> None:
        self._metrics.token_cache_lock_waits.labels(upstream=self.upstream, outcome=outcome).inc()
