"""Replicas for the fleet token cache tests: token providers sharing one real Redis.

Each `Replica` is what one proxy process has: its own `Metrics`, its own Redis client
(so its own connections) and a `TokenProvider` with a `SharedSlot`, the way
`proxy.app.ProxyApp` wires them.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy.config import RedisConfig, Secret, TokenCacheConfig, TokenConfig
from proxy.ops.metrics import Metrics
from proxy.tokens import TokenProvider
from proxy.tokens.cache_crypto import CacheKeys
from proxy.tokens.redis_backend import CacheBackend
from proxy.tokens.shared_cache import SharedSlot

UPSTREAM = "inventory"
CLIENT_ID = "order-service"
SECRET = "s3cret-VALUE-41d7"


def write_key_file(path: Path) -> Path:
    """A key file as `openssl rand -base64 32 > path` makes it."""
    path.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    return path


def cache_config(url: str, key_file: Path, **changes: Any) -> TokenCacheConfig:
    redis = RedisConfig(url=url, **changes.pop("redis", {}))
    return TokenCacheConfig(redis=redis, encryption_key_file=key_file, **changes)


def token_config(token_url: str, **changes: Any) -> TokenConfig:
    base = TokenConfig(
        client_id=CLIENT_ID,
        token_url=token_url,
        client_secret=Secret(SECRET),
        timeout=5.0,
        retry_initial=0.2,
        retry_max=1.0,
    )
    return dataclasses.replace(base, **changes)


@dataclass
class Replica:
    provider: TokenProvider
    metrics: Metrics
    backend: CacheBackend | None
    slot: SharedSlot | None

    def sample(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def lookups(self, result: str) -> float:
        return self.sample(
            "token_proxy_token_cache_lookups_total", upstream=self.provider.upstream, result=result
        )

    def waits(self, outcome: str) -> float:
        return self.sample(
            "token_proxy_token_cache_lock_waits_total",
            upstream=self.provider.upstream,
            outcome=outcome,
        )

    def fetches(self) -> float:
        return self.sample(
            "token_proxy_token_fetches_total", upstream=self.provider.upstream, outcome="success"
        )

    async def close(self) -> None:
        await self.provider.close()
        if self.backend is not None:
            await self.backend.close()


def make_replica(
    token: TokenConfig,
    cache: TokenCacheConfig | None,
    *,
    upstream: str = UPSTREAM,
    wall_clock: Callable[[], float] = time.time,
    clock: Callable[[], float] = time.monotonic,
    rng: random.Random | None = None,
) -> Replica:
    metrics = Metrics()
    metrics.register_upstream(upstream)
    backend = slot = None
    if cache is not None and token.cache == "shared":
        backend = CacheBackend(cache, metrics, wall_clock=wall_clock)
        keys = CacheKeys.from_file(cache.encryption_key_file)
        slot = SharedSlot(backend, keys, upstream, token, metrics, clock=clock)
    provider = TokenProvider(
        upstream,
        token,
        metrics,
        clock=clock,
        wall_clock=wall_clock,
        rng=rng,
        shared=slot,
    )
    return Replica(provider, metrics, backend, slot)
