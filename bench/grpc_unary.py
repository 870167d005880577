"""gRPC unary calls through token-proxy against nginx's `grpc_pass`, in one run.

Both proxies take cleartext HTTP/2 with prior knowledge (h2c), add the
`authorization` field and pass the call to the same upstream: a grpcio (asyncio)
server that echoes the request message and answers UNAUTHENTICATED to a call without
`authorization: Bearer ...`, so a proxy that forgot the token shows up as errors, not
as fast numbers. nginx adds a static token (`grpc_set_header`); token-proxy its
upstream's token, on the upstream's reverse `listen` port.

The load generator is the same for both: a grpcio asyncio client in a process of its
own (`--load`), one channel, `--concurrency` calls in flight, each call bounded by a
deadline, the whole load by `--duration` and `--max-calls`. It reports calls, failures
by status and latency percentiles; the harness reads the CPU time the proxy process
spent (/proc) and reports calls per second and CPU per call. Loads alternate between
the two proxies round after round, and the ratios to nginx are medians of per-round
ratios, as in `python -m bench`.

    .venv/bin/python -m bench.grpc_unary                 # 3 rounds of 5 s, 32 in flight
    .venv/bin/python -m bench.grpc_unary --quick         # 1 round of 2 s

Cores as in `bench.stack`: each proxy on the first core, the load generator, upstream
and token endpoint on the others. nginx (and taskset) are installed with apt-get when
missing. Every process is stopped on exit, error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import struct
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from bench import nginx
from bench.prerequisites import ensure_commands
from bench.processes import (
    ProcessGroup,
    bounded_run,
    free_port,
    progress,
    run_child,
    stop_on_signals,
)
from bench.procfs import cpu_seconds, descendants
from bench.report import median, paired_ratio
from bench.stack import (
    REPO_ROOT,
    Cores,
    bench_upstream,
    start_grpc_upstream,
    start_token_endpoint,
    start_token_proxy,
    token_proxy_config,
)
from bench.suite import background_busy_percent

SERVICE = "bench.Echo"
METHOD = f"/{SERVICE}/Unary"
PAYLOAD = b"p" * 128
CALL_DEADLINE = 5.0
READY_TIMEOUT = 20.0
ORIGIN_SIDE = "grpcio upstream and token endpoint"
TOKEN_LIFETIME = 300
# A load that has not finished this long after its duration is stuck, not slow.
LOAD_GRACE = 30.0
RESULT_MARK = "GRPC-RESULT"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_SETTINGS, _GOAWAY = 0x4, 0x7
_HTTP_1_1_REQUIRED = 0xD


# -- the upstream and the load generator (child processes) ------------------------------


def serve(port: int) -> None:
    """The upstream: echo the message of a call that carries a bearer token."""
    import grpc

    async def unary(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        for key, value in context.invocation_metadata() or ():
            if key == "authorization" and str(value).startswith("Bearer "):
                return request
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "no bearer token")
        raise AssertionError("abort returns only by raising")

    async def run() -> None:
        server = grpc.aio.server(options=[("grpc.max_concurrent_streams", 1024)])
        handler = grpc.method_handlers_generic_handler(
            SERVICE, {"Unary": grpc.unary_unary_rpc_method_handler(unary)}
        )
        server.add_generic_rpc_handlers((handler,))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(run())


@dataclass(frozen=True)
class LoadResult:
    """One load against one port, as the load generator saw it."""

    calls: int
    failures: dict[str, int]
    seconds: float
    p50_us: float
    p99_us: float
    # CPU time of the load generator itself over the load.
    client_cpu_seconds: float

    @property
    def calls_per_second(self) -> float:
        return self.calls / self.seconds if self.seconds else 0.0


def load(port: int, concurrency: int, duration: float, max_calls: int) -> LoadResult:
    """`concurrency` unary calls in flight on one channel until `duration` or `max_calls`."""
    import grpc

    async def run() -> LoadResult:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await asyncio.wait_for(channel.channel_ready(), READY_TIMEOUT)
            call = channel.unary_unary(METHOD)
            latencies: list[float] = []
            failures: Counter[str] = Counter()
            issued = 0
            loop = asyncio.get_running_loop()
            stop_at = loop.time() + duration

            async def worker() -> None:
                nonlocal issued
                while issued < max_calls and loop.time() < stop_at:
                    issued += 1
                    started = time.perf_counter()
                    try:
                        reply = await call(PAYLOAD, timeout=CALL_DEADLINE)
                    except grpc.aio.AioRpcError as error:
                        failures[error.code().name] += 1
                        continue
                    if reply != PAYLOAD:
                        failures["WRONG_REPLY"] += 1
                        continue
                    latencies.append(time.perf_counter() - started)

            started = time.perf_counter()
            cpu_started = time.process_time()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            seconds = time.perf_counter() - started
            client_cpu = time.process_time() - cpu_started
        ordered = sorted(latencies) or [float("nan")]
        return LoadResult(
            calls=len(latencies),
            failures=dict(failures),
            seconds=seconds,
            p50_us=1e6 * ordered[len(ordered) // 2],
            p99_us=1e6 * ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
            client_cpu_seconds=client_cpu,
        )

    return asyncio.run(run())


# -- the harness ----------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One load through one proxy, with the CPU the proxy process spent."""

    target: str
    result: LoadResult
    cpu_us_per_call: float
    proxy_cpu_percent: float
    # What the same load cost the shared parts: a proxy that makes them work harder
    # (more frames, more writes) shows here rather than in its own CPU.
    client_cpu_us_per_call: float
    upstream_cpu_us_per_call: float


