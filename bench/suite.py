"""`python -m bench`: the whole benchmark in one command, bounded in time.

Starts the `bench.stack` servers, then measures in this order (each load interleaved
across targets, round after round, so slow drifts of a shared machine hit every
target alike):

1. RSS of nginx and token-proxy idle, right after start;
2. throughput, latency and CPU per request at `--connections` (default 32);
3. latency at one connection, against a direct call to the origin;
   (2 and 3 also measure the bare reference proxy, `bench/bare_proxy.py`)
4. with `--plot`: throughput and latency at 1, 8, 32 and 128 connections;
5. RSS idle after the loads, then while 1,000 served keep-alive client connections
   sit idle;
6. a 1 GiB download and upload through each target;
7. the token requests each upstream made over the whole run.

Every process is stopped and the temporary directory removed on exit, error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import resource
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from bench import measure
from bench.measure import LoadSample
from bench.prerequisites import ensure_commands, ensure_matplotlib
from bench.processes import bounded_run, progress, stop_on_signals
from bench.procfs import CoreTimes, rss_bytes
from bench.report import Results, TokenEconomy, format_report, plot, to_json
from bench.stack import REPO_ROOT, Cores, Stack, Target
from proxy import data_path_build

GIB = 1024**3
QUICK_BIG_SIZE = 128 * 1024**2
TOKEN_LIFETIME = 30
REFRESH_BEFORE_EXPIRY = 10
# proxy.tokens.provider renews up to 5 % of the margin earlier still (REFRESH_JITTER_FRACTION).
REFRESH_JITTER_FRACTION = 0.05
SWEEP_CONNECTIONS = (1, 8, 32, 128)
PLOT_PATH = REPO_ROOT / "docs" / "img" / "throughput_latency.png"
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="token-proxy against nginx, on loopback."
    )
    parser.add_argument("--duration", type=float, help="seconds per load (default 8; quick 2)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3; quick 1)")
    parser.add_argument("--connections", type=int, default=32, help="for the main table")
    parser.add_argument(
        "--idle-connections", type=int, default=1000, help="held open for the RSS measurement"
    )
    parser.add_argument("--big-mib", type=int, help="large body size in MiB (default 1024)")
    parser.add_argument("--quick", action="store_true", help="a short smoke-test run")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write all results here")
    parser.add_argument(
        "--plot",
        action="store_true",
        help=f"sweep {SWEEP_CONNECTIONS} connections and draw {PLOT_PATH.relative_to(REPO_ROOT)}",
    )
    parser.add_argument("--plot-file", type=Path, default=PLOT_PATH, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.duration is None:
        args.duration = 2.0 if args.quick else 8.0
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    args.big_size = (
        args.big_mib * 1024**2 if args.big_mib else QUICK_BIG_SIZE if args.quick else GIB
    )
    if args.duration < 1 or args.rounds < 1 or args.connections < 1:
        parser.error("--duration, --rounds and --connections must be at least 1")
    return args


def machine_info() -> dict[str, str]:
    def version(package: str) -> str:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    cpu = "unknown"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    nginx = subprocess.run(["nginx", "-v"], capture_output=True, text=True, check=False)
    wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
    return {
        "commit": _commit(),
        "data_path": data_path_build(),
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "uvloop": version("uvloop"),
        "httptools": version("httptools"),
        "aiohttp": version("aiohttp"),
        "nginx": nginx.stderr.strip().removeprefix("nginx version: "),
        "wrk": (wrk.stdout + wrk.stderr).split("[")[0].strip(),
    }


def _commit() -> str:
    """The measured code's git commit, marked `-dirty` if proxy/ has local changes."""
    head = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    if head.returncode != 0:
        return "unknown"
    changes = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "proxy"],
        capture_output=True,
        text=True,
        check=False,
    )
    return head.stdout.strip() + ("-dirty" if changes.stdout.strip() else "")


def background_busy_percent(seconds: float = 1.0) -> float:
    """How busy the machine is before we start anything (other jobs on a shared machine)."""
    before = CoreTimes.now()
    time.sleep(seconds)
    shares = CoreTimes.now().busy_percent_since(before)
    return round(sum(shares.values()) / max(1, len(shares)))


def _raise_file_limit() -> None:
    # 1,000 idle connections need that many descriptors in the holder and the proxy.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 16384 if hard == resource.RLIM_INFINITY else min(hard, 16384)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def _progress(message: str) -> None:
    progress("bench", message)


