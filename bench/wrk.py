"""Driving wrk: one keep-alive load of GET requests, summarised by a Lua `done` hook.

The generated Lua script sets the request line and Host (absolute form for the
forward-proxy port) and prints one machine-readable line with the request count,
errors and latency percentiles, so nothing depends on wrk's human output format.
"""

from __future__ import annotations

import hashlib
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

RESULT_MARK = "BENCH-RESULT"

_DONE_HOOK = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("%s %d %d %d %d %d %d %d %d %d %d\\n", "BENCH-RESULT",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""


@dataclass(frozen=True)
class Request:
    """What wrk sends: `GET <path>` with `Host: <host>`, plus optional extra headers."""

    path: str
    host: str
    headers: tuple[tuple[str, str], ...] = ()

    def lua(self) -> str:
        lines = [
            'wrk.method = "GET"',
            f"wrk.path = {_lua_string(self.path)}",
            f'wrk.headers["Host"] = {_lua_string(self.host)}',
        ]
        lines += [f"wrk.headers[{_lua_string(k)}] = {_lua_string(v)}" for k, v in self.headers]
        return "\n".join(lines) + "\n" + _DONE_HOOK


def _lua_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True)
class WrkResult:
    """One wrk run: request count, errors and latency percentiles (microseconds)."""

    requests: int
    duration_s: float
    errors: int
    non_2xx: int
    p50_us: int
    p99_us: int
    max_us: int

    @property
    def requests_per_second(self) -> float:
        return self.requests / self.duration_s

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "requests_per_second": self.requests_per_second}


def run_wrk(
    port: int,
    request: Request,
    *,
    connections: int,
    duration: float,
    script_dir: Path,
    cpus: str | None,
) -> WrkResult:
    """Load 127.0.0.1:`port` for `duration` seconds with `connections` keep-alive connections."""
    lua = request.lua()
    script = script_dir / f"wrk-{hashlib.sha1(lua.encode()).hexdigest()[:12]}.lua"
    script.write_text(lua)
    command = [
        *(["taskset", "-c", cpus] if cpus else []),
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        f"http://127.0.0.1:{port}/",
    ]
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=duration + 30, check=False
    )
    for line in completed.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            numbers = [int(field) for field in line.split()[1:]]
            requests, duration_us, connect, read, write, status, timeout = numbers[:7]
            p50, p99, latency_max = numbers[7:]
            return WrkResult(
                requests=requests,
                duration_s=duration_us / 1e6,
                errors=connect + read + write + timeout,
                non_2xx=status,
                p50_us=p50,
                p99_us=p99,
                max_us=latency_max,
            )
    raise RuntimeError(
        f"wrk gave no result (exit {completed.returncode}): "
        f"{completed.stdout.strip()} {completed.stderr.strip()}"
    )
