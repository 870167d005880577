"""Run token-proxy as a real child process (`python -m proxy run`), as it runs in a pod."""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_bytes(pid: int) -> int:
    """Resident set size of `pid` from /proc (Linux)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class ProxyProcess:
    """token-proxy in a child process, with its config written to `directory`."""

    def __init__(self, directory: Path, config: dict[str, object]) -> None:
        self.directory = directory
        self.port = free_port()
        self.admin_port = free_port()
        config = {
            "listen": f"127.0.0.1:{self.port}",
            "admin_listen": f"127.0.0.1:{self.admin_port}",
            **config,
        }
        self.config_path = directory / "proxy.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = directory / "proxy.log"
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def write_config(self, config: dict[str, object]) -> None:
        config = {
            "listen": f"127.0.0.1:{self.port}",
            "admin_listen": f"127.0.0.1:{self.admin_port}",
            **config,
        }
        self.config_path.write_text(yaml.safe_dump(config))

    async def start(self, *, within: float = 20.0, max_open_files: int | None = None) -> None:
        """Start the process and return once its admin port accepts connections.

        `max_open_files` sets the child's soft descriptor limit (RLIMIT_NOFILE).
        """

        def limit_files() -> None:
            if max_open_files is not None:
                _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
                resource.setrlimit(resource.RLIMIT_NOFILE, (max_open_files, hard))

        with self.log_path.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "proxy",
                "run",
                "--config",
                str(self.config_path),
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                preexec_fn=limit_files if max_open_files is not None else None,
            )
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if self.process.returncode is not None:
                raise RuntimeError(f"proxy exited with {self.process.returncode}: {self.logs()}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.admin_port)
                writer.close()
                await writer.wait_closed()
                return
            except OSError:
                await asyncio.sleep(0.05)
        raise TimeoutError(f"proxy did not start: {self.logs()}")

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    async def wait(self, within: float = 30.0) -> int:
        assert self.process is not None
        return await asyncio.wait_for(self.process.wait(), timeout=within)

    async def stop(self) -> int | None:
        if self.process is None or self.process.returncode is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return await self.wait(30)
        except TimeoutError:
            self.process.kill()
            return await self.wait(10)
