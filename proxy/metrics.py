"""Every Prometheus metric the proxy exports, defined in one place.

Naming scheme: ``token_proxy_<noun>_<verb>_<unit>``; counters end in ``_total``,
durations are in ``_seconds``. Label values are few and known: the upstream's
configured name (or ``unmatched``), a status code, an outcome or a failure reason,
never a raw host or path. Series for known label values are created by
`Metrics.register_upstream` at start-up so that failure series exist at 0 before
the first failure, which is what alert expressions such as ``increase()`` need.

A `Metrics` owns its `CollectorRegistry`, so tests build a fresh one each.
"""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from proxy import __version__
from proxy.errors import TOKEN_FETCH_FAILURE_REASONS

UNMATCHED = "unmatched"

# Token endpoints answer in tens of milliseconds when healthy; the upper buckets
# exist to show a struggling one before the client timeout (default 10 s) fires.
TOKEN_FETCH_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Proxied requests: from a loopback hop (~1 ms) to a slow upstream.
REQUEST_BUCKETS = (
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


class Metrics:
    """The proxy's metric families, registered in one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.build_info = Info("token_proxy_build", "Build information.", registry=r)
        self.build_info.info({"version": __version__})
        self.token_fetches = Counter(
            "token_proxy_token_fetches_total",
            "Token requests made to the token endpoint, by outcome.",
            ["upstream", "outcome"],
            registry=r,
        )
        self.token_fetch_failures = Counter(
            "token_proxy_token_fetch_failures_total",
            "Failed token requests, by reason.",
            ["upstream", "reason"],
            registry=r,
        )
        self.token_fetch_duration = Histogram(
            "token_proxy_token_fetch_duration_seconds",
            "Duration of token requests.",
            ["upstream"],
            buckets=TOKEN_FETCH_BUCKETS,
            registry=r,
        )
        self.token_expiry_timestamp = Gauge(
            "token_proxy_token_expiry_timestamp_seconds",
            "Unix time at which the cached token expires (0 when there is none).",
            ["upstream"],
            registry=r,
        )
        self.token_expires_in = Gauge(
            "token_proxy_token_expires_in_seconds",
            "Seconds until the cached token expires (0 when there is none or it expired).",
            ["upstream"],
            registry=r,
        )
        self.requests = Counter(
            "token_proxy_requests_total",
            "Requests handled, by upstream (or 'unmatched') and response status code.",
            ["upstream", "code"],
            registry=r,
        )
        self.request_duration = Histogram(
            "token_proxy_request_duration_seconds",
            "Time from a request's head arriving to its response head being sent.",
            ["upstream"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.upstream_unauthorized_retries = Counter(
            "token_proxy_upstream_unauthorized_retries_total",
            "Requests retried with a new token after the upstream answered 401.",
            ["upstream"],
            registry=r,
        )
        self.token_unavailable = Counter(
            "token_proxy_token_unavailable_total",
            "Requests answered 503 token_unavailable.",
            ["upstream"],
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
        self._request_children: dict[tuple[str, int], tuple[Counter, Histogram]] = {}
        self.register_upstream(UNMATCHED, token=False)

    def observe_request(self, upstream: str, status: int, seconds: float) -> None:
        """Count one answered request; children are cached because this runs per request."""
        key = (upstream, status)
        children = self._request_children.get(key)
        if children is None:
            children = (
                self.requests.labels(upstream=upstream, code=str(status)),
                self.request_duration.labels(upstream=upstream),
            )
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def register_upstream(self, name: str, *, token: bool = True) -> None:
        """Create the series of `name` so they exist (at 0) before anything happens."""
        self.request_duration.labels(upstream=name)
        if not token:
            return
        for outcome in ("success", "failure"):
            self.token_fetches.labels(upstream=name, outcome=outcome)
        for reason in TOKEN_FETCH_FAILURE_REASONS:
            self.token_fetch_failures.labels(upstream=name, reason=reason)
        self.token_fetch_duration.labels(upstream=name)
        self.token_expiry_timestamp.labels(upstream=name).set(0)
        self.token_expires_in.labels(upstream=name).set(0)
        self.upstream_unauthorized_retries.labels(upstream=name)
        self.token_unavailable.labels(upstream=name)

    def forget_upstream(self, name: str) -> None:
        """Drop the series of an upstream removed by a config reload."""
        for key in [key for key in self._request_children if key[0] == name]:
            del self._request_children[key]
            with contextlib.suppress(KeyError):
                self.requests.remove(name, str(key[1]))
        for family in (
            self.token_fetch_duration,
            self.token_expiry_timestamp,
            self.token_expires_in,
            self.upstream_unauthorized_retries,
            self.token_unavailable,
            self.request_duration,
        ):
            with contextlib.suppress(KeyError):
                family.remove(name)
        for outcome in ("success", "failure"):
            with contextlib.suppress(KeyError):
                self.token_fetches.remove(name, outcome)
        for reason in TOKEN_FETCH_FAILURE_REASONS:
            with contextlib.suppress(KeyError):
                self.token_fetch_failures.remove(name, reason)
