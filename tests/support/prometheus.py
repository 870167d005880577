"""A real Prometheus server as a child process, for end-to-end tests and the dashboard render.

The binary comes from Debian's ``prometheus`` package, unpacked by `tests.support.tools`
into the same per-user cache as ``promtool`` (``apt-get download`` + ``dpkg-deb -x``:
nothing is installed system-wide and no service is started). A ``prometheus`` already on
PATH is used as it is.

`PrometheusServer` writes a scrape config into a directory of the caller's, listens on a
free loopback port with its TSDB in that directory, and is stopped (and, if need be,
killed) on exit. On Linux the child also gets SIGKILL when its parent dies, so a test run
killed hard leaves no server behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
import yaml

from tests.support import tools
from tests.support.process import free_port

PACKAGE_ROOT = tools.CACHE_DIR / "prometheus"
CACHED_BINARY = PACKAGE_ROOT / "usr" / "bin" / "prometheus"
_PR_SET_PDEATHSIG = 1


@functools.cache
def prometheus_binary() -> Path:
    """The `prometheus` server binary: on PATH, in the tools cache, or unpacked from Debian's
    package. Raises `tools.ToolUnavailable` when this machine cannot have it."""
    found = shutil.which("prometheus")
    if found is not None:
        return Path(found)
    if CACHED_BINARY.exists():
        return CACHED_BINARY
    for needed in ("apt-get", "dpkg-deb"):
        if shutil.which(needed) is None:
            raise tools.ToolUnavailable(
                f"the Prometheus server is not installed and there is no {needed} to fetch "
                "Debian's 'prometheus' package: put a `prometheus` binary (Prometheus' own "
                "release or your distribution's package) on PATH to run this"
            )
    # The same unpacked package that tools.promtool() uses: one download serves both.
    with tools._install_lock():
        if not CACHED_BINARY.exists():
            tools._unpack_debian_package("prometheus", PACKAGE_ROOT)
    if not CACHED_BINARY.exists():
        raise RuntimeError(f"Debian's prometheus package did not contain {CACHED_BINARY}")
    return CACHED_BINARY


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn asking Linux to SIGKILL the child when this process exits."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)

    def set_parent_death_signal() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)

    return set_parent_death_signal


class PrometheusError(Exception):
    """The Prometheus HTTP API answered with an error, or not at all."""


class PrometheusServer:
    """One Prometheus server process scraping `targets` (job name -> host:port list),
    with its config, TSDB and log under `directory`."""

    def __init__(
        self,
        directory: Path,
        targets: dict[str, Sequence[str]],
        *,
        rule_files: Sequence[Path] = (),
        scrape_interval: str = "1s",
        binary: Path | None = None,
    ) -> None:
        self.directory = directory
        self.binary = binary
        self.port = free_port()
        self.config_path = directory / "prometheus.yml"
        self.storage_path = directory / "tsdb"
        self.log_path = directory / "prometheus.log"
        self.config: dict[str, Any] = {
            "global": {
                "scrape_interval": scrape_interval,
                "scrape_timeout": scrape_interval,
                "evaluation_interval": scrape_interval,
            },
            "rule_files": [str(path.resolve()) for path in rule_files],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": list(addresses)}]}
                for job, addresses in targets.items()
            ],
        }
        self.process: asyncio.subprocess.Process | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> PrometheusServer:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self, *, within: float = 30.0) -> None:
        """Start the server and return once it reports ready (its TSDB is open)."""
        binary = self.binary if self.binary is not None else prometheus_binary()
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        with self.log_path.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                str(binary),
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={self.storage_path}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent(),
            )
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        deadline = time.monotonic() + within
        while True:
            if self.process.returncode is not None:
                raise RuntimeError(
                    f"prometheus exited with {self.process.returncode}:\n{self.logs()}"
                )
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with self._session.get(f"{self.url}/-/ready") as response:
                    if response.status == 200:
                        return
            if time.monotonic() > deadline:
                raise TimeoutError(f"prometheus not ready after {within} s:\n{self.logs()}")
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 10 s) and close the API client."""
        if self._session is not None:
            await self._session.close()
            self._session = None
        process = self.process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            await asyncio.wait_for(process.wait(), timeout=10)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/`path` and return its `data`, or raise `PrometheusError`."""
        if self._session is None:
            raise PrometheusError("the server is not running")
        try:
            async with self._session.get(f"{self.url}/api/v1/{path}", params=params) as response:
                body = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as error:
            raise PrometheusError(f"GET /api/v1/{path}: {error!r}") from error
        if not isinstance(body, dict) or body.get("status") != "success":
            raise PrometheusError(f"GET /api/v1/{path} {params}: {body}")
        return body["data"]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant vector query: a list of {"metric": labels, "value": [time, "text"]}."""
        data = await self.api("query", query=expr)
        if data["resultType"] != "vector":
            raise PrometheusError(f"{expr} gave a {data['resultType']}, not a vector")
        return list(data["result"])

    async def query_range(
        self, expr: str, start: float, end: float, step: float
    ) -> list[dict[str, Any]]:
        """A range query: a list of {"metric": labels, "values": [[time, "text"], ...]}."""
        data = await self.api(
            "query_range", query=expr, start=repr(start), end=repr(end), step=repr(step)
        )
        return list(data["result"])

    async def rule_groups(self) -> list[dict[str, Any]]:
        """The loaded rule groups, as /api/v1/rules lists them."""
        data = await self.api("rules")
        return list(data["groups"])

    async def targets(self) -> list[dict[str, Any]]:
        """The active scrape targets, with their health and last error."""
        data = await self.api("targets", state="active")
        return list(data["activeTargets"])
