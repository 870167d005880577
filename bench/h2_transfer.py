"""1 GiB gRPC streams through token-proxy's h2c reverse port, with the proxy's memory.

Three transfers through one token-proxy process, each on a fresh grpcio channel to
the upstream's reverse `listen` port (cleartext HTTP/2 with prior knowledge), relayed
to a grpcio upstream over HTTP/2 with the upstream's token added:

* **download**: a server-streaming call; the upstream sends `--size` bytes as messages
  of `--message-size` bytes (16,384 messages of 64 KiB by default);
* **upload**: a client-streaming call of the same messages; the upstream answers how
  many messages and bytes it received;
* **slow download**: the same download, read by a client that waits `--slow-pause`
  seconds after each message and cancels the call after `--slow-bytes` bytes or
  `--slow-seconds`. The upstream could send far faster, so what the proxy holds for
  the stream is bounded only by the flow-control windows it announces (256 KiB per
  stream and 8 MiB per connection towards the upstream, 64 KiB per stream towards
  the client).

Every message carries its index in its first 8 bytes: the receiver checks the order,
each message's size and the total, and a call whose upstream did not see a bearer token
fails with UNAUTHENTICATED. The harness samples the proxy process's RSS every 50 ms
(/proc/<pid>/status) and reads its CPU time; it reports throughput, proxy CPU seconds,
RSS at the start of the transfer and peak RSS.

    .venv/bin/python -m bench.h2_transfer                 # 1 GiB each way, slow reader
    .venv/bin/python -m bench.h2_transfer --size 256MiB --json /tmp/h2.json

Cores as in `bench.stack`: the proxy on the first core, the client, upstream and token
endpoint on the others. The client and the upstream are child processes of their own;
every process is stopped on exit, error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.processes import (
    ProcessGroup,
    bounded_run,
    free_port,
    progress,
    run_child,
    stop_on_signals,
)
from bench.procfs import cpu_seconds, rss_bytes
from bench.stack import (
    REPO_ROOT,
    Cores,
    bench_upstream,
    start_grpc_upstream,
    start_token_endpoint,
    start_token_proxy,
    token_proxy_config,
)

SERVICE = "bench.Transfer"
ORIGIN_SIDE = "grpcio upstream and token endpoint"
TOKEN_LIFETIME = 600
READY_TIMEOUT = 20.0
RSS_SAMPLE_INTERVAL = 0.05
# A transfer is bounded by its call deadline; past that and this grace it is stuck.
CALL_DEADLINE = 300.0
WAIT_GRACE = 30.0
RESULT_MARK = "H2-TRANSFER-RESULT"
PRODUCED_MARK = "H2-TRANSFER-PRODUCED "
PRODUCED_WAIT = 10.0
MIB = 1024 * 1024
INDEX_BYTES = 8


def _message(index: int, size: int, filler: bytes) -> bytes:
    return index.to_bytes(INDEX_BYTES, "big") + filler[: size - INDEX_BYTES]


# -- the upstream (a child process) -----------------------------------------------------


def serve(port: int) -> None:
    """`Download` (b"count,size" in, count messages out) and `Upload` (messages in,
    b"count:bytes:misordered" out), each only for a call that carries a bearer token."""
    from concurrent import futures

    import grpc

    def authorised(context: grpc.ServicerContext) -> None:
        for key, value in context.invocation_metadata() or ():
            if key == "authorization" and str(value).startswith("Bearer "):
                return
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "no bearer token")

    def download(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        authorised(context)
        count, size = (int(part) for part in request.split(b","))
        filler = b"d" * size
        produced = 0
        try:
            for index in range(count):
                yield _message(index, size, filler)
                produced += 1
        finally:
            # Also when the client cancelled: how far grpcio took the stream by then.
            print(f"{PRODUCED_MARK}{produced * size}", flush=True)

    def upload(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        authorised(context)
        count = total = misordered = 0
        for message in requests:
            if int.from_bytes(message[:INDEX_BYTES], "big") != count:
                misordered += 1
            count += 1
            total += len(message)
        return b"%d:%d:%d" % (count, total, misordered)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Download": grpc.unary_stream_rpc_method_handler(download),
            "Upload": grpc.stream_unary_rpc_method_handler(upload),
        },
    )
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


# -- the client (a child process) -------------------------------------------------------


@dataclass(frozen=True)
class ClientResult:
    """One transfer as the client saw it."""

    kind: str
    messages: int
    bytes: int
    seconds: float
    # Empty when every message arrived whole, in order, and the call ended as expected.
    error: str


def client(args: argparse.Namespace) -> ClientResult:
    import grpc

    kind = args.client
    count = args.size // args.message_size
    options = [("grpc.enable_http_proxy", 0), ("grpc.enable_retries", 0)]
    with grpc.insecure_channel(f"127.0.0.1:{args.port}", options=options) as channel:
        grpc.channel_ready_future(channel).result(timeout=READY_TIMEOUT)
        started = time.perf_counter()
        if kind == "upload":
            call = channel.stream_unary(f"/{SERVICE}/Upload")
            filler = b"u" * args.message_size
            messages = (_message(index, args.message_size, filler) for index in range(count))
            try:
                answer = call(messages, timeout=CALL_DEADLINE)
            except grpc.RpcError as failure:
                seconds = time.perf_counter() - started
                return ClientResult(kind, 0, 0, seconds, f"{failure.code().name}")
            seconds = time.perf_counter() - started
            received, total, misordered = (int(part) for part in answer.split(b":"))
            error = ""
            if (received, total, misordered) != (count, count * args.message_size, 0):
                error = f"the upstream received {answer.decode()}"
            return ClientResult(kind, received, total, seconds, error)

        slow = kind == "slow"
        stream = channel.unary_stream(f"/{SERVICE}/Download")
        responses = stream(b"%d,%d" % (count, args.message_size), timeout=CALL_DEADLINE)
        received = total = 0
        error = ""
        stop_at = started + args.slow_seconds
        try:
            for message in responses:
                if len(message) != args.message_size:
                    error = f"message {received} has {len(message)} bytes"
                    break
                if int.from_bytes(message[:INDEX_BYTES], "big") != received:
                    error = f"message {received} out of order"
                    break
                received += 1
                total += len(message)
                if slow:
                    if total >= args.slow_bytes or time.perf_counter() >= stop_at:
                        responses.cancel()
                        break
                    time.sleep(args.slow_pause)
        except grpc.RpcError as failure:
            error = f"{failure.code().name} after {received} messages"
        seconds = time.perf_counter() - started
        if not error and not slow and received != count:
            error = f"{received} of {count} messages"
        if not error and slow and not received:
            error = "nothing arrived"
        return ClientResult(kind, received, total, seconds, error)


# -- the harness ------------------------------------------------------------------------


@dataclass(frozen=True)
class Transfer:
    """One transfer through the proxy, with the proxy process's CPU and memory."""

    kind: str
    messages: int
    bytes: int
    seconds: float
    megabytes_per_second: float
    proxy_cpu_seconds: float
    rss_start: int
    rss_peak: int
    rss_samples: int
    # Downloads: the bytes the upstream had handed to grpcio when its handler ended.
    upstream_sent: int | None

    @property
    def growth(self) -> int:
        return self.rss_peak - self.rss_start

    @property
    def ahead(self) -> int | None:
        """Sent by the upstream, never read by the client: on the way when it stopped."""
        return None if self.upstream_sent is None else self.upstream_sent - self.bytes


