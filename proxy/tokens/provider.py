"""One upstream's token lifecycle: cache, single flight, proactive refresh, backoff.

Policy:

* A background task fetches the first token at `start()` and renews it ahead of
  expiry: at ``expiry - margin - jitter`` where the margin is ``refresh_before_expiry``
  or else ``min(300 s, 20 % of the lifetime)``, never more than half the lifetime, and
  the jitter (up to 5 % of the margin) keeps replicas from renewing in lockstep.
  While a valid token is cached no request ever waits for a fetch.
* Single flight: whoever needs a fetch (the background task, `get()` on a cold start,
  `invalidate()`) joins the one in flight, so there is never more than one.
* A failed fetch is retried with exponential backoff and full jitter (``retry_initial``
  doubling up to ``retry_max``, never under 0.1 s), and never before a ``Retry-After``
  (capped at 10 min). Meanwhile a still-valid token keeps being served; once it has
  expired `get()` raises `TokenUnavailable` with the time to the next attempt. Requests
  never cause fetches outside that schedule, and an expired token is never handed out.
* With ``issuer`` the token endpoint is discovered before the first fetch, and again
  before the attempt that follows a failed one.
* A token's lifetime counts from the moment its request was sent, on the monotonic
  `clock`: a step of the wall clock changes no expiry and no schedule (the token
  client measures lifetimes without the wall clock wherever the answer allows).
* Lifetimes shorter than `MIN_LIFETIME` are raised to it, counted in
  ``token_proxy_token_lifetime_clamped_total`` and logged once per change: no answer
  from a token endpoint can make the proxy fetch a token per request. The refresh
  margin is at most half the (clamped) lifetime, so even such a token is renewed
  about every ``MIN_LIFETIME / 2`` seconds at most.

Expiry is kept on the monotonic `clock` (injectable for tests); the Prometheus gauges
and `status()` add wall-clock views of it, read from `wall_clock` when they are read.
Tokens and secrets never reach a log line, a metric or `status()`.

With a `SharedSlot` (the fleet token cache, `proxy.tokens.shared_cache`) every fetch
goes through the cache first, in the background task, never on the request path:

* read the shared entry, and take its token if it is still valid beyond the refresh
  margin on this replica's wall clock (and is neither the token held nor one an
  upstream refused);
* otherwise take the credential's lock, or wait up to ``lock_timeout`` for the new
  entry of the replica that holds it; then request a token (with the lock, or on
  our own once the wait is over or the cache failed) and write it back.

Refreshes coordinate by themselves: every replica holding a token plans its renewal
at ``expiry - margin - jitter``; the first to get there finds the entry it already
holds, takes the lock and renews; the others, a jittered moment later, find the
renewed entry and take it. A 401 removes the shared entry only if it still holds the
refused token (`SharedSlot.purge`). A cache that fails is counted and bypassed.

`fetch_slots`, shared by the providers of one token endpoint, bounds how many token
requests are in flight to it at once (``token_endpoint_concurrency``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
import weakref
from collections.abc import Callable

import aiohttp

from proxy import __version__
from proxy.config import TokenConfig
from proxy.errors import TokenEndpointUnreachable, TokenFetchError, TokenUnavailable
from proxy.ops.metrics import Metrics
from proxy.tls.client_context import client_ssl_context
from proxy.tokens.cache_crypto import CacheEntry
from proxy.tokens.client import TokenClient, TokenResponse, display_url
from proxy.tokens.clock import wall_time
from proxy.tokens.discovery import discover_token_endpoint
from proxy.tokens.held_token import HeldToken
from proxy.tokens.shared_cache import LockHeld, SharedEntry, SharedSlot

__all__ = ["TokenProvider"]

log = logging.getLogger("token_proxy.tokens")

DEFAULT_MARGIN_MAX = 300.0
DEFAULT_MARGIN_FRACTION = 0.2
# A configured margin longer than the token's life would renew it continuously.
MARGIN_MAX_FRACTION = 0.5
REFRESH_JITTER_FRACTION = 0.05
# Even an absurdly short-lived token is not renewed in a tight loop.
MIN_REFRESH_DELAY = 0.5
# The shortest lifetime a token is given, whatever its answer said (`expires_in: 0.001`):
# below real-world lifetimes (a minute or more), above a fetch per request.
MIN_LIFETIME = 10.0
# The upstream checks `exp` on its own clock after the request has travelled: a token
# this close to its expiry is no longer handed out (cf. golang.org/x/oauth2 expiryDelta).
EXPIRY_LEEWAY_MAX = 5.0
EXPIRY_LEEWAY_FRACTION = 0.05
RETRY_FLOOR = 0.1
RETRY_AFTER_MAX = 600.0
# An upstream that rejects every token must not turn each request into a token fetch.
INVALIDATE_INTERVAL = 5.0


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
    ) -> None:
        self.upstream = upstream
        self._config = config
        self._metrics = metrics
        self._allow_insecure_http = allow_insecure_http
        self._clock = clock
        self._wall_clock = wall_clock
        self._rng = rng if rng is not None else random.Random()
        self._invalidate_interval = invalidate_interval
        self._shared = shared
        self._fetch_slots = fetch_slots

        # The token, and until when (monotonic: expiry minus leeway) it may be sent.
        self.held = HeldToken(clock)
        self._expires_at = -math.inf  # monotonic
        self._lifetime = 0.0  # of the held token, as given (after the floor)
        self._lifetime_clamped = False
        self._refresh_at = math.inf  # monotonic
        self._next_attempt_at = -math.inf  # monotonic: backoff, no attempt before this
        self._last_invalidation = -math.inf

        self._consecutive_failures = 0
        self._fetches = 0
        self._failed_fetches = 0
        self._last_error: TokenFetchError | None = None
        self._last_error_time: float | None = None
        self._last_fetch_time: float | None = None
        self._last_success_time: float | None = None
        self._last_fetch_duration: float | None = None
        # The fleet cache: where the held token came from, the exact shared value that
        # holds it (for the 401 purge), a value to purge, and the token refused last.
        self._token_source: str | None = None
        self._shared_value: bytes | None = None
        self._purge_value: bytes | None = None
        self._refused_token: str | None = None
        self._shared_hits = 0

        self._token_endpoint: str | None = config.token_url
        self._rediscover = False
        self._session: aiohttp.ClientSession | None = None
        self._client: TokenClient | None = None
        self._fetch_task: asyncio.Task[None] | None = None
        self._runner: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._closed = False

        # Weak references: a replaced provider must not be kept alive by the registry.
        this = weakref.ref(self)
        metrics.token_expires_in.labels(upstream=upstream).set_function(
            lambda: provider._seconds_left() if (provider := this()) else 0.0
        )
        metrics.token_expiry_timestamp.labels(upstream=upstream).set_function(
            lambda: provider._expiry_timestamp() if (provider := this()) else 0.0
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
        if self._session is not None:
            await self._session.close()
            self._session = self._client = None

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
        """The upstream answered 401 to `token`: if still cached, drop it and fetch anew.

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
        self._refused_token = token
        # The purge runs in the next fetch, off the request path.
        self._purge_value, self._shared_value = self._shared_value, None
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
        failing = self._consecutive_failures > 0
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
            "expires_in_seconds": _rounded(self._seconds_left()) if valid else None,
            "refresh_in_seconds": _rounded(self._next_fetch_in(now)),
            "last_fetch_time": self._last_fetch_time,
            "last_success_time": self._last_success_time,
            "last_fetch_duration_seconds": _rounded(self._last_fetch_duration),
            "last_error": None
            if self._last_error is None
            else {
                "reason": self._last_error.reason,
                "message": self._last_error.message,
                "time": self._last_error_time,
            },
            "consecutive_failures": self._consecutive_failures,
            "fetches": self._fetches,
            "failed_fetches": self._failed_fetches,
            "token_source": self._token_source if valid else None,
            "token_cache": "local" if self._shared is None else "shared",
            "shared_cache_hits": self._shared_hits,
            "token_endpoint": display_url(self._token_endpoint) if self._token_endpoint else None,
        }

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
        if self._consecutive_failures:
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
            if self._shared is not None:
                taken, lock = await self._through_cache(self._shared)
                if taken:
                    return
                started = time.perf_counter()
            client = self._ensure_client()
            endpoint = await self._token_endpoint_for_attempt()
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
            if self._shared is not None:
                await self._write_back(self._shared, response)
        finally:
            try:
                if lock is not None and self._shared is not None:
                    await self._shared.release(lock)
            finally:
                self._fetch_task = None
                self._wake.set()

    # -- the fleet cache -------------------------------------------------------------

    async def _through_cache(self, shared: SharedSlot) -> tuple[bool, LockHeld | None]:
        """Take a token from the shared cache if it has one; else the lock, if to be had.

        (True, None): a token was taken. (False, lock or None): request one, holding
        `lock` if not None.
        """
        if self._purge_value is not None:
            value, self._purge_value = self._purge_value, None
            if await shared.purge(value):
                log.info(
                    "removed the token %s refused from the shared cache",
                    self.upstream,
                    extra={"event": "token_cache_purge", "upstream": self.upstream},
                )
        found = await shared.lookup(self._acceptable)
        if found is None:
            outcome = await shared.lock_or_wait(self._acceptable)
            if not isinstance(outcome, SharedEntry):
                return False, outcome
            found = outcome
        if not self._closed:
            self._take_shared(found)
        return True, None

    def _acceptable(self, entry: CacheEntry) -> bool:
        """Whether a shared entry is worth taking: a token other than the one held or
        refused, valid beyond its refresh margin on this replica's wall clock."""
        if entry.access_token == self.held.token or entry.access_token == self._refused_token:
            return False
        remaining = min(entry.expires_at - self._wall_clock(), entry.lifetime)
        return remaining > self._margin(entry.lifetime)

    def _take_shared(self, found: SharedEntry) -> None:
        entry = found.entry
        now = self._clock()
        # A writer's clock behind ours cannot make a token live longer than its lifetime.
        remaining = min(entry.expires_at - self._wall_clock(), entry.lifetime)
        recovered_after = self._consecutive_failures
        self._hold(entry.access_token, entry.lifetime, now + remaining, now)
        self._token_source = "shared_cache"
        self._shared_value = found.value
        self._shared_hits += 1
        self._last_success_time = self._wall_clock()
        log.info(
            "token for %s taken from the shared cache: expires in %.0f s, refresh in %.0f s%s",
            self.upstream,
            remaining,
            self._refresh_at - now,
            f" (recovered after {recovered_after} failures)" if recovered_after else "",
            extra={
                "event": "token_shared",
                "upstream": self.upstream,
                "expires_in": round(remaining, 1),
                "refresh_in": round(self._refresh_at - now, 1),
                "recovered_after_failures": recovered_after,
            },
        )

    async def _write_back(self, shared: SharedSlot, response: TokenResponse) -> None:
        """Share the token just fetched, to expire from Redis when it expires."""
        if self._closed or self.held.token != response.access_token:
            return
        ttl = self._expires_at - self._clock()
        entry = CacheEntry(
            response.access_token,
            response.token_type,
            expires_at=self._wall_clock() + ttl,
            lifetime=self._lifetime,
        )
        value = await shared.store(entry, ttl)
        if self.held.token == response.access_token:
            self._shared_value = value

    def _ensure_client(self) -> TokenClient:
        if self._client is not None:
            return self._client
        try:
            ssl_context = client_ssl_context(self._config.tls)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise TokenEndpointUnreachable(f"TLS settings unusable: {detail}") from None
        timeout = aiohttp.ClientTimeout(
            total=self._config.timeout, sock_connect=self._config.connect_timeout
        )
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=ssl_context, limit=4),
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=timeout,
            headers={"User-Agent": f"token-proxy/{__version__}"},
            # Never through HTTP(S)_PROXY: in a sidecar's pod that may be this very proxy.
            trust_env=False,
        )
        self._client = TokenClient(
            self._config, self._session, upstream=self.upstream, wall_clock=self._wall_clock
        )
        return self._client

    async def _token_endpoint_for_attempt(self) -> str:
        issuer = self._config.issuer
        if issuer is None:
            if self._token_endpoint is None:
                raise TokenFetchError("neither token_url nor issuer is configured")
            return self._token_endpoint
        if self._token_endpoint is None or self._rediscover:
            assert self._session is not None
            try:
                self._token_endpoint = await discover_token_endpoint(
                    self._session, issuer, allow_insecure_http=self._allow_insecure_http
                )
                self._rediscover = False
            except TokenFetchError as error:
                if self._token_endpoint is None:
                    raise
                log.warning(
                    "rediscovery for %s failed (%s); using the last known token endpoint",
                    self.upstream,
                    error.message,
                    extra={"event": "token_discovery", "upstream": self.upstream},
                )
        return self._token_endpoint

    def _hold(self, token: str, lifetime: float, expires_at: float, now: float) -> None:
        """Hold `token` until `expires_at` (monotonic) and plan its renewal."""
        leeway = min(EXPIRY_LEEWAY_MAX, lifetime * EXPIRY_LEEWAY_FRACTION)
        margin = self._margin(lifetime)
        jitter = self._rng.uniform(0.0, REFRESH_JITTER_FRACTION * margin)
        self._expires_at = expires_at
        self._lifetime = lifetime
        if not self._closed:
            self.held.hold(token, expires_at - leeway)
        self._refresh_at = max(expires_at - margin - jitter, now + MIN_REFRESH_DELAY)
        self._consecutive_failures = 0
        self._next_attempt_at = -math.inf
        self._rediscover = False

    def _margin(self, lifetime: float) -> float:
        """How long before expiry a token of `lifetime` is renewed (never within the leeway)."""
        leeway = min(EXPIRY_LEEWAY_MAX, lifetime * EXPIRY_LEEWAY_FRACTION)
        return max(self._refresh_margin(lifetime), leeway)

    def _record_success(self, response: TokenResponse, sent_at: float, duration: float) -> None:
        now = self._clock()
        lifetime = self._floored_lifetime(response)
        recovered_after = self._consecutive_failures
        # Lifetimes count from when the request was sent: the conservative end.
        self._hold(response.access_token, lifetime, sent_at + lifetime, now)
        self._token_source = "fetched"
        self._shared_value = None
        self._fetches += 1
        self._last_fetch_time = self._last_success_time = self._wall_clock()
        self._last_fetch_duration = duration

        self._metrics.token_fetches.labels(upstream=self.upstream, outcome="success").inc()
        self._metrics.token_fetch_duration.labels(upstream=self.upstream).observe(duration)
        log.info(
            "token fetched for %s: expires in %.0f s (%s), refresh in %.0f s%s",
            self.upstream,
            lifetime,
            response.lifetime_source,
            self._refresh_at - now,
            f" (recovered after {recovered_after} failures)" if recovered_after else "",
            extra={
                "event": "token_fetch",
                "upstream": self.upstream,
                "outcome": "success",
                "duration_ms": round(duration * 1000, 1),
                "expires_in": round(lifetime, 1),
                "lifetime_source": response.lifetime_source,
                "refresh_in": round(self._refresh_at - now, 1),
                "recovered_after_failures": recovered_after,
            },
        )

    def _floored_lifetime(self, response: TokenResponse) -> float:
        """The answer's lifetime, raised to `MIN_LIFETIME`; counted, and logged per change."""
        declared = response.expires_in
        clamped = declared < MIN_LIFETIME
        extra = {"event": "token_lifetime_clamped", "upstream": self.upstream}
        if clamped:
            self._metrics.token_lifetime_clamped.labels(upstream=self.upstream).inc()
            if not self._lifetime_clamped:
                log.warning(
                    "token for %s lives %.3g s (%s); using it for %.0f s, the shortest "
                    "lifetime given, so that it is not fetched for every request",
                    self.upstream,
                    declared,
                    response.lifetime_source,
                    MIN_LIFETIME,
                    extra={**extra, "declared_lifetime": declared, "lifetime": MIN_LIFETIME},
                )
        elif self._lifetime_clamped:
            log.info(
                "token for %s lives %.0f s again, no longer raised to the shortest lifetime",
                self.upstream,
                declared,
                extra={**extra, "declared_lifetime": declared, "lifetime": declared},
            )
        self._lifetime_clamped = clamped
        return max(declared, MIN_LIFETIME)

    def _refresh_margin(self, lifetime: float) -> float:
        configured = self._config.refresh_before_expiry
        if configured is None:
            margin = min(DEFAULT_MARGIN_MAX, DEFAULT_MARGIN_FRACTION * lifetime)
        else:
            margin = configured
        return min(margin, MARGIN_MAX_FRACTION * lifetime)

    def _record_failure(self, error: TokenFetchError, duration: float) -> None:
        self._consecutive_failures += 1
        self._failed_fetches += 1
        self._last_error = error
        self._last_fetch_time = self._last_error_time = self._wall_clock()
        self._last_fetch_duration = duration
        retry_in = self._backoff(error)
        self._next_attempt_at = self._clock() + retry_in
        self._rediscover = self._config.issuer is not None

        self._metrics.token_fetches.labels(upstream=self.upstream, outcome="failure").inc()
        self._metrics.token_fetch_failures.labels(upstream=self.upstream, reason=error.reason).inc()
        self._metrics.token_fetch_duration.labels(upstream=self.upstream).observe(duration)
        serving = self.is_valid()
        log.log(
            logging.WARNING if serving else logging.ERROR,
            "token fetch for %s failed (%s): %s; %d consecutive failure(s), next attempt in "
            "%.1f s, %s",
            self.upstream,
            error.reason,
            error.message,
            self._consecutive_failures,
            retry_in,
            "still serving the cached token" if serving else "no valid token",
            extra={
                "event": "token_fetch",
                "upstream": self.upstream,
                "outcome": "failure",
                "reason": error.reason,
                "error": error.message,
                "duration_ms": round(duration * 1000, 1),
                "consecutive_failures": self._consecutive_failures,
                "retry_in": round(retry_in, 2),
                "serving_cached_token": serving,
            },
        )

    def _backoff(self, error: TokenFetchError) -> float:
        """Full-jitter exponential backoff, floored, and never before a Retry-After."""
        exponent = min(self._consecutive_failures - 1, 62)
        ceiling = min(self._config.retry_max, self._config.retry_initial * 2.0**exponent)
        delay = max(RETRY_FLOOR, self._rng.uniform(0.0, ceiling))
        if error.retry_after is not None:
            delay = max(delay, min(error.retry_after, RETRY_AFTER_MAX))
        return delay

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
            retry_after = max(RETRY_FLOOR, self._next_attempt_at - now)
        detail = f"no valid token for upstream {self.upstream}"
        if self._fetch_task is not None:
            detail += ": the token request is taking long"
        elif self._last_error is not None and self._consecutive_failures:
            detail += f": {self._last_error.reason}: {self._last_error.message}"
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
