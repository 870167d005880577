"""The fleet scenario: token requests per credential with and without the token cache.

R replicas (1, 10 and 50 by default), each with its own Redis connection and a token
provider per upstream exactly as `proxy.app.ProxyApp` wires them, run for several token
lifetimes against a local token endpoint (bench/token_endpoint.py) that counts every
token request per client id. With `token_cache`, replicas share each credential's
token through a local redis-server (installed with apt-get when missing); without it,
each fetches its own. Everything listens on 127.0.0.1.

Lifetimes are compressed to seconds so that a run takes about a minute: the floor the
proxy puts under token lifetimes (10 s) is lowered in this process, which changes the
time scale and nothing else (the margin is still 20 % of the lifetime, the jitter 5 % of
the margin). Every loop is bounded in count and time.

    python -m bench.fleet                       # R = 1, 10, 50; 4 s tokens; 4 lifetimes
    python -m bench.fleet --replicas 1,10 --lifetime 6 --lifetimes 5 --upstreams 3

The request path does not change with the cache (it reads the token held in memory;
only the refresh task talks to Redis), so there is no request-path CPU to compare here.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import redis.asyncio as aioredis
from aiohttp import web

from bench.prerequisites import ensure_commands
from bench.token_endpoint import TokenEndpoint
from proxy.config import RedisConfig, Secret, TokenCacheConfig, TokenConfig
from proxy.ops.metrics import Metrics
from proxy.tokens import TokenProvider
from proxy.tokens import provider as provider_module
from proxy.tokens.cache_crypto import CacheKeys
from proxy.tokens.redis_backend import CacheBackend
from proxy.tokens.shared_cache import SharedSlot

SECRET = "bench-fleet-secret-value"
READY_WITHIN = 60.0
MAX_REPLICAS = 200
MAX_WINDOW = 600.0


@dataclass
class Replica:
    metrics: Metrics
    backend: CacheBackend | None
    providers: list[TokenProvider]

    def count(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    async def close(self) -> None:
        for provider in self.providers:
            await provider.close()
        if self.backend is not None:
            await self.backend.close()


@dataclass
class Result:
    replicas: int
    cached: bool
    requests_per_upstream: float
    hits: float
    waits: float
    ready_seconds: float


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def start_redis(directory: Path) -> tuple[asyncio.subprocess.Process, str]:
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        *[
            shutil.which("redis-server") or "redis-server",
            *("--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"),
            *("--dir", str(directory), "--logfile", str(directory / "redis.log")),
        ],
        stdin=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = aioredis.Redis.from_url(url, socket_timeout=1)
    deadline = time.monotonic() + 10
    try:
        while True:
            try:
                if await client.ping():
                    return process, url
            except (aioredis.RedisError, OSError):
                pass
            if time.monotonic() > deadline or process.returncode is not None:
                raise SystemExit("bench: redis-server did not start")
            await asyncio.sleep(0.05)
    finally:
        await client.aclose()


def make_replica(
    token_url: str, upstreams: int, cache: TokenCacheConfig | None, keys: CacheKeys | None
) -> Replica:
    metrics = Metrics()
    backend = CacheBackend(cache, metrics) if cache is not None else None
    providers = []
    for index in range(upstreams):
        name = f"upstream-{index}"
        metrics.register_upstream(name)
        token = TokenConfig(
            client_id=name,
            token_url=token_url,
            client_secret=Secret(SECRET),
            timeout=5.0,
            retry_initial=0.2,
            retry_max=1.0,
        )
        slot = None
        if backend is not None and keys is not None:
            slot = SharedSlot(backend, keys, name, token, metrics)
        providers.append(TokenProvider(name, token, metrics, shared=slot))
    return Replica(metrics, backend, providers)


async def scenario(
    endpoint: TokenEndpoint,
    token_url: str,
    replicas: int,
    upstreams: int,
    window: float,
    cache: TokenCacheConfig | None,
) -> Result:
    endpoint.fetches.clear()
    keys = None
    if cache is not None:
        keys = CacheKeys.from_file(cache.encryption_key_file)
        client = aioredis.Redis.from_url(cache.redis.url, socket_timeout=5)
        await client.flushall()
        await client.aclose()
    fleet = [make_replica(token_url, upstreams, cache, keys) for _ in range(replicas)]
    started = time.monotonic()
    try:
        for replica in fleet:
            for provider in replica.providers:
                await provider.start()
        while not all(p.is_valid() for r in fleet for p in r.providers):
            if time.monotonic() - started > READY_WITHIN:
                raise SystemExit("bench: replicas not ready in time")
            await asyncio.sleep(0.01)
        ready = time.monotonic() - started
        # The measurement window: the providers refresh on their own meanwhile.
        await asyncio.sleep(max(0.0, window - ready))
        requests = sum(len(times) for times in endpoint.fetches.values())
        hits = waits = 0.0
        for replica in fleet:
            for index in range(upstreams):
                name = f"upstream-{index}"
                hits += replica.count(
                    "token_proxy_token_cache_lookups_total", upstream=name, result="hit"
                )
                waits += replica.count(
                    "token_proxy_token_cache_lock_waits_total", upstream=name, outcome="entry"
                )
    finally:
        for replica in fleet:
            await replica.close()
    return Result(replicas, cache is not None, requests / upstreams, hits, waits, ready)


async def run(arguments: argparse.Namespace) -> list[Result]:
    counts = [int(part) for part in arguments.replicas.split(",")]
    if any(not 1 <= count <= MAX_REPLICAS for count in counts):
        raise SystemExit(f"bench: replicas must be between 1 and {MAX_REPLICAS}")
    window = arguments.lifetime * arguments.lifetimes
    if window > MAX_WINDOW:
        raise SystemExit(f"bench: a window of {window:.0f} s is longer than {MAX_WINDOW:.0f} s")
    ensure_commands({"redis-server": "redis-server"})
    # Second-long tokens, to see several lifetimes in a minute (see the docstring).
    provider_module.MIN_LIFETIME = min(provider_module.MIN_LIFETIME, arguments.lifetime / 2)

    endpoint = TokenEndpoint(SECRET, arguments.lifetime)
    runner = web.AppRunner(endpoint.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    token_url = f"http://127.0.0.1:{port}/oauth/token"

    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as scratch:
        directory = Path(scratch)
        redis_process, redis_url = await start_redis(directory)
        key_file = directory / "cache-key"
        key_file.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
        cache = TokenCacheConfig(redis=RedisConfig(url=redis_url), encryption_key_file=key_file)
        try:
            for count in counts:
                for cached in (False, True):
                    result = await scenario(
                        endpoint,
                        token_url,
                        count,
                        arguments.upstreams,
                        window,
                        cache if cached else None,
                    )
                    results.append(result)
                    print(
                        f"bench: R={count:<3} cache={'on' if cached else 'off'}: "
                        f"{result.requests_per_upstream:.0f} token requests per upstream",
                        file=sys.stderr,
                        flush=True,
                    )
        finally:
            redis_process.kill()
            await asyncio.wait_for(redis_process.wait(), 10)
            await runner.cleanup()
    return results


def report(results: list[Result], arguments: argparse.Namespace) -> str:
    baseline = next(
        (r.requests_per_upstream for r in results if r.replicas == 1 and not r.cached), None
    )
    if baseline is None:
        # Without an R = 1 run, what one process needs in the window: the first token and
        # one renewal per refresh interval (80 % of a lifetime).
        baseline = 1 + arguments.lifetimes / 0.8
    lines = [
        f"Fleet token cache: {arguments.upstreams} upstreams, {arguments.lifetime:g} s tokens, "
        f"a window of {arguments.lifetimes} lifetimes "
        f"({arguments.lifetime * arguments.lifetimes:g} s); one replica alone needs "
        f"{baseline:.0f} token requests per upstream in it.",
        "",
        "| replicas | cache | token requests per upstream | per replica's need "
        "| shared hits + waits | ready in |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.replicas} | {'on' if r.cached else 'off'} | {r.requests_per_upstream:.0f} "
            f"| {r.requests_per_upstream / baseline:.2f} | {r.hits + r.waits:.0f} "
            f"| {r.ready_seconds:.2f} s |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__)
    parser.add_argument("--replicas", default="1,10,50", help="comma-separated replica counts")
    parser.add_argument("--upstreams", type=int, default=2, help="upstreams per replica")
    parser.add_argument("--lifetime", type=float, default=4.0, help="token lifetime (s)")
    parser.add_argument("--lifetimes", type=int, default=4, help="window, in lifetimes")
    arguments = parser.parse_args()
    if not 1 <= arguments.upstreams <= 20 or not 1 <= arguments.lifetimes <= 50:
        raise SystemExit("bench: 1-20 upstreams and 1-50 lifetimes")
    results = asyncio.run(run(arguments))
    print(report(results, arguments))


if __name__ == "__main__":
    main()