class RssSampler:
    """Samples one process's RSS in a thread every 50 ms; keeps the peak and the count."""

    def __init__(self, pid: int) -> None:
        self._pid = pid
        self._stop = threading.Event()
        self.start = rss_bytes([pid])
        self.peak = self.start
        self.samples = 1
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(RSS_SAMPLE_INTERVAL):
            self.peak = max(self.peak, rss_bytes([self._pid]))
            self.samples += 1

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(5.0)
        self.peak = max(self.peak, rss_bytes([self._pid]))


class H2TransferBench:
    """The upstream, the token endpoint and token-proxy of one run."""

    def __init__(self, group: ProcessGroup, workdir: Path, cores: Cores) -> None:
        self.group = group
        self.workdir = workdir
        self.cores = cores
        self.upstream_port = free_port()
        self.token_port = free_port()
        self.proxy_port = free_port()
        self.reverse_port = free_port()
        self.admin_port = free_port()
        self.proxy_pid = 0

    def start(self) -> None:
        start_grpc_upstream(self.group, "bench.h2_transfer", self.upstream_port, self.cores.origin)
        cores = self.cores
        secret = start_token_endpoint(self.group, self.token_port, TOKEN_LIFETIME, cores.origin)
        proxy = start_token_proxy(
            self.group,
            self.workdir,
            self.proxy_config(),
            secret=secret,
            admin_port=self.admin_port,
            cpus=self.cores.under_test,
        )
        self.proxy_pid = proxy.pid

    def proxy_config(self) -> dict[str, object]:
        upstream = bench_upstream(
            "grpc-transfer",
            "grpc.transfer",
            f"http://127.0.0.1:{self.upstream_port}",
            self.token_port,
            self.reverse_port,
        )
        return token_proxy_config(self.proxy_port, self.admin_port, {"grpc-transfer": upstream})

    def measure(self, kind: str, args: argparse.Namespace, size: int) -> Transfer:
        command = [
            sys.executable,
            "-m",
            "bench.h2_transfer",
            "--client",
            kind,
            "--port",
            str(self.reverse_port),
            "--size",
            str(size),
            "--message-size",
            str(args.message_size),
            "--slow-pause",
            str(args.slow_pause),
            "--slow-bytes",
            str(args.slow_bytes),
            "--slow-seconds",
            str(args.slow_seconds),
        ]
        produced_before = len(self._produced())
        cpu_before = cpu_seconds([self.proxy_pid])
        with RssSampler(self.proxy_pid) as sampler:
            printed = run_child(
                self.group,
                f"client-{kind}",
                command,
                mark=RESULT_MARK,
                timeout=CALL_DEADLINE + READY_TIMEOUT + WAIT_GRACE,
                cpus=self.cores.load,
                cwd=REPO_ROOT,
            )
        cpu_used = cpu_seconds([self.proxy_pid]) - cpu_before
        result = ClientResult(**printed)
        if result.error:
            raise RuntimeError(f"{kind}: {result.error}")
        upstream_sent = None
        if kind != "upload":
            # The upstream logs what it sent once its handler ends (a cancelled call's too).
            deadline = time.monotonic() + PRODUCED_WAIT
            while len(produced := self._produced()) <= produced_before:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the upstream did not say what it sent for {kind}")
                time.sleep(RSS_SAMPLE_INTERVAL)
            upstream_sent = produced[-1]
        return Transfer(
            kind=kind,
            messages=result.messages,
            bytes=result.bytes,
            seconds=result.seconds,
            megabytes_per_second=result.bytes / result.seconds / 1e6 if result.seconds else 0.0,
            proxy_cpu_seconds=cpu_used,
            rss_start=sampler.start,
            rss_peak=sampler.peak,
            rss_samples=sampler.samples,
            upstream_sent=upstream_sent,
        )

    def _produced(self) -> list[int]:
        text = self.group.log_path("grpc-upstream").read_text(errors="replace")
        return [
            int(line.removeprefix(PRODUCED_MARK))
            for line in text.splitlines()
            if line.startswith(PRODUCED_MARK)
        ]


