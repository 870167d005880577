"""Every Prometheus metric the proxy exports, defined in one place.

Naming scheme: ``token_proxy_<noun>_<verb>_<unit>``; counters end in ``_total``,
durations are in ``_seconds``. Label values are few and known: the upstream's
configured name (or ``unmatched``), a status code, an outcome or a failure reason,
never a raw host or path. Series for known label values are created by
`Metrics.register_upstream` at start-up so that failure series exist at 0 before
the first failure, which is what alert expressions such as ``increase()`` need.

A `Metrics` owns its `CollectorRegistry`, so tests build a fresh one each. No metric has
a `*_created` series. The families updated per request (`RequestStats`, here) and the
token families (`TokenStats`, in `proxy.ops.token_metrics`) are plain numbers per
upstream turned into metric families at scrape time: cheap to update, and small when
there are many upstreams.

The fleet token cache's families (``token_proxy_token_cache_*``) are registered only by
`Metrics.enable_token_cache`, when a ``token_cache`` is configured: a proxy without one
exports none of them (and no ``token_proxy_token_cache_up`` of 0 to alert on).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Info,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy import __version__, data_path_build
from proxy.ops.token_metrics import TokenStats

# The fleet token cache's label values (see proxy/tokens/shared_cache.py).
TOKEN_CACHE_LOOKUP_RESULTS: Final = ("hit", "miss", "error")
TOKEN_CACHE_WAIT_OUTCOMES: Final = ("entry", "acquired", "timeout", "error")
# Who asked for a DPoP nonce (RFC 9449 §8, §9).
DPOP_NONCE_SERVERS: Final = ("authorization", "resource")
TOKEN_CACHE_REJECT_REASONS: Final = ("undecryptable", "malformed")
TOKEN_CACHE_ERROR_REASONS: Final = (
    "auth",
    "out_of_memory",
    "read_only",
    "cluster_redirect",
    "timeout",
    "error_reply",
    "unreachable",
)

# The grpc_status label values of token_proxy_grpc_responses_total.
GRPC_STATUS_LABELS: Final = (*(str(code) for code in range(17)), "other")

UNMATCHED: Final = "unmatched"

# prometheus-client adds a `*_created` timestamp series beside every counter and
# histogram: twice the series per upstream, which no dashboard or alert reads.
disable_created_metrics()  # type: ignore[no-untyped-call]

# Proxied requests: from a loopback hop (~1 ms) to a slow upstream.
REQUEST_BUCKETS: Final[tuple[float, ...]] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
_BOUNDS: Final = len(REQUEST_BUCKETS)
_STATUS_CODES: Final = 1000  # request counts are kept per three-digit status code


class Metrics:
    """The proxy's metric families, registered in one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.build_info = Info("token_proxy_build", "Build information.", registry=r)
        self.build_info.info({"version": __version__, "data_path": data_path_build()})
        # The token families: plain numbers per upstream, exported at scrape time (a
        # prometheus-client child costs about a kilobyte, and there are many upstreams).
        self.token_stats = TokenStats()
        r.register(self.token_stats)
        # Counted per request on the hot path: plain integers, exported at scrape time.
        self.request_stats = RequestStats()
        r.register(self.request_stats)
        self.upstream_unauthorized_retries = Counter(
            "token_proxy_upstream_unauthorized_retries_total",
            "Requests retried with a new token after the upstream answered 401 "
            "(or another of its purge_on_status).",
            ["upstream"],
            registry=r,
        )
        self.token_unavailable = Counter(
            "token_proxy_token_unavailable_total",
            "Requests answered 503 token_unavailable.",
            ["upstream"],
            registry=r,
        )
        self.dpop_nonce_retries = Counter(
            "token_proxy_dpop_nonce_retries_total",
            "Requests sent again with a DPoP proof carrying the nonce the server asked for, "
            "by server (authorization: token requests; resource: the upstream).",
            ["upstream", "server"],
            registry=r,
        )
        # Label values: the 17 gRPC status codes ("0".."16") and "other"; a series is
        # created when its status is first seen (17 per upstream up front is too many).
        self.grpc_responses = Counter(
            "token_proxy_grpc_responses_total",
            "gRPC calls answered over HTTP/2, by upstream and grpc-status (from the "
            "upstream's trailers, or the proxy's own answer).",
            ["upstream", "grpc_status"],
            registry=r,
        )
        self.tunnels = Counter(
            "token_proxy_tunnels_total",
            "CONNECT requests, by upstream (or 'unmatched') and outcome.",
            ["upstream", "outcome"],
            registry=r,
        )
        self.open_connections = Gauge(
            "token_proxy_client_connections",
            "Client connections currently open on the proxy's listeners.",
            registry=r,
        )
        self.config_reloads = Counter(
            "token_proxy_config_reloads_total",
            "Configuration reloads, by outcome.",
            ["outcome"],
            registry=r,
        )
        for outcome in ("success", "failure"):
            self.config_reloads.labels(outcome=outcome)
        # The fleet token cache: registered by enable_token_cache() only.
        self.token_cache_enabled = False
        self.token_cache_up = Gauge(
            "token_proxy_token_cache_up",
            "1 while the shared token cache (Redis) answers, 0 while tokens are fetched "
            "without it.",
            registry=None,
        )
        self.token_cache_lookups = Counter(
            "token_proxy_token_cache_lookups_total",
            "Reads of the shared token cache before a token request, by result (hit, miss, error).",
            ["upstream", "result"],
            registry=None,
        )
        self.token_cache_lock_waits = Counter(
            "token_proxy_token_cache_lock_waits_total",
            "Waits for another replica's token request, by outcome (entry: its token "
            "arrived; acquired: its lock expired and this replica took it; timeout: "
            "lock_timeout passed; error: the cache failed meanwhile).",
            ["upstream", "outcome"],
            registry=None,
        )
        self.token_cache_write_failures = Counter(
            "token_proxy_token_cache_write_failures_total",
            "Fetched tokens that could not be written to the shared token cache.",
            ["upstream"],
            registry=None,
        )
        self.token_cache_rejected_entries = Counter(
            "token_proxy_token_cache_rejected_entries_total",
            "Shared cache entries ignored because they did not decrypt (another key, "
            "tampering) or did not parse.",
            ["reason"],
            registry=None,
        )
        self.token_cache_errors = Counter(
            "token_proxy_token_cache_errors_total",
            "Failed operations on the shared token cache, by reason.",
            ["reason"],
            registry=None,
        )
        self.register_upstream(UNMATCHED, token=False)

    def enable_token_cache(self) -> None:
        """Register the token cache's families (once), with their process-level series."""
        if self.token_cache_enabled:
            return
        self.token_cache_enabled = True
        for family in (
            self.token_cache_up,
            self.token_cache_lookups,
            self.token_cache_lock_waits,
            self.token_cache_write_failures,
            self.token_cache_rejected_entries,
            self.token_cache_errors,
        ):
            self.registry.register(family)
        self.token_cache_up.set(0)
        for reason in TOKEN_CACHE_REJECT_REASONS:
            self.token_cache_rejected_entries.labels(reason=reason)
        for reason in TOKEN_CACHE_ERROR_REASONS:
            self.token_cache_errors.labels(reason=reason)

    def register_cache_upstream(self, name: str) -> None:
        """Create the token cache series of an upstream that shares its token."""
        for result in TOKEN_CACHE_LOOKUP_RESULTS:
            self.token_cache_lookups.labels(upstream=name, result=result)
        for outcome in TOKEN_CACHE_WAIT_OUTCOMES:
            self.token_cache_lock_waits.labels(upstream=name, outcome=outcome)
        self.token_cache_write_failures.labels(upstream=name)

    def observe_request(self, upstream: str, status: int, seconds: float) -> None:
        """Count one answered request (token_proxy_requests_total and its duration)."""
        self.request_stats.observe(upstream, status, seconds)

    def register_upstream(self, name: str, *, token: bool = True) -> None:
        """Create the series of `name` so they exist (at 0) before anything happens."""
        self.request_stats.register(name)
        if not token:
            return
        self.token_stats.register(name)
        self.upstream_unauthorized_retries.labels(upstream=name)
        self.token_unavailable.labels(upstream=name)

    def forget_upstream(self, name: str) -> None:
        """Drop the series of an upstream removed by a config reload."""
        self.request_stats.forget(name)
        self.token_stats.forget(name)
        for family in (self.upstream_unauthorized_retries, self.token_unavailable):
            with contextlib.suppress(KeyError):
                family.remove(name)
        with contextlib.suppress(KeyError):
            self.token_cache_write_failures.remove(name)
        for server in DPOP_NONCE_SERVERS:
            with contextlib.suppress(KeyError):
                self.dpop_nonce_retries.remove(name, server)
        for grpc_status in GRPC_STATUS_LABELS:
            with contextlib.suppress(KeyError):
                self.grpc_responses.remove(name, grpc_status)
        for result in TOKEN_CACHE_LOOKUP_RESULTS:
            with contextlib.suppress(KeyError):
                self.token_cache_lookups.remove(name, result)
        for outcome in TOKEN_CACHE_WAIT_OUTCOMES:
            with contextlib.suppress(KeyError):
                self.token_cache_lock_waits.remove(name, outcome)


