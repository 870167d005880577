"""A real `redis-server` on a free loopback port, and misbehaving look-alikes.

`RedisServer` runs Debian's redis-server (installed on demand by `tests.support.tools`)
as a child process: no persistence, bound to 127.0.0.1, optionally with a password.
Tests stop, kill and restart it on the same port, and read everything it holds with
`dump()` (what ``redis-cli --scan`` and ``GET`` show).

`SilentServer` accepts connections and never answers (a Redis that hangs);
`ErrorServer` answers every command with one error reply, such as a cluster node's
``-MOVED``: what a proxy pointed at the wrong kind of Redis sees.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from pathlib import Path

import redis.asyncio as aioredis

from tests.support import tools
from tests.support.process import free_port

__all__ = ["ErrorServer", "RedisServer", "SilentServer"]


class RedisServer:
    """redis-server in a child process on 127.0.0.1:`port`."""

    def __init__(self, directory: Path, *, password: str | None = None) -> None:
        self.tools = tools.redis()
        self.directory = directory
        self.password = password
        self.port = free_port()
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self, within: float = 10.0) -> None:
        command = [
            str(self.tools.server),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.directory),
            "--logfile",
            str(self.directory / "redis.log"),
        ]
        if self.password is not None:
            command += ["--requirepass", self.password]
        self.process = await asyncio.create_subprocess_exec(*command, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + within
        while True:
            if self.process.returncode is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}")
            with contextlib.suppress(OSError, aioredis.RedisError):
                client = self.client()
                try:
                    if await client.ping():
                        return
                finally:
                    await client.aclose()
            if time.monotonic() > deadline:
                raise TimeoutError("redis-server did not answer")
            await asyncio.sleep(0.02)

    def client(self) -> aioredis.Redis:
        """A client of the test's own (never the proxy's)."""
        return aioredis.Redis(
            host="127.0.0.1", port=self.port, password=self.password, socket_timeout=5
        )

    async def stop(self) -> None:
        """Stop the server (SIGKILL: no goodbye to connected clients)."""
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await asyncio.wait_for(self.process.wait(), 10)
        self.process = None

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    async def dump(self) -> dict[bytes, bytes]:
        """Every key and its value (strings only: that is all the cache writes)."""
        client = self.client()
        try:
            return {key: await client.get(key) async for key in client.scan_iter(count=1000)}
        finally:
            await client.aclose()

    async def cli(self, *arguments: str) -> str:
        """`redis-cli` against this server (for what a person would look at)."""
        command = [str(self.tools.cli), "-h", "127.0.0.1", "-p", str(self.port)]
        if self.password is not None:
            command += ["--no-auth-warning", "-a", self.password]
        process = await asyncio.create_subprocess_exec(
            *command, *arguments, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        stdout, stderr = await process.communicate()
        assert process.returncode == 0, stderr.decode()
        return stdout.decode(errors="replace")

    async def __aenter__(self) -> RedisServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


class _RawServer:
    def __init__(self) -> None:
        self._server: asyncio.Server | None = None
        self.connections = 0
        self._writers: list[asyncio.StreamWriter] = []

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            await self._serve(reader, writer)

    async def __aenter__(self) -> _RawServer:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        await self._server.wait_closed()


class SilentServer(_RawServer):
    """Accepts, reads, never answers: a Redis that hangs."""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(65536):
            pass


class ErrorServer(_RawServer):
    """Answers every RESP command with the error reply `error` (e.g. ``MOVED 1 h:1``)."""

    def __init__(self, error: str) -> None:
        super().__init__()
        self.error = error

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            line = await reader.readline()
            if not line:
                return
            if not line.startswith(b"*"):
                continue
            for _ in range(int(line[1:])):
                size = await reader.readline()  # $<n>
                await reader.readexactly(int(size[1:]) + 2)
            writer.write(f"-{self.error}\r\n".encode())
            await writer.drain()