@dataclass(frozen=True)
class Target:
    name: str
    port: int
    pids: list[int]


def http2_refusal(port: int) -> str | None:
    """None if `port` answers the HTTP/2 preface with SETTINGS; otherwise what it did."""
    with socket.create_connection(("127.0.0.1", port), timeout=5.0) as sock:
        sock.sendall(PREFACE + struct.pack(">I", 0)[1:] + bytes([_SETTINGS, 0]) + bytes(4))
        received = b""
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and len(received) < 65536:
            if len(received) >= 9:
                length = int.from_bytes(received[:3], "big")
                kind = received[3]
                if kind == _SETTINGS:
                    return None
                if kind == _GOAWAY and len(received) >= 9 + 8:
                    code = int.from_bytes(received[13:17], "big")
                    if code == _HTTP_1_1_REQUIRED:
                        return "it answers the HTTP/2 preface with GOAWAY(HTTP_1_1_REQUIRED)"
                    return f"it answers the HTTP/2 preface with GOAWAY(error code {code})"
                if received.startswith(b"HTTP/"):
                    return "it answers the HTTP/2 preface in HTTP/1.x"
                if kind != _GOAWAY:
                    received = received[9 + length :]
                    continue
            try:
                data = sock.recv(65536)
            except TimeoutError:
                break
            if not data:
                return "it closes the connection after the HTTP/2 preface"
            received += data
    return "it does not answer the HTTP/2 preface"


