"""Instructions per request with and without the fleet token cache, in one run.

The request path reads the token a provider holds in memory and never touches Redis;
this measures it. Each variant drives the fast path exactly as `bench.instructions`
does (in-memory transports, no system call, on uvloop), with a real `TokenProvider`:

* ``local``: no cache; the provider fetched its token from a token endpoint served
  in-process (bench/token_endpoint.py);
* ``cache``: with ``token_cache`` on a local redis-server: one provider fetches and
  writes the token back, and the provider the requests use takes it from Redis (its
  `/status` says ``shared_cache``), with the cache's health task running.

valgrind's callgrind counts two runs of each (1,000 and 3,000 requests) and the
difference, divided by 2,000, is the per-request figure; the variants alternate.

    .venv/bin/python -m bench.cache_request_path

It measures whichever data path the tree holds (the first line says which). valgrind
and redis-server must be installed (`bench.prerequisites` installs them if missing).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import uvloop
from aiohttp import web

from bench.fleet import start_redis
from bench.instructions import bench_config, relay
from bench.prerequisites import ensure_commands
from bench.token_endpoint import TokenEndpoint
from proxy import data_path_build
from proxy.config import (
    RedisConfig,
    Secret,
    TokenCacheConfig,
    TokenConfig,
)
from proxy.ops.metrics import Metrics
from proxy.tokens import TokenProvider
from proxy.tokens.cache_crypto import CacheKeys
from proxy.tokens.redis_backend import CacheBackend
from proxy.tokens.shared_cache import SharedSlot

SECRET = "bench-cache-path-secret"
SHORT, LONG = 1_000, 3_000
REDIS_URL_ENV = "BENCH_REDIS_URL"
KEY_FILE_ENV = "BENCH_CACHE_KEY_FILE"


async def provider_for(variant: str, metrics: Metrics) -> tuple[TokenProvider, list[object]]:
    """A provider holding a valid token, fetched (local) or taken from Redis (cache)."""
    endpoint = TokenEndpoint(SECRET, 3600)
    runner = web.AppRunner(endpoint.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    token = TokenConfig(
        client_id="inventory",
        token_url=f"http://127.0.0.1:{port}/oauth/token",
        client_secret=Secret(SECRET),
    )
    cleanup: list[object] = [runner]
    if variant == "local":
        provider = TokenProvider("inventory", token, metrics)
        await provider.start()
        await provider.get()
        return provider, cleanup
    cache = TokenCacheConfig(RedisConfig(os.environ[REDIS_URL_ENV]), Path(os.environ[KEY_FILE_ENV]))
    keys = CacheKeys.from_file(cache.encryption_key_file)
    writer_metrics = Metrics()
    writer_backend = CacheBackend(cache, writer_metrics)
    writer = TokenProvider(
        "inventory",
        token,
        writer_metrics,
        shared=SharedSlot(writer_backend, keys, "inventory", token, writer_metrics),
    )
    await writer.start()
    await writer.get()
    backend = CacheBackend(cache, metrics)
    backend.start()
    metrics.enable_token_cache()
    provider = TokenProvider(
        "inventory", token, metrics, shared=SharedSlot(backend, keys, "inventory", token, metrics)
    )
    await provider.start()
    await provider.get()
    assert provider.status()["token_source"] == "shared_cache", provider.status()
    cleanup += [writer, writer_backend, backend]
    return provider, cleanup


async def drive(variant: str, requests: int) -> None:
    metrics = Metrics()
    metrics.register_upstream("inventory")
    provider, cleanup = await provider_for(variant, metrics)
    token = provider.current()
    assert token is not None
    relay(bench_config(), provider, "reverse", requests, token)
    await provider.close()
    for item in cleanup:
        if isinstance(item, web.AppRunner):
            await item.cleanup()
        else:
            await item.close()  # type: ignore[attr-defined]


def count(variant: str, requests: int, env: dict[str, str]) -> int:
    result = subprocess.run(
        [
            *("valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"),
            *(sys.executable, "-m", "bench.cache_request_path", "--drive", variant, str(requests)),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
        env={**os.environ, **env, "PYTHONHASHSEED": "0"},
    )
    collected = re.search(r"Collected : (\d+)", result.stderr)
    assert collected, result.stderr[-2000:]
    return int(collected.group(1))


async def with_redis(directory: Path) -> tuple[asyncio.subprocess.Process, str]:
    return await start_redis(directory)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cache_request_path", description=__doc__)
    parser.add_argument("--drive", nargs=2, metavar=("VARIANT", "REQUESTS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.drive:
        uvloop.run(drive(args.drive[0], int(args.drive[1])))
        return
    ensure_commands({"valgrind": "valgrind", "redis-server": "redis-server"})
    print(f"data path: {data_path_build()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="tp-cache-path-") as directory:
        workdir = Path(directory)
        key_file = workdir / "cache-key"
        key_file.write_text(base64.b64encode(secrets.token_bytes(32)).decode() + "\n")
        loop = asyncio.new_event_loop()
        redis_process, url = loop.run_until_complete(with_redis(workdir))
        env = {REDIS_URL_ENV: url, KEY_FILE_ENV: str(key_file)}
        try:
            results: dict[str, float] = {}
            for variant in ("local", "cache"):
                short = count(variant, SHORT, env)
                long = count(variant, LONG, env)
                results[variant] = (long - short) / (LONG - SHORT)
                print(
                    f"{variant:<6} {results[variant]:>9,.0f} instructions per request", flush=True
                )
            print(f"cache / local: {results['cache'] / results['local']:.4f}")
        finally:
            redis_process.terminate()
            loop.run_until_complete(redis_process.wait())
            loop.close()
            shutil.rmtree(workdir / "redis", ignore_errors=True)


if __name__ == "__main__":
    main()