class _UpstreamRequests:
    """The request counts of one upstream: by status code, by duration bucket, and the sum."""

    __slots__ = ("buckets", "by_status", "seconds")

    def __init__(self) -> None:
        # Indexed by the status code itself: a list index, not a dict lookup per request.
        self.by_status = [0] * _STATUS_CODES
        self.buckets = [0] * (len(REQUEST_BUCKETS) + 1)  # the last one is +Inf
        self.seconds = 0.0


class RequestStats(Collector):
    """token_proxy_requests_total and token_proxy_request_duration_seconds.

    These two are updated for every proxied request, where prometheus-client's own
    Counter and Histogram take a lock per update and walk the buckets in Python. Here
    an update is a few dictionary and list operations on the event loop's thread; the
    scrape (on the same loop) turns them into prometheus-client metric families.
    """

    def __init__(self) -> None:
        # Counts are allocated at an upstream's first request (8 KiB each): a proxy with
        # a thousand upstreams, most of them rarely used, does not carry them all.
        self._upstreams: dict[str, _UpstreamRequests] = {}
        self._registered: set[str] = set()

    def register(self, upstream: str) -> None:
        self._registered.add(upstream)

    def forget(self, upstream: str) -> None:
        self._registered.discard(upstream)
        self._upstreams.pop(upstream, None)

    def observe(self, upstream: str, status: int, seconds: float) -> None:
        stats = self._upstreams.get(upstream)
        if stats is None:
            stats = self._upstreams[upstream] = _UpstreamRequests()
        if 0 <= status < _STATUS_CODES:
            stats.by_status[status] += 1
        # The first bucket whose bound is not below `seconds`; most requests take the first.
        bucket = 0
        while bucket < _BOUNDS and seconds > REQUEST_BUCKETS[bucket]:
            bucket += 1
        stats.buckets[bucket] += 1
        stats.seconds += seconds

    def collect(self) -> Iterator[Metric]:
        upstreams = sorted(self._registered.union(self._upstreams))
        requests = CounterMetricFamily(
            "token_proxy_requests",
            "Requests handled, by upstream (or 'unmatched') and response status code.",
            labels=["upstream", "code"],
        )
        for upstream in upstreams:
            stats = self._upstreams.get(upstream)
            if stats is None:
                continue
            for status, count in enumerate(stats.by_status):
                if count:
                    requests.add_metric([upstream, str(status)], count)
        yield requests
        duration = HistogramMetricFamily(
            "token_proxy_request_duration_seconds",
            "Time from a request's head arriving to its response head being sent.",
            labels=["upstream"],
        )
        bounds = [*[str(float(b)) for b in REQUEST_BUCKETS], "+Inf"]
        empty = [(bound, 0) for bound in bounds]
        for upstream in upstreams:
            stats = self._upstreams.get(upstream)
            if stats is None:
                duration.add_metric([upstream], empty, sum_value=0.0)
                continue
            cumulative, total = [], 0
            for bound, count in zip(bounds, stats.buckets, strict=True):
                total += count
                cumulative.append((bound, total))
            duration.add_metric([upstream], cumulative, sum_value=stats.seconds)
        yield duration

    def describe(self) -> Iterator[Metric]:
        # No samples here: registering must not read the counts (they start empty).
        yield CounterMetricFamily("token_proxy_requests", "", labels=["upstream", "code"])
        yield HistogramMetricFamily("token_proxy_request_duration_seconds", "", labels=["upstream"])