class GrpcBench:
    """The upstream, the token endpoint, nginx and token-proxy of one run."""

    def __init__(self, group: ProcessGroup, workdir: Path, cores: Cores) -> None:
        self.group = group
        self.workdir = workdir
        self.cores = cores
        self.upstream_port = free_port()
        self.token_port = free_port()
        self.nginx_port = free_port()
        self.proxy_port = free_port()
        self.reverse_port = free_port()
        self.admin_port = free_port()
        self.upstream_pids: list[int] = []

    def start(self) -> tuple[Target, Target]:
        upstream = start_grpc_upstream(
            self.group, "bench.grpc_unary", self.upstream_port, self.cores.origin
        )
        self.upstream_pids = [upstream.pid]
        cores = self.cores
        secret = start_token_endpoint(self.group, self.token_port, TOKEN_LIFETIME, cores.origin)
        config_file = self.workdir / "grpc-baseline.conf"
        config_file.write_text(
            nginx.grpc_baseline_config(self.workdir, self.nginx_port, self.upstream_port)
        )
        baseline = self.group.start(
            "grpc-baseline",
            nginx.nginx_command(config_file, self.workdir),
            cpus=self.cores.under_test,
        )
        self.group.wait_for_port("grpc-baseline", baseline, self.nginx_port)
        proxy = start_token_proxy(
            self.group,
            self.workdir,
            self.proxy_config(),
            secret=secret,
            admin_port=self.admin_port,
            cpus=self.cores.under_test,
        )
        return (
            Target("nginx", self.nginx_port, descendants(baseline.pid)),
            Target("token-proxy", self.reverse_port, [proxy.pid]),
        )

    def proxy_config(self) -> dict[str, object]:
        upstream = bench_upstream(
            "grpc-bench",
            "grpc.bench",
            f"http://127.0.0.1:{self.upstream_port}",
            self.token_port,
            self.reverse_port,
        )
        return token_proxy_config(self.proxy_port, self.admin_port, {"grpc-bench": upstream})

    def measure(self, target: Target, args: argparse.Namespace, duration: float) -> Sample:
        command = [
            sys.executable,
            "-m",
            "bench.grpc_unary",
            "--load",
            str(target.port),
            "--concurrency",
            str(args.concurrency),
            "--duration",
            str(duration),
            "--max-calls",
            str(args.max_calls),
        ]
        cpu_before = cpu_seconds(target.pids)
        upstream_before = cpu_seconds(self.upstream_pids)
        printed = run_child(
            self.group,
            f"load-{target.name}",
            command,
            mark=RESULT_MARK,
            timeout=duration + READY_TIMEOUT + LOAD_GRACE,
            cpus=self.cores.load,
            cwd=REPO_ROOT,
        )
        cpu_used = cpu_seconds(target.pids) - cpu_before
        upstream_used = cpu_seconds(self.upstream_pids) - upstream_before
        result = LoadResult(**printed)
        if result.failures or not result.calls:
            raise RuntimeError(
                f"{target.name}: {result.calls} calls and failures {result.failures}: "
                "the numbers would not be comparable"
            )
        return Sample(
            target.name,
            result,
            cpu_us_per_call=1e6 * cpu_used / result.calls,
            proxy_cpu_percent=100 * cpu_used / result.seconds,
            client_cpu_us_per_call=1e6 * result.client_cpu_seconds / result.calls,
            upstream_cpu_us_per_call=1e6 * upstream_used / result.calls,
        )


