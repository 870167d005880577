"""Many upstreams in one process: start-up, token endpoint load, memory and /metrics.

Starts `python -m proxy run` (what `token-proxy run` runs) with N upstreams (1,000 by
default), each with its own client id, all on one token endpoint served by this
process on 127.0.0.1. The endpoint answers after `--token-delay` (a real one takes tens
of milliseconds) and counts the token requests in flight at once. Reported:

* time to ready: from the start of the process until `/readyz` answers 200;
* token requests: how many, the peak in flight at once (never above
  `token_endpoint_concurrency`), and the time from the first to the last;
* RSS of the proxy once ready, and its peak (VmHWM);
* `/metrics`: lines and bytes.

    .venv/bin/python -m bench.many_upstreams                   # 1,000 upstreams
    .venv/bin/python -m bench.many_upstreams --upstreams 200 --concurrency 4

Everything listens on loopback; the proxy is stopped on exit, error or Ctrl-C, and
every wait is bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml
from aiohttp import web

from bench.processes import ProcessGroup, free_port
from bench.procfs import rss_bytes

READY_WITHIN = 60.0
MAX_UPSTREAMS = 20_000
MIB = 1024 * 1024
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class CountingEndpoint:
    """A token endpoint that records how many token requests are in flight at once."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.in_flight = 0
        self.peak = 0
        self.arrivals: list[float] = []

    async def token(self, request: web.Request) -> web.Response:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        self.arrivals.append(time.monotonic())
        try:
            await request.post()
            await asyncio.sleep(self.delay)  # the endpoint's own latency
            return web.json_response(
                {
                    "access_token": secrets.token_urlsafe(24),
                    "token_type": "Bearer",
                    "expires_in": 3600,
                },
                headers={"Cache-Control": "no-store"},
            )
        finally:
            self.in_flight -= 1


def proxy_config(upstreams: int, token_url: str, concurrency: int, admin_port: int) -> dict:  # type: ignore[type-arg]
    return {
        "listen": f"127.0.0.1:{free_port()}",
        "admin_listen": f"127.0.0.1:{admin_port}",
        "log_level": "warning",
        "token_endpoint_concurrency": concurrency,
        "upstreams": {
            f"api-{index}": {
                "match": {"hosts": [f"api-{index}.bench"]},
                "token": {
                    "token_url": token_url,
                    "client_id": f"client-{index}",
                    "client_secret": "${BENCH_CLIENT_SECRET}",
                },
            }
            for index in range(upstreams)
        },
    }


def get(url: str) -> tuple[int, bytes]:
    try:
        with _NO_PROXY.open(url, timeout=2.0) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, b""
    except OSError:
        return 0, b""


def peak_rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


async def measure(arguments: argparse.Namespace, workdir: Path) -> dict[str, float]:
    endpoint = CountingEndpoint(arguments.token_delay)
    app = web.Application()
    app.add_routes([web.post("/oauth/token", endpoint.token)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    token_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", token_port).start()
    admin_port = free_port()
    config = proxy_config(
        arguments.upstreams,
        f"http://127.0.0.1:{token_port}/oauth/token",
        arguments.concurrency,
        admin_port,
    )
    config_file = workdir / "token-proxy.yaml"
    config_file.write_text(yaml.safe_dump(config))
    group = ProcessGroup(workdir)
    try:
        started = time.monotonic()
        process = group.start(
            "token-proxy",
            [sys.executable, "-m", "proxy", "run", "--config", str(config_file)],
            env={"BENCH_CLIENT_SECRET": secrets.token_urlsafe(16)},
        )
        ready_at = None
        while time.monotonic() - started < READY_WITHIN:
            group.check_running("token-proxy", process)
            status, _ = await asyncio.to_thread(get, f"http://127.0.0.1:{admin_port}/readyz")
            if status == 200:
                ready_at = time.monotonic()
                break
            await asyncio.sleep(0.02)
        if ready_at is None:
            raise TimeoutError(f"not ready in {READY_WITHIN} s:\n{group.log_tail('token-proxy')}")
        rss = rss_bytes([process.pid])
        peak_rss = peak_rss_bytes(process.pid)
        _, metrics = await asyncio.to_thread(get, f"http://127.0.0.1:{admin_port}/metrics")
        arrivals = endpoint.arrivals
        return {
            "upstreams": arguments.upstreams,
            "concurrency": arguments.concurrency,
            "ready_seconds": ready_at - started,
            "token_requests": len(arrivals),
            "token_requests_spread_seconds": (arrivals[-1] - arrivals[0]) if arrivals else 0.0,
            "peak_concurrent_fetches": endpoint.peak,
            "rss_mib": rss / MIB,
            "peak_rss_mib": peak_rss / MIB,
            "metrics_lines": metrics.count(b"\n"),
            "metrics_bytes": len(metrics),
        }
    finally:
        group.stop_all()
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.many_upstreams", description=__doc__)
    parser.add_argument("--upstreams", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=8, help="token_endpoint_concurrency")
    parser.add_argument(
        "--token-delay", type=float, default=0.02, help="seconds the endpoint takes per answer"
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    arguments = parser.parse_args(argv)
    if not 1 <= arguments.upstreams <= MAX_UPSTREAMS:
        parser.error(f"--upstreams must be within 1..{MAX_UPSTREAMS}")
    with tempfile.TemporaryDirectory(prefix="tp-many-") as directory:
        result = asyncio.run(measure(arguments, Path(directory)))
    if arguments.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"token-proxy with {result['upstreams']} upstreams on one token endpoint")
    print(f"  time to ready                {result['ready_seconds']:8.2f} s")
    print(
        f"  token requests               {result['token_requests']:8d}"
        f"  (first to last {result['token_requests_spread_seconds']:.2f} s)"
    )
    print(
        f"  peak concurrent fetches      {result['peak_concurrent_fetches']:8d}"
        f"  (token_endpoint_concurrency {result['concurrency']})"
    )
    print(f"  RSS when ready               {result['rss_mib']:8.1f} MiB")
    print(f"  peak RSS                     {result['peak_rss_mib']:8.1f} MiB")
    print(
        f"  /metrics                     {result['metrics_lines']:8d} lines, "
        f"{result['metrics_bytes'] / 1024:.0f} KiB"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
