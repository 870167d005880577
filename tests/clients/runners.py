"""How each client in the matrix is started and given a scenario.

Every runner takes a scenario (a dict with at least `scenario` and `url`) and returns the
client's result as a dict: `status` and `body` for a plain exchange, `status`, `size` and
`sha256` for a stream, `greeting` and `echo` for a WebSocket, or `error`. Program-based
runners keep one process per client for the session; curl and wget run once per scenario.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from tests.clients.driver import ClientProcess, OnFirst, client_environment, run_command
from tests.clients.lab import Lab
from tests.support import clients as installers

PROGRAMS = Path(__file__).parent / "programs"
STORE_PASSWORD = "changeit"


class Runner(Protocol):
    def run(self, scenario: Mapping[str, Any], on_first: OnFirst | None = None) -> dict[str, Any]:
        """One scenario's result."""

    def close(self) -> None:
        """Stop whatever the runner started."""


class Curl:
    def __init__(self, lab: Lab) -> None:
        self.binary = str(installers.curl())
        self.env = client_environment(lab)

    def run(self, scenario: Mapping[str, Any], on_first: OnFirst | None = None) -> dict[str, Any]:
        command = [self.binary, "-sS", "-N", "-w", "%{stderr}\nstatus=%{http_code}\n"]
        if scenario["scenario"] == "upload":
            command += ["-H", "Content-Type: application/octet-stream"]
            command += ["--data-binary", f"@{scenario['file']}"]
        code, output, errors = run_command([*command, scenario["url"]], self.env, on_first=on_first)
        return _cli_result(scenario, code, output, errors, r"status=(\d+)")

    def close(self) -> None:
        pass


class Wget:
    def __init__(self, lab: Lab) -> None:
        self.binary = str(installers.wget())
        self.env = client_environment(lab)
        self.bundle = str(lab.bundle)

    def run(self, scenario: Mapping[str, Any], on_first: OnFirst | None = None) -> dict[str, Any]:
        command = [self.binary, "--no-verbose", "--server-response", "--tries=1", "-O", "-"]
        command.append(f"--ca-certificate={self.bundle}")
        if scenario["scenario"] == "upload":
            command += ["--header=Content-Type: application/octet-stream"]
            command += [f"--post-file={scenario['file']}"]
        code, output, errors = run_command([*command, scenario["url"]], self.env, on_first=on_first)
        return _cli_result(scenario, code, output, errors, r"HTTP/1\.1 (\d+)")

    def close(self) -> None:
        pass


def _cli_result(
    scenario: Mapping[str, Any], code: int, output: bytes, errors: str, status_pattern: str
) -> dict[str, Any]:
    statuses = re.findall(status_pattern, errors)
    if code != 0 or not statuses:
        return {"error": f"exit {code}: {errors}"}
    status = int(statuses[-1])
    if scenario["scenario"] == "stream":
        return {"status": status, "size": len(output), "sha256": hashlib.sha256(output).hexdigest()}
    return {"status": status, "body": output.decode(errors="replace")}


class Program:
    """A client program from tests/clients/programs/, one process for the session."""

    def __init__(self, name: str, command: list[str], env: Mapping[str, str], cwd: Path) -> None:
        self.process = ClientProcess(name, command, env, cwd)

    def run(self, scenario: Mapping[str, Any], on_first: OnFirst | None = None) -> dict[str, Any]:
        return self.process.run(scenario, on_first)

    def close(self) -> None:
        self.process.close()


def python_program(lab: Lab, library: str, directory: Path) -> Program:
    if library == "httpx":
        installers.python_module("httpx", "httpx")
    if library == "websocket-client":
        installers.python_module("websocket", "websocket-client")
    extra = {}
    if library == "aiohttp":
        # aiohttp takes a WebSocket's proxy from ws_proxy/wss_proxy, not http(s)_proxy.
        extra = {"WS_PROXY": lab.proxy_url, "WSS_PROXY": lab.proxy_url}
    command = [sys.executable, str(PROGRAMS / "python_client.py"), library]
    return Program(library, command, client_environment(lab, **extra), directory)


def node_program(lab: Lab, client: str, directory: Path) -> Program:
    node = installers.node()
    modules = installers.node_modules()
    # ES modules find packages only in a node_modules folder beside or above the script.
    work = directory / "node"
    if not work.exists():
        work.mkdir()
        (work / "node_modules").symlink_to(modules, target_is_directory=True)
        shutil.copy(PROGRAMS / "node_client.mjs", work / "node_client.mjs")
    command = [str(node), "node_client.mjs", client]
    return Program(client, command, client_environment(lab), work)


def java_program(lab: Lab, directory: Path) -> Program:
    java = installers.java()
    keytool = installers.keytool()
    store = directory / "truststore.p12"
    if not store.exists():
        for alias, pem in (("servers", lab.server_ca_file), ("token-proxy", lab.proxy_ca_file)):
            code, _, errors = run_command(
                [
                    str(keytool),
                    "-importcert",
                    "-noprompt",
                    "-alias",
                    alias,
                    "-file",
                    str(pem),
                    "-keystore",
                    str(store),
                    "-storetype",
                    "PKCS12",
                    "-storepass",
                    STORE_PASSWORD,
                ],
                client_environment(lab),
            )
            assert code == 0, errors
    port = str(lab.app.port)
    command = [
        str(java),
        "-Dhttp.proxyHost=127.0.0.1",
        f"-Dhttp.proxyPort={port}",
        "-Dhttps.proxyHost=127.0.0.1",
        f"-Dhttps.proxyPort={port}",
        # The default, localhost|127.*|[::1]|0.0.0.0|[::0], would bypass the proxy for
        # the tunnel target (localhost); an application calling only real hosts keeps it.
        "-Dhttp.nonProxyHosts=",
        f"-Djavax.net.ssl.trustStore={store}",
        f"-Djavax.net.ssl.trustStorePassword={STORE_PASSWORD}",
        str(PROGRAMS / "JavaClient.java"),
    ]
    return Program("java", command, client_environment(lab), directory)


def go_program(lab: Lab, directory: Path) -> Program:
    binary = installers.go_program((PROGRAMS / "go_client.go").read_text(), "go-client")
    return Program("go", [str(binary)], client_environment(lab), directory)


def start(client: str, lab: Lab, directory: Path) -> Runner:
    """The runner for `client`; raises installers.ToolUnavailable when it cannot be had."""
    if client == "curl":
        return Curl(lab)
    if client == "wget":
        return Wget(lab)
    if client in ("requests", "httpx", "aiohttp", "urllib", "websocket-client"):
        return python_program(lab, client, directory)
    if client in ("undici", "undici-no-tunnel", "axios", "ws"):
        return node_program(lab, client, directory)
    if client == "java":
        return java_program(lab, directory)
    if client == "go":
        return go_program(lab, directory)
    raise ValueError(client)