def report(
    samples: dict[str, list[Sample]], args: argparse.Namespace, cores: Cores, background: float
) -> str:
    baseline = samples.get("nginx", [])
    lines = [
        f"gRPC unary calls ({len(PAYLOAD)}-byte messages), h2c in and out, one channel with "
        f"{args.concurrency} calls in flight, {args.rounds} interleaved rounds of "
        f"{args.duration} s; medians",
        f"pinning: {cores.describe('load generator', ORIGIN_SIDE)}",
        f"other load on the machine just before the run: {background:.0f}% of all cores",
        f"  {'proxy':<12} {'calls/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'CPU µs/call':>11} "
        f"{'calls/s vs nginx':>16} {'CPU vs nginx':>12} {'proxy CPU':>9} "
        f"{'client µs/call':>14} {'upstream µs/call':>16}",
    ]
    for name, runs in samples.items():
        rate = paired_ratio(runs, baseline, lambda s: s.result.calls_per_second)
        cpu = paired_ratio(runs, baseline, lambda s: s.cpu_us_per_call)
        lines.append(
            f"  {name:<12} {median([s.result.calls_per_second for s in runs]):>9,.0f} "
            f"{median([s.result.p50_us for s in runs]) / 1000:>7.2f} "
            f"{median([s.result.p99_us for s in runs]) / 1000:>7.2f} "
            f"{median([s.cpu_us_per_call for s in runs]):>11.1f} {rate:>16.2f} {cpu:>12.2f} "
            f"{median([s.proxy_cpu_percent for s in runs]):>8.0f}% "
            f"{median([s.client_cpu_us_per_call for s in runs]):>14.1f} "
            f"{median([s.upstream_cpu_us_per_call for s in runs]):>16.1f}"
        )
    lines.append(
        "  (proxy CPU: share of one core the proxy process used; near 100% it was the "
        "bottleneck, below it the load generator or the upstream was; client and upstream: "
        "CPU per call of the load generator and of the grpcio upstream, shared by both)"
    )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    cores = Cores.for_machine()
    with bounded_run("bench.grpc_unary") as bench_run:
        group, workdir = bench_run.group, bench_run.workdir
        background = background_busy_percent()
        bench = GrpcBench(group, workdir, cores)
        _progress(f"starting servers in {workdir}")
        nginx_target, proxy_target = bench.start()
        targets = [nginx_target, proxy_target]
        refusal = http2_refusal(proxy_target.port)
        if refusal is not None:
            _progress(
                f"token-proxy's reverse port cannot take gRPC: {refusal}; it needs the "
                "HTTP/2 server side (h2c with prior knowledge on a `listen` port). "
                "Measuring nginx alone."
            )
            targets = [nginx_target]
        for target in targets:
            bench.measure(target, args, 1.0)  # warm-up: connections, token, caches
        samples: dict[str, list[Sample]] = {}
        for round_number in range(1, args.rounds + 1):
            for target in targets:
                sample = bench.measure(target, args, args.duration)
                samples.setdefault(target.name, []).append(sample)
                _progress(
                    f"round {round_number}/{args.rounds} {target.name:<12} "
                    f"{sample.result.calls_per_second:>8,.0f} calls/s  "
                    f"{sample.cpu_us_per_call:.1f} µs CPU/call"
                )
        print(report(samples, args, cores, background), flush=True)
        if args.json is not None:
            payload = {
                name: [
                    {
                        "calls_per_second": s.result.calls_per_second,
                        "p50_us": s.result.p50_us,
                        "p99_us": s.result.p99_us,
                        "cpu_us_per_call": s.cpu_us_per_call,
                        "proxy_cpu_percent": s.proxy_cpu_percent,
                        "client_cpu_us_per_call": s.client_cpu_us_per_call,
                        "upstream_cpu_us_per_call": s.upstream_cpu_us_per_call,
                        "calls": s.result.calls,
                    }
                    for s in runs
                ]
                for name, runs in samples.items()
            }
            args.json.write_text(json.dumps(payload, indent=2))
        if refusal is not None:
            _progress(f"failed: token-proxy was not measured: {refusal}")
            return 1
        return 0
    return bench_run.code


def _progress(message: str) -> None:
    progress("bench.grpc_unary", message)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.grpc_unary",
        description="gRPC unary calls through token-proxy and nginx, on loopback.",
    )
    parser.add_argument("--duration", type=float, help="seconds per load (default 5; quick 2)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3; quick 1)")
    parser.add_argument("--concurrency", type=int, default=32, help="calls in flight")
    parser.add_argument(
        "--max-calls", type=int, default=2_000_000, help="upper bound of calls per load"
    )
    parser.add_argument("--quick", action="store_true", help="a short smoke-test run")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the samples here")
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--load", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.duration is None:
        args.duration = 2.0 if args.quick else 5.0
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.duration <= 0 or args.rounds < 1 or not 1 <= args.concurrency <= 1024:
        parser.error("--duration must be positive, --rounds at least 1, --concurrency 1..1024")
    if args.max_calls < 1:
        parser.error("--max-calls must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve is not None:
        serve(args.serve)
        return 0
    if args.load is not None:
        result = load(args.load, args.concurrency, args.duration, args.max_calls)
        print(RESULT_MARK + json.dumps(asdict(result)), flush=True)
        return 0
    stop_on_signals()
    ensure_commands({"nginx": "nginx-light", "taskset": "util-linux"})
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
