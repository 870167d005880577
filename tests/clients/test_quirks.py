"""Client behaviours the README's matrix notes warn about, and proxy answers clients rely on.

The quirk tests run a client the way a user who missed the note would, and check where
the request really went: to the proxy, or past it. The others check, with real clients,
what the proxy answers an HTTP/2 preface and that closing an intercepted WebSocket
leaves nothing in the log.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable

import pytest

from tests.clients.driver import ClientProcess, base_environment, client_environment, run_command
from tests.clients.lab import API_HOST, OUTSIDE_HOST, Lab
from tests.clients.runners import PROGRAMS, Runner
from tests.support import clients as installers
from tests.support.process import free_port

# A test may install its client (apt-get, npm) before it runs.
pytestmark = pytest.mark.timeout(installers.INSTALL_TIMEOUT_SECONDS + 120)


def api_paths(lab: Lab) -> list[str]:
    return [record.path for record in lab.api.received]


@pytest.mark.parametrize("client", ["curl", "wget"])
def test_curl_and_wget_ignore_an_upper_case_http_proxy(client: str, lab: Lab) -> None:
    try:
        binary = installers.curl() if client == "curl" else installers.wget()
    except installers.ToolUnavailable as exc:
        pytest.skip(f"{client} is not available here: {exc}")
    env = base_environment()
    env["HTTP_PROXY"] = lab.proxy_url  # upper case only
    path = f"/api/upper-case-{client}"
    code, _, errors = run_command([str(binary), f"http://{API_HOST}{path}"], env)
    # It went straight for inventory.test (a name that resolves nowhere), not to the proxy.
    assert code != 0, errors
    assert path not in api_paths(lab)


def test_go_proxy_from_environment_never_proxies_localhost(
    lab: Lab, runners: Callable[[str], Runner]
) -> None:
    runner = runners("go")
    opened = lab.tunnels("unmatched", "opened")
    path = "/api/go-from-environment"
    url = f"https://{OUTSIDE_HOST}:{lab.outside.port}{path}"
    result = runner.run({"scenario": "tunnel", "url": url})  # no "proxy": the env's proxy
    assert result.get("status") == 200, result
    # It reached the server directly: no tunnel through the proxy.
    assert [record.path for record in lab.outside.received].count(path) == 1
    assert lab.tunnels("unmatched", "opened") == opened


def test_java_bypasses_the_proxy_for_localhost_by_default(lab: Lab) -> None:
    try:
        java = installers.java()
    except installers.ToolUnavailable as exc:
        pytest.skip(f"java is not available here: {exc}")
    port = str(lab.app.port)
    # Only the proxy; no http.nonProxyHosts, so its default (localhost|127.*|...) applies.
    command = [
        str(java),
        "-Dhttp.proxyHost=127.0.0.1",
        f"-Dhttp.proxyPort={port}",
        str(PROGRAMS / "JavaClient.java"),
    ]
    process = ClientProcess("java", command, client_environment(lab), PROGRAMS)
    url = f"http://localhost:{free_port()}/api/java-direct"  # nothing listens there
    try:
        result = process.run({"scenario": "plain", "url": url})
    finally:
        process.close()
    # Through the proxy it would have had the proxy's 502; it connected itself instead.
    assert "ConnectException" in result.get("error", ""), result


def test_aiohttp_takes_a_websockets_proxy_from_ws_proxy_only(lab: Lab) -> None:
    env = client_environment(lab)  # http(s)_proxy, but no ws_proxy
    command = [sys.executable, str(PROGRAMS / "python_client.py"), "aiohttp"]
    process = ClientProcess("aiohttp", command, env, PROGRAMS)
    path = "/ws?client=aiohttp-without-ws-proxy"
    try:
        result = process.run({"scenario": "websocket", "url": f"ws://{API_HOST}{path}"})
    finally:
        process.close()
    assert "ClientConnectorDNSError" in result.get("error", ""), result
    assert path not in api_paths(lab)


def test_http2_prior_knowledge_gets_a_goaway_that_says_why(lab: Lab) -> None:
    """gRPC and `--http2-prior-knowledge` clients start with the HTTP/2 preface."""
    try:
        node = installers.node()
    except installers.ToolUnavailable as exc:
        pytest.skip(f"node is not available here: {exc}")
    script = """
        const http2 = require('node:http2')
        const session = http2.connect(process.argv[1])
        session.on('goaway', (code, lastStreamId, data) => {
          console.log(JSON.stringify({ code, lastStreamId, data: data.toString() }))
          session.destroy()
        })
        session.on('error', () => {})
        session.request({ ':path': '/api/h2' }).on('error', () => {}).end()
    """
    code, output, errors = run_command(
        [str(node), "-e", script, lab.proxy_url], base_environment(), timeout=30
    )
    assert code == 0, errors
    assert json.loads(output) == {
        "code": 13,  # HTTP_1_1_REQUIRED
        "lastStreamId": 0,
        "data": "HTTP/2 is not supported on this port; use HTTP/1.1",
    }
    assert "/api/h2" not in api_paths(lab)


def test_curl_with_http2_prior_knowledge_gets_http_1_1_required(lab: Lab) -> None:
    try:
        curl = installers.curl()
    except installers.ToolUnavailable as exc:
        pytest.skip(f"curl is not available here: {exc}")
    code, _, errors = run_command(
        [str(curl), "-sSv", "--http2-prior-knowledge", f"{lab.proxy_url}/api/h2-curl"],
        base_environment(),
        timeout=30,
    )
    # curl 7.88 ends with a generic "Error in the HTTP2 framing layer"; -v shows the code.
    assert code != 0
    assert "GOAWAY, error=13" in errors, errors  # HTTP_1_1_REQUIRED
    assert "/api/h2-curl" not in api_paths(lab)


def test_a_closed_intercepted_websocket_logs_no_asyncio_warnings(lab: Lab) -> None:
    try:
        installers.python_module("websocket", "websocket-client")
    except installers.ToolUnavailable as exc:
        pytest.skip(f"websocket-client is not available here: {exc}")
    connections = lab.client_connections()
    command = [sys.executable, str(PROGRAMS / "python_client.py"), "websocket-client"]
    process = ClientProcess("websocket-client", command, client_environment(lab), PROGRAMS)
    try:
        for index in range(3):
            url = f"wss://{API_HOST}/ws?client=closing-{index}"
            result = process.run({"scenario": "websocket_tls", "url": url})
            assert result.get("echo") == "echo:hello", result
    finally:
        process.close()
    # The client is gone; wait until the proxy has seen every one of its connections end.
    deadline = time.monotonic() + 15
    while lab.client_connections() > connections:
        assert time.monotonic() < deadline, "the proxy kept the closed connections open"
        time.sleep(0.05)
    assert lab.eof_warnings.messages == []