def report(transfers: list[Transfer], args: argparse.Namespace, cores: Cores) -> str:
    lines = [
        f"gRPC streams through token-proxy's h2c reverse port, messages of "
        f"{args.message_size // 1024} KiB; slow reader: {args.slow_pause * 1000:g} ms after "
        f"each message, at most {args.slow_bytes // MIB} MiB or {args.slow_seconds:g} s",
        f"pinning: {cores.describe('client', ORIGIN_SIDE)}",
        f"  {'transfer':<10} {'MiB':>6} {'s':>6} {'MB/s':>6} {'proxy CPU s':>11} "
        f"{'proxy CPU':>9} {'RSS start MiB':>13} {'peak MiB':>8} {'growth MiB':>10} "
        f"{'ahead MiB':>9}",
    ]
    for t in transfers:
        ahead = "-" if t.ahead is None else f"{t.ahead / MIB:.2f}"
        share = 100 * t.proxy_cpu_seconds / t.seconds if t.seconds else 0.0
        lines.append(
            f"  {t.kind:<10} {t.bytes / MIB:>6,.0f} {t.seconds:>6.1f} "
            f"{t.megabytes_per_second:>6,.0f} {t.proxy_cpu_seconds:>11.2f} {share:>8.0f}% "
            f"{t.rss_start / MIB:>13.1f} {t.rss_peak / MIB:>8.1f} {t.growth / MIB:>10.1f} "
            f"{ahead:>9}"
        )
    lines.append(
        "  (RSS of the token-proxy process, sampled every 50 ms; growth: peak minus the RSS "
        "at the transfer's start; proxy CPU: share of one core; ahead: bytes the upstream "
        "had sent that the client never read, in grpcio's buffers, both sockets and the "
        "proxy together when the call ended)"
    )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    cores = Cores.for_machine()
    with bounded_run("bench.h2_transfer") as bench_run:
        group, workdir = bench_run.group, bench_run.workdir
        bench = H2TransferBench(group, workdir, cores)
        _progress(f"starting servers in {workdir}")
        bench.start()
        # Warm-up: the token, both HTTP/2 connections, the allocator's first arenas.
        bench.measure("download", args, 16 * args.message_size)
        bench.measure("upload", args, 16 * args.message_size)
        transfers: list[Transfer] = []
        for kind in ("download", "upload", "slow"):
            transfer = bench.measure(kind, args, args.size)
            transfers.append(transfer)
            _progress(
                f"{kind:<8} {transfer.bytes / MIB:,.0f} MiB in {transfer.seconds:.1f} s, proxy "
                f"RSS {transfer.rss_start / MIB:.1f} -> peak {transfer.rss_peak / MIB:.1f} MiB"
            )
        print(report(transfers, args, cores), flush=True)
        if args.json is not None:
            payload = {
                "message_size": args.message_size,
                "size": args.size,
                "slow_pause": args.slow_pause,
                "transfers": [
                    {**asdict(t), "rss_growth": t.growth, "ahead": t.ahead} for t in transfers
                ],
            }
            args.json.write_text(json.dumps(payload, indent=2))
        return 0
    return bench_run.code


