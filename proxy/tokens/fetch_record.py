"""What became of one upstream's token requests: counts, the last outcome, and the
metrics and log lines each outcome makes.

`TokenProvider` (`proxy.tokens.provider`) decides when to fetch and what to hold; a
`FetchRecord` keeps the account of it: consecutive and total failures, the last error
and when, the last fetch and its duration, and the lifetime floor's state (logged once
per change, counted every time). `/status` reads it through `fields()`. Log lines and
metrics name the upstream, the reason and the times, never a token or a secret.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from proxy.errors import TokenFetchError
from proxy.ops.metrics import Metrics
from proxy.tokens.client import TokenResponse

__all__ = ["FetchRecord"]

log = logging.getLogger("token_proxy.tokens")


class FetchRecord:
    """The account of one upstream's token requests."""

    def __init__(self, upstream: str, metrics: Metrics, wall_clock: Callable[[], float]) -> None:
        self.upstream = upstream
        self._metrics = metrics
        self._wall_clock = wall_clock
        self.consecutive_failures = 0
        self.fetches = 0
        self.failed_fetches = 0
        self.last_error: TokenFetchError | None = None
        self.last_error_time: float | None = None
        self.last_fetch_time: float | None = None
        self.last_success_time: float | None = None
        self.last_fetch_duration: float | None = None
        self._lifetime_clamped = False

    def floored_lifetime(self, response: TokenResponse, floor: float) -> float:
        """The answer's lifetime, raised to `floor`; counted, and logged per change."""
        declared = response.expires_in
        clamped = declared < floor
        extra = {"event": "token_lifetime_clamped", "upstream": self.upstream}
        if clamped:
            self._metrics.token_stats.lifetime_clamped(self.upstream)
            if not self._lifetime_clamped:
                log.warning(
                    "token for %s lives %.3g s (%s); using it for %.0f s, the shortest "
                    "lifetime given, so that it is not fetched for every request",
                    self.upstream,
                    declared,
                    response.lifetime_source,
                    floor,
                    extra={**extra, "declared_lifetime": declared, "lifetime": floor},
                )
        elif self._lifetime_clamped:
            log.info(
                "token for %s lives %.0f s again, no longer raised to the shortest lifetime",
                self.upstream,
                declared,
                extra={**extra, "declared_lifetime": declared, "lifetime": declared},
            )
        self._lifetime_clamped = clamped
        return max(declared, floor)

    def fetched(
        self,
        response: TokenResponse,
        lifetime: float,
        duration: float,
        refresh_in: float,
        recovered_after: int,
    ) -> None:
        """A token request succeeded: count it and log it."""
        self.fetches += 1
        self.last_fetch_time = self.last_success_time = self._wall_clock()
        self.last_fetch_duration = duration
        self._metrics.token_stats.fetched(self.upstream, duration)
        log.info(
            "token fetched for %s: expires in %.0f s (%s), refresh in %.0f s%s",
            self.upstream,
            lifetime,
            response.lifetime_source,
            refresh_in,
            _recovered(recovered_after),
            extra={
                "event": "token_fetch",
                "upstream": self.upstream,
                "outcome": "success",
                "duration_ms": round(duration * 1000, 1),
                "expires_in": round(lifetime, 1),
                "lifetime_source": response.lifetime_source,
                "refresh_in": round(refresh_in, 1),
                "recovered_after_failures": recovered_after,
            },
        )

    def taken_from_cache(self, remaining: float, refresh_in: float, recovered_after: int) -> None:
        """A token was taken from the fleet cache: log it."""
        self.last_success_time = self._wall_clock()
        log.info(
            "token for %s taken from the shared cache: expires in %.0f s, refresh in %.0f s%s",
            self.upstream,
            remaining,
            refresh_in,
            _recovered(recovered_after),
            extra={
                "event": "token_shared",
                "upstream": self.upstream,
                "expires_in": round(remaining, 1),
                "refresh_in": round(refresh_in, 1),
                "recovered_after_failures": recovered_after,
            },
        )

    def failed(self, error: TokenFetchError, duration: float) -> None:
        """A token request failed: count it (then `log_failure` once the retry is planned)."""
        self.consecutive_failures += 1
        self.failed_fetches += 1
        self.last_error = error
        self.last_fetch_time = self.last_error_time = self._wall_clock()
        self.last_fetch_duration = duration
        self._metrics.token_stats.failed(self.upstream, error.reason, duration)

    def log_failure(
        self, error: TokenFetchError, duration: float, retry_in: float, serving: bool
    ) -> None:
        log.log(
            logging.WARNING if serving else logging.ERROR,
            "token fetch for %s failed (%s): %s; %d consecutive failure(s), next attempt in "
            "%.1f s, %s",
            self.upstream,
            error.reason,
            error.message,
            self.consecutive_failures,
            retry_in,
            "still serving the cached token" if serving else "no valid token",
            extra={
                "event": "token_fetch",
                "upstream": self.upstream,
                "outcome": "failure",
                "reason": error.reason,
                "error": error.message,
                "duration_ms": round(duration * 1000, 1),
                "consecutive_failures": self.consecutive_failures,
                "retry_in": round(retry_in, 2),
                "serving_cached_token": serving,
            },
        )

    def fields(self) -> dict[str, object]:
        """The /status fields this record owns (JSON-safe)."""
        error = self.last_error
        return {
            "last_fetch_time": self.last_fetch_time,
            "last_success_time": self.last_success_time,
            "last_fetch_duration_seconds": _rounded(self.last_fetch_duration),
            "last_error": None
            if error is None
            else {"reason": error.reason, "message": error.message, "time": self.last_error_time},
            "consecutive_failures": self.consecutive_failures,
            "fetches": self.fetches,
            "failed_fetches": self.failed_fetches,
        }


def _recovered(failures: int) -> str:
    return f" (recovered after {failures} failures)" if failures else ""


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
