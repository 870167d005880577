"""The token families of every upstream, kept as plain numbers and exported at scrape time.

`TokenStats` is registered by `proxy.ops.metrics.Metrics` (``metrics.token_stats``);
the token provider's `FetchRecord` (`proxy.tokens.fetch_record`) updates it. A
prometheus-client child costs about a kilobyte (its lock and value objects), and a
proxy may have a thousand upstreams with a dozen token series each: here an upstream
is a few integers, and the scrape turns them into prometheus-client metric families
with the same names, labels and types.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from proxy.errors import TOKEN_FETCH_FAILURE_REASONS

__all__ = ["TOKEN_FETCH_BUCKETS", "TokenStats"]

# Token endpoints answer in tens of milliseconds when healthy; the upper buckets
# exist to show a struggling one before the client timeout (default 10 s) fires. An
# upstream fetches a token every few minutes at most, too few for fine quantiles, so
# five bounds (healthy, fine, slow, struggling, near the timeout) are all its series
# carry: with a thousand upstreams every bound is a thousand more lines per scrape.
TOKEN_FETCH_BUCKETS = (0.05, 0.25, 1.0, 2.5, 10.0)


def _no_value() -> float:
    return 0.0


class _UpstreamTokens:
    """The token numbers of one upstream."""

    __slots__ = ("buckets", "clamped", "expires_in", "expiry", "failures", "fetches", "seconds")

    def __init__(self) -> None:
        self.fetches = [0, 0]  # success, failure
        self.failures: dict[str, int] = dict.fromkeys(TOKEN_FETCH_FAILURE_REASONS, 0)
        self.buckets = [0] * (len(TOKEN_FETCH_BUCKETS) + 1)  # the last one is +Inf
        self.seconds = 0.0
        self.clamped = 0
        # Read at scrape time: seconds until the held token expires, its Unix expiry.
        self.expires_in: Callable[[], float] = _no_value
        self.expiry: Callable[[], float] = _no_value


class TokenStats(Collector):
    """The token families of every upstream, as plain numbers exported at scrape time:

    token_proxy_token_fetches_total, token_proxy_token_fetch_failures_total,
    token_proxy_token_fetch_duration_seconds, token_proxy_token_expiry_timestamp_seconds,
    token_proxy_token_expires_in_seconds and token_proxy_token_lifetime_clamped_total.
    Every series of a registered upstream exists (at 0) from its registration.
    """

    def __init__(self) -> None:
        self._upstreams: dict[str, _UpstreamTokens] = {}

    def register(self, upstream: str) -> None:
        if upstream not in self._upstreams:
            self._upstreams[upstream] = _UpstreamTokens()

    def forget(self, upstream: str) -> None:
        self._upstreams.pop(upstream, None)

    def _of(self, upstream: str) -> _UpstreamTokens:
        stats = self._upstreams.get(upstream)
        if stats is None:
            stats = self._upstreams[upstream] = _UpstreamTokens()
        return stats

    def watch(
        self, upstream: str, expires_in: Callable[[], float], expiry: Callable[[], float]
    ) -> None:
        """Read the held token's expiry through these functions at every scrape."""
        stats = self._of(upstream)
        stats.expires_in = expires_in
        stats.expiry = expiry

    def fetched(self, upstream: str, seconds: float) -> None:
        stats = self._of(upstream)
        stats.fetches[0] += 1
        self._observe(stats, seconds)

    def failed(self, upstream: str, reason: str, seconds: float) -> None:
        stats = self._of(upstream)
        stats.fetches[1] += 1
        stats.failures[reason] = stats.failures.get(reason, 0) + 1
        self._observe(stats, seconds)

    def lifetime_clamped(self, upstream: str) -> None:
        self._of(upstream).clamped += 1

    def _observe(self, stats: _UpstreamTokens, seconds: float) -> None:
        bucket = 0
        while bucket < len(TOKEN_FETCH_BUCKETS) and seconds > TOKEN_FETCH_BUCKETS[bucket]:
            bucket += 1
        stats.buckets[bucket] += 1
        stats.seconds += seconds

    def collect(self) -> Iterator[Metric]:
        upstreams = sorted(self._upstreams.items())
        fetches = CounterMetricFamily(
            "token_proxy_token_fetches",
            "Token requests made to the token endpoint, by outcome.",
            labels=["upstream", "outcome"],
        )
        failures = CounterMetricFamily(
            "token_proxy_token_fetch_failures",
            "Failed token requests, by reason.",
            labels=["upstream", "reason"],
        )
        duration = HistogramMetricFamily(
            "token_proxy_token_fetch_duration_seconds",
            "Duration of token requests.",
            labels=["upstream"],
        )
        expiry = GaugeMetricFamily(
            "token_proxy_token_expiry_timestamp_seconds",
            "Unix time at which the cached token expires (0 when there is none).",
            labels=["upstream"],
        )
        expires_in = GaugeMetricFamily(
            "token_proxy_token_expires_in_seconds",
            "Seconds until the cached token expires (0 when there is none or it expired).",
            labels=["upstream"],
        )
        clamped = CounterMetricFamily(
            "token_proxy_token_lifetime_clamped",
            "Tokens whose lifetime was raised to the shortest lifetime the proxy gives one.",
            labels=["upstream"],
        )
        bounds = [*[str(float(b)) for b in TOKEN_FETCH_BUCKETS], "+Inf"]
        for upstream, stats in upstreams:
            fetches.add_metric([upstream, "success"], stats.fetches[0])
            fetches.add_metric([upstream, "failure"], stats.fetches[1])
            for reason, count in stats.failures.items():
                failures.add_metric([upstream, reason], count)
            cumulative, total = [], 0
            for bound, count in zip(bounds, stats.buckets, strict=True):
                total += count
                cumulative.append((bound, total))
            duration.add_metric([upstream], cumulative, sum_value=stats.seconds)
            expiry.add_metric([upstream], stats.expiry())
            expires_in.add_metric([upstream], stats.expires_in())
            clamped.add_metric([upstream], stats.clamped)
        yield from (fetches, failures, duration, expiry, expires_in, clamped)

    def describe(self) -> Iterator[Metric]:
        # No samples here: registering must not read the numbers.
        yield CounterMetricFamily("token_proxy_token_fetches", "", labels=["upstream", "outcome"])
        yield CounterMetricFamily(
            "token_proxy_token_fetch_failures", "", labels=["upstream", "reason"]
        )
        yield HistogramMetricFamily(
            "token_proxy_token_fetch_duration_seconds", "", labels=["upstream"]
        )
        yield GaugeMetricFamily(
            "token_proxy_token_expiry_timestamp_seconds", "", labels=["upstream"]
        )
        yield GaugeMetricFamily("token_proxy_token_expires_in_seconds", "", labels=["upstream"])
        yield CounterMetricFamily("token_proxy_token_lifetime_clamped", "", labels=["upstream"])
