"""Child processes of a benchmark run: starting them pinned, waiting for them, stopping them.

`ProcessGroup` owns every process the run starts. Each child gets its own session
(process group), so stopping it also stops whatever it forked (nginx's worker), and
`stop_all()` in a `finally` leaves nothing behind after an error or Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import types
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STOP_TIMEOUT = 5.0
# Loopback only, whatever http_proxy the environment names.
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ProcessGroup:
    """The processes of one run; logs go to `log_dir/<name>.log`."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._children: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cpus: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start `argv` (on the CPUs `cpus`, e.g. "0" or "1,2", when given)."""
        command = [*(["taskset", "-c", cpus] if cpus else []), *argv]
        with self.log_path(name).open("ab") as log:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                cwd=cwd,
                start_new_session=True,
            )
        self._children.append((name, process))
        return process

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def log_tail(self, name: str, lines: int = 20) -> str:
        path = self.log_path(name)
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def check_running(self, name: str, process: subprocess.Popen[bytes]) -> None:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}:\n{self.log_tail(name)}")

    def stop(self, process: subprocess.Popen[bytes]) -> None:
        """SIGTERM to the child's process group, SIGKILL if it lingers."""
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(STOP_TIMEOUT)
        # The leader may be gone while its group (a forked worker) lives on.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(STOP_TIMEOUT)

    def stop_all(self) -> None:
        while self._children:
            _, process = self._children.pop()
            self.stop(process)

    def wait_for_port(
        self, name: str, process: subprocess.Popen[bytes], port: int, timeout: float = 20.0
    ) -> None:
        """Poll until `port` on 127.0.0.1 accepts connections."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_running(name, process)
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{name} did not listen on {port}:\n{self.log_tail(name)}"
                    ) from None
                time.sleep(0.05)

    def wait_for_ok(
        self, name: str, process: subprocess.Popen[bytes], url: str, timeout: float = 20.0
    ) -> None:
        """Poll until GET `url` answers 200 (token-proxy's /readyz)."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_running(name, process)
            try:
                with _NO_PROXY.open(url, timeout=1.0) as response:
                    if response.status == 200:
                        return
            except (OSError, urllib.error.HTTPError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name}: {url} not 200 in {timeout}s:\n{self.log_tail(name)}")
            time.sleep(0.05)


def progress(name: str, message: str) -> None:
    """A progress line of benchmark `name` on stderr (the report goes to stdout)."""
    print(f"{name}: {message}", file=sys.stderr, flush=True)


def _raise_interrupt(signum: int, frame: types.FrameType | None) -> None:
    raise KeyboardInterrupt


def stop_on_signals() -> None:
    """Make SIGINT and SIGTERM raise KeyboardInterrupt, so that `bounded_run` stops
    every process of the run before it exits."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _raise_interrupt)


def run_child(
    group: ProcessGroup,
    name: str,
    argv: Sequence[str],
    *,
    mark: str,
    timeout: float,
    cpus: str | None,
    cwd: Path,
) -> dict[str, Any]:
    """Run a measuring child (a load generator, a client) to its end, within `timeout`
    seconds, and return the JSON it printed last after `mark` on a line of its own log;
    RuntimeError, with the log's tail, when it hangs, fails or prints no result."""
    log = group.log_path(name)
    log.unlink(missing_ok=True)
    process = group.start(name, argv, cpus=cpus, cwd=cwd)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        group.stop(process)
        raise RuntimeError(f"{name} did not finish:\n{group.log_tail(name)}") from None
    lines = [line for line in log.read_text().splitlines() if line.startswith(mark)]
    if process.returncode != 0 or not lines:
        raise RuntimeError(f"{name} failed:\n{group.log_tail(name)}")
    result = json.loads(lines[-1].removeprefix(mark))
    if not isinstance(result, dict):
        raise RuntimeError(f"{name} printed no result object: {lines[-1]!r}")
    return result


@dataclass
class BenchRun:
    """One benchmark run: its scratch directory, the processes it starts, its exit code
    (0 unless `bounded_run` caught something)."""

    workdir: Path
    group: ProcessGroup
    code: int = 0


@contextlib.contextmanager
def bounded_run(name: str) -> Iterator[BenchRun]:
    """A benchmark run's body, in a scratch directory of its own: an interruption (exit
    code 130) or a failed process, timeout or OS call (1) is said on stderr instead of
    a traceback, and afterwards, whatever happened, every process of the run is stopped
    and the directory removed."""
    workdir = Path(tempfile.mkdtemp(prefix=f"token-proxy-{name.replace('.', '-')}-"))
    # nginx's workers drop root privileges and must still read the run's files.
    workdir.chmod(0o755)
    run = BenchRun(workdir, ProcessGroup(workdir))
    try:
        yield run
    except KeyboardInterrupt:
        progress(name, "interrupted; stopping everything")
        run.code = 130
    except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError) as error:
        progress(name, f"failed: {error}")
        run.code = 1
    finally:
        run.group.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
