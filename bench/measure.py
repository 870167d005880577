"""One measurement each: a wrk load, a 1 GiB transfer, memory with many idle connections.

Each function measures one target once and returns plain numbers; `bench.suite`
decides the order (interleaved rounds) and takes the medians.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.processes import ProcessGroup
from bench.procfs import CoreTimes, cpu_seconds, rss_bytes
from bench.stack import REPO_ROOT, Cores, Target
from bench.wrk import WrkResult, run_wrk

RSS_SAMPLE_INTERVAL = 0.05
HOLD_READY_TIMEOUT = 60.0


@dataclass(frozen=True)
class LoadSample:
    """One wrk run against one target, with the CPU the process under test spent."""

    target: str
    connections: int
    wrk: WrkResult
    cpu_us_per_request: float | None
    # Share of one core the process under test used: near 100 means it was the bottleneck.
    process_cpu_percent: float | None
    core_busy: dict[int, float]

    @property
    def requests_per_second(self) -> float:
        return self.wrk.requests_per_second

    def as_dict(self) -> dict[str, object]:
        return {
            "target": self.target,
            "connections": self.connections,
            **self.wrk.as_dict(),
            "cpu_us_per_request": self.cpu_us_per_request,
            "process_cpu_percent": self.process_cpu_percent,
            "core_busy_percent": self.core_busy,
        }


def load(
    target: Target, *, connections: int, duration: float, workdir: Path, cores: Cores
) -> LoadSample:
    """wrk against `target`; CPU per request from /proc of the process under test."""
    cpu_before = cpu_seconds(target.pids)
    cores_before = CoreTimes.now()
    result = run_wrk(
        target.port,
        target.request,
        connections=connections,
        duration=duration,
        script_dir=workdir,
        cpus=cores.load,
    )
    core_busy = CoreTimes.now().busy_percent_since(cores_before)
    cpu_used = cpu_seconds(target.pids) - cpu_before
    if result.errors or result.non_2xx:
        raise RuntimeError(
            f"{target.name}: {result.errors} socket errors and {result.non_2xx} non-2xx "
            f"responses in {result.requests} requests: the numbers would not be comparable"
        )
    if not target.pids or not result.requests:
        return LoadSample(target.name, connections, result, None, None, core_busy)
    return LoadSample(
        target.name,
        connections,
        result,
        cpu_us_per_request=1e6 * cpu_used / result.requests,
        process_cpu_percent=100 * cpu_used / result.duration_s,
        core_busy=core_busy,
    )


@dataclass(frozen=True)
class TransferSample:
    """One large download or upload through one target."""

    target: str
    direction: str  # "download" or "upload"
    size: int
    bytes_per_second: float
    # Of the process under test, during the transfer (RSS sampled every 50 ms).
    peak_rss: int | None
    cpu_seconds: float | None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


class _RssSampler:
    """Samples the RSS of `pids` in a thread while a transfer runs; keeps the peak."""

    def __init__(self, pids: list[int]) -> None:
        self._pids = pids
        self._stop = threading.Event()
        self.peak = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes(self._pids))
            self._stop.wait(RSS_SAMPLE_INTERVAL)

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()


def transfer(
    target: Target, direction: str, *, big_file: Path, size: int, cores: Cores
) -> TransferSample:
    """`curl` a `size`-byte download from, or upload of `big_file` to, `target`."""
    command = [*(["taskset", "-c", cores.load] if cores.load else []), "curl", "-sS"]
    command += ["--max-time", "300"]
    # Never a proxy from the environment: only the one under test, if any.
    command += ["--noproxy", "*"] if target.curl_proxy is None else ["-x", target.curl_proxy]
    for header in target.extra_curl_headers:
        command += ["-H", header]
    if direction == "download":
        command += ["-o", "/dev/null", "-w", "%{http_code} %{size_download} %{speed_download}"]
        command.append(target.download_url)
    else:
        if target.upload_url is None:
            raise ValueError(f"{target.name} takes no uploads")
        # No `Expect: 100-continue` pause: the body starts at once for every target alike.
        command += ["-H", "Expect:", "-T", str(big_file), "-o", "/dev/null"]
        command += ["-w", "%{http_code} %{size_upload} %{speed_upload}", target.upload_url]
    cpu_before = cpu_seconds(target.pids)
    with _RssSampler(target.pids) as sampler:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=330)
    cpu_used = cpu_seconds(target.pids) - cpu_before
    try:
        status, transferred, speed = completed.stdout.split()
    except ValueError:
        raise RuntimeError(
            f"{target.name} {direction}: curl said {completed.stdout!r} {completed.stderr!r}"
        ) from None
    if status != "200" or int(transferred) != size:
        raise RuntimeError(
            f"{target.name} {direction}: status {status}, {transferred} of {size} bytes "
            f"{completed.stderr.strip()}"
        )
    return TransferSample(
        target.name,
        direction,
        size,
        float(speed),
        peak_rss=sampler.peak if target.pids else None,
        cpu_seconds=cpu_used if target.pids else None,
    )


def rss_with_idle_connections(target: Target, count: int, group: ProcessGroup, cores: Cores) -> int:
    """RSS of the process under test while `count` served keep-alive connections idle on it."""
    name = f"hold-{target.name}"
    holder = group.start(
        name,
        [
            sys.executable,
            "-m",
            "bench.hold_connections",
            str(target.port),
            str(count),
            target.request.path,
            target.request.host,
        ],
        cpus=cores.load,
        cwd=REPO_ROOT,
    )
    try:
        deadline = time.monotonic() + HOLD_READY_TIMEOUT
        while "READY" not in group.log_tail(name, 1):
            group.check_running(name, holder)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name}: connections not open after {HOLD_READY_TIMEOUT}s")
            time.sleep(0.1)
        return rss_bytes(target.pids)
    finally:
        group.stop(holder)