class Run:
    """One benchmark run over a started `Stack`."""

    def __init__(self, args: argparse.Namespace, stack: Stack, workdir: Path) -> None:
        self.args = args
        self.stack = stack
        self.workdir = workdir
        self.cores = stack.cores
        self.load_targets = [stack.nginx(), stack.tp_reverse(), stack.tp_forward()]
        self.direct = stack.direct()
        # The bare reference runs in the throughput and latency rounds only.
        self.reference_targets = [self.load_targets[0], stack.bare(), *self.load_targets[1:]]

    def load(self, target: Target, connections: int, duration: float) -> LoadSample:
        return measure.load(
            target,
            connections=connections,
            duration=duration,
            workdir=self.workdir,
            cores=self.cores,
        )

    def measure_all(self, results: Results) -> None:
        results.rss_idle = self.rss()
        _progress("warming up")
        for target in [self.direct, *self.reference_targets]:
            self.load(target, self.args.connections, 1)
        self.throughput(results)
        self.latency(results)
        if self.args.plot:
            self.sweep(results)
        results.rss_after_load = self.rss()
        self.memory_with_connections(results)
        self.large_bodies(results)
        results.tokens = self.token_economy()
        results.requests_per_upstream = self.requests_per_upstream()

    def rss(self) -> dict[str, int]:
        nginx, tp_reverse, _ = self.load_targets
        return {"nginx": rss_bytes(nginx.pids), "token-proxy": rss_bytes(tp_reverse.pids)}

    def throughput(self, results: Results) -> None:
        rounds = self.args.rounds
        for round_number in range(1, rounds + 1):
            for target in self.reference_targets:
                sample = self.load(target, self.args.connections, self.args.duration)
                results.loads.setdefault(target.name, []).append(sample)
                _progress(
                    f"round {round_number}/{rounds} {target.name:<10} "
                    f"{sample.requests_per_second:>9,.0f} req/s  "
                    f"{sample.cpu_us_per_request or 0:.1f} µs CPU/req"
                )

    @property
    def short_duration(self) -> float:
        return max(1.0, float(self.args.duration) / 2)

    def latency(self, results: Results) -> None:
        rounds = self.args.rounds
        for round_number in range(1, rounds + 1):
            for target in [self.direct, *self.reference_targets]:
                sample = self.load(target, 1, self.short_duration)
                results.latency.setdefault(target.name, []).append(sample)
            _progress(f"1-connection latency round {round_number}/{rounds} done")

    def sweep(self, results: Results) -> None:
        for connections in SWEEP_CONNECTIONS:
            for target in self.load_targets:
                sample = self.load(target, connections, self.short_duration)
                results.sweep.setdefault(target.name, {})[connections] = sample
            _progress(f"sweep at {connections} connections done")

    def memory_with_connections(self, results: Results) -> None:
        count = self.args.idle_connections
        _progress(f"holding {count} idle connections")
        nginx, _, tp_forward = self.load_targets
        for target, label in ((nginx, "nginx"), (tp_forward, "token-proxy")):
            results.rss_connections[label] = measure.rss_with_idle_connections(
                target, count, self.stack.group, self.cores
            )

    def large_bodies(self, results: Results) -> None:
        rounds = self.args.rounds
        for round_number in range(1, rounds + 1):
            for target in [self.direct, *self.load_targets]:
                for direction in ("download", "upload"):
                    sample = measure.transfer(
                        target,
                        direction,
                        big_file=self.stack.big_file,
                        size=self.args.big_size,
                        cores=self.cores,
                    )
                    by_direction = results.transfers.setdefault(target.name, {})
                    by_direction.setdefault(direction, []).append(sample)
            _progress(f"large bodies round {round_number}/{rounds} done")

    def token_economy(self) -> TokenEconomy:
        with _NO_PROXY.open(self.stack.token_counts_url(), timeout=5) as response:
            fetches: dict[str, list[float]] = json.load(response)
        return TokenEconomy(
            lifetime=TOKEN_LIFETIME,
            refresh_before_expiry=REFRESH_BEFORE_EXPIRY,
            jitter_fraction=REFRESH_JITTER_FRACTION,
            fetches=fetches,
            until=time.time(),
        )

    def requests_per_upstream(self) -> dict[str, int]:
        url = f"http://127.0.0.1:{self.stack.proxy_admin_port}/metrics"
        with _NO_PROXY.open(url, timeout=5) as response:
            text = response.read().decode()
        counts: dict[str, int] = {}
        for family in text_string_to_metric_families(text):
            if family.name != "token_proxy_requests":
                continue
            for sample in family.samples:
                if sample.name == "token_proxy_requests_total":
                    upstream = sample.labels.get("upstream", "")
                    counts[upstream] = counts.get(upstream, 0) + int(sample.value)
        return counts


def run(args: argparse.Namespace, draw: Callable[[Results], None] | None) -> int:
    cores = Cores.for_machine()
    with bounded_run("bench") as bench_run:
        group, workdir = bench_run.group, bench_run.workdir
        big_file = workdir / "big.bin"
        with big_file.open("wb") as handle:
            handle.truncate(args.big_size)  # sparse: reads as zeros, costs no disk
        big_file.chmod(0o644)
        background = background_busy_percent()
        stack = Stack(group, workdir, cores, big_file, TOKEN_LIFETIME, REFRESH_BEFORE_EXPIRY)
        _progress(f"starting servers in {workdir}")
        stack.start()
        results = Results(
            machine=machine_info(),
            settings={
                "duration": args.duration,
                "rounds": args.rounds,
                "connections": args.connections,
                "idle_connections": args.idle_connections,
                "big_size": args.big_size,
                "pinning": cores.describe(),
                "background_busy_percent": background,
                "command": " ".join(["python -m bench", *sys.argv[1:]]),
            },
        )
        started = time.monotonic()
        Run(args, stack, workdir).measure_all(results)
        results.settings["elapsed_s"] = round(time.monotonic() - started)
        load_core = None if cores.load is None else int(cores.load)
        print(format_report(results, load_core), flush=True)
        if args.json is not None:
            args.json.write_text(json.dumps(to_json(results, load_core), indent=2))
            _progress(f"results written to {args.json}")
        if draw is not None:
            draw(results)
        return 0
    return bench_run.code


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop_on_signals()
    _raise_file_limit()
    ensure_commands()
    draw: Callable[[Results], None] | None = None
    if args.plot and ensure_matplotlib():

        def draw(results: Results) -> None:
            machine = results.machine
            title = (
                f"token-proxy vs nginx (1 worker), loopback, 1 KiB keep-alive GET; "
                f"{machine['nproc']} cores {machine['cpu']}, proxy pinned to one core"
            )
            plot(results.sweep, args.plot_file, title)
            _progress(f"plot written to {args.plot_file}")

    return run(args, draw)
