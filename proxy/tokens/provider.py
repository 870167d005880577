"""One upstream's token lifecycle: cache, single flight, proactive refresh, retries.

* A background task fetches the first token at `start()` and renews it ahead of
  expiry, when `proxy.tokens.schedule` says. While a valid token is held no request
  ever waits for a fetch.
* Single flight: whoever needs a fetch (the background task, `get()` on a cold start,
  `invalidate()`) joins the one in flight, so there is never more than one.
* A failed fetch is retried when `schedule.retry_delay` says: backoff with full jitter,
  fitted to the held token's remaining life while there is one. Meanwhile a
  still-valid token keeps being served; once it has expired `get()` raises
  `TokenUnavailable` with the time to the next attempt. Requests never cause fetches
  outside that schedule, and an expired token is never handed out.
* A token's lifetime counts from the moment its request was sent, on the monotonic
  `clock` (injectable for tests): a step of the wall clock changes no expiry and no
  schedule. The gauges and `status()` add wall-clock views, read when they are read.
* Lifetimes shorter than `MIN_LIFETIME` are raised to it (counted, logged once per
  change): no answer can make the proxy fetch a token per request.

The rest is delegated: the session to the token endpoint and its discovery
(`proxy.tokens.endpoint`), the account of fetches, their metrics and log lines
(`proxy.tokens.fetch_record`), and with a `SharedSlot` the fleet token cache, consulted
by the fetch task before every token request and never on the request path
(`proxy.tokens.fleet_sync`). `fetch_slots`, shared by the providers of one token
endpoint, bounds the token requests in flight to it (``token_endpoint_concurrency``); `sessions`
lets providers share their sessions (and keep-alive connections) to token endpoints.
Tokens and secrets never reach a log line, a metric or `status()`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
import weakref
from collections.abc import Callable

import proxy.tokens.schedule as schedule
from proxy.config import TokenConfig
from proxy.errors import TokenFetchError, TokenUnavailable
from proxy.ops.metrics import Metrics
from proxy.tokens.client import TokenResponse
from proxy.tokens.clock import wall_time
from proxy.tokens.dpop import DpopSession
from proxy.tokens.endpoint import EndpointAccess, SessionPool
from proxy.tokens.fetch_record import FetchRecord
from proxy.tokens.fleet_sync import FleetSync, remaining_life
from proxy.tokens.held_token import HeldToken
from proxy.tokens.shared_cache import LockHeld, SharedEntry, SharedSlot

__all__ = ["TokenProvider"]

log = logging.getLogger("token_proxy.tokens")

# The shortest lifetime a token is given, whatever its answer said (`expires_in: 0.001`):
# below real-world lifetimes (a minute or more), above a fetch per request.
MIN_LIFETIME = 10.0
# An upstream that rejects every token must not turn each request into a token fetch.
INVALIDATE_INTERVAL = 5.0
# Jitter only: one generator for every provider (each of its own costs 2.5 KiB of state).
_SHARED_RNG = random.Random()


class TokenProvider:
    """Owns one upstream's token: cache, single flight, proactive refresh, backoff."""

    def __init__(
        self,
        upstream: str,
        config: TokenConfig,
        metrics: Metrics,
        *,
        allow_insecure_http: bool = False,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = wall_time,
        rng: random.Random | None = None,
        invalidate_interval: float = INVALIDATE_INTERVAL,
        shared: SharedSlot | None = None,
        fetch_slots: asyncio.Semaphore | None = None,
        sessions: SessionPool | None = None,
    ) -> None:
        self.upstream = upstream
        self._config = config
        self._clock = clock
        self._wall_clock = wall_clock
        self._rng = rng if rng is not None else _SHARED_RNG
        self._invalidate_interval = invalidate_interval
        self._fetch_slots = fetch_slots

        # The token, and until when (monotonic: expiry minus leeway) it may be sent.
        self.held = HeldToken(clock)
        self._expires_at = -math.inf  # monotonic
        self._lifetime = 0.0  # of the held token, as given (after the floor)
        self._refresh_at = math.inf  # monotonic
        self._next_attempt_at = -math.inf  # monotonic: backoff, no attempt before this
        self._last_invalidation = -math.inf

        self._record = FetchRecord(upstream, metrics, wall_clock)
        # Where the held token came from: "fetched" or "shared_cache".
        self._token_source: str | None = None
        self._fleet = (
            None
            if shared is None
            else FleetSync(shared, self.held, margin=self._margin, wall_clock=wall_clock)
        )

        # DPoP (RFC 9449): the key lives as long as this provider, and the tokens bound
        # to it with it; the token client and the request path sign with it.
        self.dpop: DpopSession | None = None
        count_nonce_retry: Callable[[], None] | None = None
        if config.dpop is not None:
            self.dpop = DpopSession.from_config(config.dpop)
            retries = metrics.dpop_nonce_retries.labels(upstream=upstream, server="authorization")
            count_nonce_retry = retries.inc
        self._endpoint = EndpointAccess(
            upstream,
            config,
            allow_insecure_http=allow_insecure_http,
            wall_clock=wall_clock,
            sessions=sessions,
            dpop=self.dpop,
            on_nonce_retry=count_nonce_retry,
        )
        self._fetch_task: asyncio.Task[None] | None = None
        self._runner: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._closed = False

        # Weak references: a replaced provider must not be kept alive by the registry.
        this = weakref.ref(self)
        metrics.token_stats.watch(
            upstream,
            expires_in=lambda: provider._seconds_left() if (provider := this()) else 0.0,
            expiry=lambda: provider._expiry_timestamp() if (provider := this()) else 0.0,
        )

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Start the background task: first fetch now, then refresh. Returns at once."""
        if self._runner is None and not self._closed:
            self._runner = asyncio.create_task(self._run(), name=f"token-refresh[{self.upstream}]")

    async def close(self) -> None:
        """Stop the background task and any fetch in flight; close the HTTP session."""
        self._closed = True
        self.held.drop()
        self._wake.set()
        tasks = [task for task in (self._runner, self._fetch_task) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._runner = self._fetch_task = None
        await self._endpoint.close()

    # -- the request path ----------------------------------------------------------

    def current(self) -> str | None:
        """The cached token if it is still valid; never waits (the request path reads
        `held` directly)."""
        return self.held.current()

    def is_valid(self) -> bool:
        """Whether a valid token is held now (for /readyz)."""
        return self.current() is not None

    async def get(self) -> str:
        """A valid token: the cached one, or the result of the fetch in flight.

        Raises `TokenUnavailable` (with the seconds until the next attempt) when there is
        none and none is due before the backoff allows, or the fetch failed or took longer
        than the token timeout.
        """
        now = self._clock()
        token = self.held.token
        if token is not None and now < self.held.usable_until and not self._closed:
            if now >= self._refresh_at and now >= self._next_attempt_at and not self._fetch_task:
                # The background task is late (or was never started): renew now, in the
                # background; this request does not wait.
                self._start_fetch()
            return token
        if self._closed:
            raise self._unavailable()
        task = self._fetch_task
        if task is None:
            if self._clock() < self._next_attempt_at:
                raise self._unavailable()
            task = self._start_fetch()
        # asyncio.wait neither cancels the shared fetch on timeout nor when this caller
        # is cancelled (its client went away), and does not raise the fetch's outcome.
        await asyncio.wait({task}, timeout=self._config.timeout)
        token = self.current()
        if token is not None:
            return token
        raise self._unavailable()

    def invalidate(self, token: str) -> None:
        """The upstream refused `token` (a `purge_on_status` answer, 401 by default): if
        still cached, drop it and fetch anew.

        Calls for a token that is no longer the cached one do nothing, so any number of
        concurrent calls for one token cause one fetch. Within `invalidate_interval` of the
        last honoured call the token is kept: an upstream that rejects every token must not
        turn every request into a token request. During backoff the token is dropped but
        the next fetch waits for the backoff schedule.
        """
        if self._closed or self.held.token is None or token != self.held.token:
            return
        now = self._clock()
        if now - self._last_invalidation < self._invalidate_interval:
            log.info(
                "upstream %s rejected a fresh token again; keeping it for now",
                self.upstream,
                extra={"event": "token_invalidate_ignored", "upstream": self.upstream},
            )
            return
        self._last_invalidation = now
        if self._fleet is not None:
            # The purge runs in the next fetch, off the request path.
            self._fleet.refused(token)
        self.held.drop()
        log.info(
            "upstream %s rejected its token; fetching a new one",
            self.upstream,
            extra={"event": "token_invalidated", "upstream": self.upstream},
        )
        if self._fetch_task is None and now >= self._next_attempt_at:
            self._start_fetch()
        self._wake.set()

    def status(self) -> dict[str, object]:
        """JSON-safe state for /status; never a token or a secret."""
        now = self._clock()
        valid = self.is_valid()
        failing = self._record.consecutive_failures > 0
        if self._closed:
            state = "closed"
        elif valid:
            state = "valid_retrying" if failing else "valid"
        else:
            state = "unavailable" if failing else "pending"
        return {
            "state": state,
            "client_id": self._config.client_id,
            "auth_method": self._config.auth_method,
            "grant": self._config.grant,
            "expires_in_seconds": _rounded(self._seconds_left()) if valid else None,
            "refresh_in_seconds": _rounded(self._next_fetch_in(now)),
            **self._record.fields(),
            "token_source": self._token_source if valid else None,
            "token_cache": "local" if self._fleet is None else "shared",
            "shared_cache_hits": 0 if self._fleet is None else self._fleet.hits,
            "token_endpoint": self._endpoint.display(),
            "dpop": None if self.dpop is None else self._dpop_status(valid),
        }

    def _dpop_status(self, valid: bool) -> dict[str, object]:
        assert self.dpop is not None
        token_type = ("DPoP" if self.held.dpop else "Bearer") if valid else None
        return {**self.dpop.status(), "token_type": token_type}

    # -- scheduling --------------------------------------------------------------

    async def _run(self) -> None:
        """Fetch whenever one is due (first token, refresh, retry); sleep otherwise."""
        while not self._closed:
            task = self._fetch_task
            if task is not None:
                await asyncio.wait({task})
                continue
            self._wake.clear()
            delay = self._next_fetch_in(self._clock())
            if delay <= 0:
                self._start_fetch()
                continue
            try:
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            except TimeoutError:
                pass

    def _next_fetch_in(self, now: float) -> float:
        """Seconds until the next fetch is due (0: now)."""
        if self._fetch_task is not None:
            return 0.0
        if self._record.consecutive_failures:
            return max(0.0, self._next_attempt_at - now)
        if self.held.token is None:
            return 0.0
        return max(0.0, self._refresh_at - now)

    def _start_fetch(self) -> asyncio.Task[None]:
        if self._fetch_task is None:
            self._fetch_task = asyncio.create_task(
                self._fetch(), name=f"token-fetch[{self.upstream}]"
            )
        return self._fetch_task

    # -- one fetch ---------------------------------------------------------------

    async def _fetch(self) -> None:
        """One attempt, recorded; never raises (except when cancelled)."""
        started = time.perf_counter()
        lock: LockHeld | None = None
        try:
            if self._fleet is not None:
                found, lock = await self._fleet.find()
                if found is not None:
                    if not self._closed:
                        self._take_shared(found)
                    return
                started = time.perf_counter()
            client = self._endpoint.client()
            endpoint = await self._endpoint.endpoint_for_attempt()
            if self._fetch_slots is None:
                sent_at = self._clock()
                response = await client.fetch(endpoint)
            else:
                async with self._fetch_slots:
                    sent_at = self._clock()
                    response = await client.fetch(endpoint)
        except TokenFetchError as failure:
            self._record_failure(failure, time.perf_counter() - started)
        except Exception as exc:  # a bug must not stop the refresh loop
            log.error(
                "unexpected error fetching a token for %s",
                self.upstream,
                exc_info=True,
                extra={"event": "token_fetch", "upstream": self.upstream},
            )
            unexpected = TokenFetchError(f"unexpected error: {type(exc).__name__}")
            self._record_failure(unexpected, time.perf_counter() - started)
        else:
            self._record_success(response, sent_at, time.perf_counter() - started)
            if self._fleet is not None:
                await self._write_back(self._fleet, response)
        finally:
            try:
                if lock is not None and self._fleet is not None:
                    await self._fleet.release(lock)
            finally:
                self._fetch_task = None
                self._wake.set()

    # -- the fleet cache -------------------------------------------------------------

    def _take_shared(self, found: SharedEntry) -> None:
        assert self._fleet is not None
        now = self._clock()
        remaining = remaining_life(found.entry, self._wall_clock())
        recovered_after = self._record.consecutive_failures
        dpop = found.entry.token_type.lower() == "dpop"
        self._hold(found.entry.access_token, found.entry.lifetime, now + remaining, now, dpop)
        self._token_source = "shared_cache"
        self._fleet.taken(found)
        self._record.taken_from_cache(remaining, self._refresh_at - now, recovered_after)

    async def _write_back(self, fleet: FleetSync, response: TokenResponse) -> None:
        """Share the token just fetched, to expire from Redis when it expires."""
        if self._closed or self.held.token != response.access_token:
            return
        ttl = self._expires_at - self._clock()
        await fleet.share(response.access_token, response.token_type, ttl, self._lifetime)

    def _hold(self, token: str, lifetime: float, expires_at: float, now: float, dpop: bool) -> None:
        """Hold `token` (DPoP-bound with `dpop`) until `expires_at` (monotonic) and plan
        its renewal."""
        leeway = schedule.expiry_leeway(lifetime)
        margin = self._margin(lifetime)
        jitter = self._rng.uniform(0.0, schedule.REFRESH_JITTER_FRACTION * margin)
        self._expires_at = expires_at
        self._lifetime = lifetime
        if not self._closed:
            self.held.hold(token, expires_at - leeway, dpop=dpop)
        self._refresh_at = schedule.refresh_time(expires_at, now, margin, jitter)
        self._record.consecutive_failures = 0
        self._next_attempt_at = -math.inf
        self._endpoint.rediscover_next(False)

    def _margin(self, lifetime: float) -> float:
        """How long before expiry a token of `lifetime` is renewed (never within the leeway)."""
        return schedule.refresh_margin(lifetime, self._config.refresh_before_expiry)

    def _record_success(self, response: TokenResponse, sent_at: float, duration: float) -> None:
        now = self._clock()
        lifetime = self._record.floored_lifetime(response, MIN_LIFETIME)
        recovered_after = self._record.consecutive_failures
        # Lifetimes count from when the request was sent: the conservative end.
        dpop = response.token_type == "DPoP"
        self._hold(response.access_token, lifetime, sent_at + lifetime, now, dpop)
        self._token_source = "fetched"
        if self._fleet is not None:
            self._fleet.fetched()
        self._record.fetched(response, lifetime, duration, self._refresh_at - now, recovered_after)

    def _record_failure(self, error: TokenFetchError, duration: float) -> None:
        self._record.failed(error, duration)
        now = self._clock()
        serving = self.held.current() is not None
        retry_in = schedule.retry_delay(
            self._record.consecutive_failures,
            retry_initial=self._config.retry_initial,
            retry_max=self._config.retry_max,
            retry_after=error.retry_after,
            token_left=self.held.usable_until - now if serving else None,
            rng=self._rng,
        )
        self._next_attempt_at = now + retry_in
        self._endpoint.rediscover_next(True)
        self._record.log_failure(error, duration, retry_in, serving)

    # -- views -------------------------------------------------------------------

    def _unavailable(self) -> TokenUnavailable:
        if self._closed:
            return TokenUnavailable(
                f"token provider for upstream {self.upstream} is closed", upstream=self.upstream
            )
        now = self._clock()
        if self._fetch_task is not None:
            retry_after = 1.0
        else:
            retry_after = max(schedule.RETRY_FLOOR, self._next_attempt_at - now)
        detail = f"no valid token for upstream {self.upstream}"
        if self._fetch_task is not None:
            detail += ": the token request is taking long"
        elif (error := self._record.last_error) is not None and self._record.consecutive_failures:
            detail += f": {error.reason}: {error.message}"
        return TokenUnavailable(detail, upstream=self.upstream, retry_after=retry_after)

    def _seconds_left(self) -> float:
        if self.current() is None:
            return 0.0
        return max(0.0, self._expires_at - self._clock())

    def _expiry_timestamp(self) -> float:
        """The monotonic expiry as a Unix time, on the wall clock of the moment it is read."""
        if self.current() is None:
            return 0.0
        return self._wall_clock() + (self._expires_at - self._clock())


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
