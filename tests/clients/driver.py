"""Running a client program and talking to it one scenario at a time.

A client program (tests/clients/programs/) reads one JSON scenario per stdin line and
answers with one JSON line that has `"result": true`; while it streams a body it first
prints `{"event": "first", ...}` as soon as the first bytes arrived, and the test then
lets the server send the rest. One process serves all of a client's scenarios, so a
JVM or Node.js starts once per session, not once per test.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tests.clients.lab import Lab

SCENARIO_TIMEOUT = 60.0
START_TIMEOUT = 60.0  # a JVM compiling the program on a busy machine

_PROXY_VARIABLES = {"http_proxy", "https_proxy", "all_proxy", "no_proxy", "ws_proxy", "wss_proxy"}
_TRUST_VARIABLES = {
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "NODE_EXTRA_CA_CERTS",
    "WEBSOCKET_CLIENT_CA_BUNDLE",
    "JAVA_TOOL_OPTIONS",
    "NODE_OPTIONS",
    "NODE_USE_ENV_PROXY",
}

OnFirst = Callable[[], None]


def base_environment() -> dict[str, str]:
    """This process's environment without any proxy or CA-trust settings."""
    return {
        key: value
        for key, value in os.environ.items()
        if key.lower() not in _PROXY_VARIABLES and key not in _TRUST_VARIABLES
    }


def client_environment(lab: Lab, **extra: str) -> dict[str, str]:
    """Proxy variables in both cases (as the deploy files set them), CA trust for every
    client that reads it from the environment, nothing that bypasses the proxy."""
    env = base_environment()
    for name in ("http_proxy", "https_proxy"):
        env[name] = env[name.upper()] = lab.proxy_url
    for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS"):
        env[name] = str(lab.bundle)
    env.update(extra)
    return env


class ClientError(AssertionError):
    """The client program misbehaved (died, said nothing in time)."""


class ClientProcess:
    """A running client program that serves scenarios one at a time."""

    def __init__(
        self, name: str, command: Sequence[str], env: Mapping[str, str], cwd: Path
    ) -> None:
        self.name = name
        self._process = subprocess.Popen(
            list(command),
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._stderr: list[str] = []
        self._started = False
        self._readers = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read_stdout(self) -> None:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _read_stderr(self) -> None:
        assert self._process.stderr is not None
        for line in self._process.stderr:
            if len(self._stderr) < 200:
                self._stderr.append(line)

    def stderr(self) -> str:
        return "".join(self._stderr[-40:])

    def run(self, scenario: Mapping[str, Any], on_first: OnFirst | None = None) -> dict[str, Any]:
        """Send one scenario and return the program's result for it."""
        assert self._process.stdin is not None
        timeout = SCENARIO_TIMEOUT + (0 if self._started else START_TIMEOUT)
        self._started = True
        try:
            self._process.stdin.write(json.dumps(dict(scenario)) + "\n")
            self._process.stdin.flush()
        except BrokenPipeError:
            raise ClientError(f"{self.name} is gone:\n{self.stderr()}") from None
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise ClientError(
                    f"{self.name} gave no result for {scenario['scenario']} within "
                    f"{timeout:.0f}s:\n{self.stderr()}"
                ) from None
            if line is None:
                raise ClientError(f"{self.name} exited:\n{self.stderr()}")
            try:
                document = json.loads(line)
            except json.JSONDecodeError:
                continue  # a library's own chatter on stdout
            if document.get("event") == "first" and on_first is not None:
                on_first()
            if document.get("result"):
                return dict(document)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            assert self._process.stdin is not None
            self._process.stdin.close()
        try:
            self._process.wait(15)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(15)
        for reader in self._readers:
            reader.join(15)
        for pipe in (self._process.stdout, self._process.stderr):
            if pipe is not None:
                pipe.close()


def run_command(
    command: Sequence[str],
    env: Mapping[str, str],
    *,
    on_first: OnFirst | None = None,
    timeout: float = SCENARIO_TIMEOUT,
) -> tuple[int, bytes, str]:
    """Run a command-line client; `on_first` is called once its stdout has its first bytes.

    Returns the exit code, everything written to stdout and the end of stderr."""
    with subprocess.Popen(
        list(command), env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as process:
        timer = threading.Timer(timeout, process.kill)
        timer.start()
        try:
            assert process.stdout is not None
            assert process.stderr is not None
            output = bytearray()
            while data := os.read(process.stdout.fileno(), 65536):
                if not output and on_first is not None:
                    on_first()
                output += data
            errors = process.stderr.read().decode(errors="replace")
            code = process.wait()
        finally:
            timer.cancel()
    return code, bytes(output), errors[-4000:]