def _progress(message: str) -> None:
    progress("bench.h2_transfer", message)


def _size(text: str) -> int:
    units = {"KiB": 1024, "MiB": MIB, "GiB": 1024 * MIB}
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text.removesuffix(unit)) * factor)
    return int(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.h2_transfer",
        description="1 GiB gRPC streams through token-proxy's h2c port, with its RSS.",
    )
    parser.add_argument("--size", type=_size, default=1024 * MIB, help="bytes (1GiB, 256MiB)")
    parser.add_argument("--message-size", type=_size, default=64 * 1024, help="bytes a message")
    parser.add_argument(
        "--slow-pause", type=float, default=0.001, help="slow reader's wait per message, s"
    )
    parser.add_argument(
        "--slow-bytes", type=_size, default=128 * MIB, help="slow reader stops after this"
    )
    parser.add_argument(
        "--slow-seconds", type=float, default=60.0, help="... or after this many seconds"
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the results here")
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--client", choices=("download", "upload", "slow"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not INDEX_BYTES <= args.message_size <= 4 * MIB - 64:
        parser.error("--message-size must be 8 bytes .. just under 4 MiB (grpcio's limit)")
    if args.size < args.message_size or args.size // args.message_size > 10_000_000:
        parser.error("--size must hold 1 .. 10,000,000 messages")
    if not 0 <= args.slow_pause <= 1 or not 0 < args.slow_seconds <= 600 or args.slow_bytes < 1:
        parser.error("--slow-pause 0..1 s, --slow-seconds 0..600, --slow-bytes positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve is not None:
        serve(args.serve)
        return 0
    if args.client is not None:
        result = client(args)
        print(RESULT_MARK + json.dumps(asdict(result)), flush=True)
        return 0
    stop_on_signals()
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
