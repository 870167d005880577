"""The client matrix: which clients, which scenarios, and what is worth knowing about each.

`CLIENTS` is the single source for the parametrisation of tests/clients/test_matrix.py
and for the README table (tests/clients/matrix.py renders it from the results of a run).
A scenario a client cannot do at all is listed in `unsupported` with the reason; a cell
with something to say carries a note.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SCENARIOS: dict[str, str] = {
    "plain": "plain HTTP",
    "upload": "1 MiB upload",
    "tunnel": "HTTPS tunnel",
    "intercept": "HTTPS interception",
    "stream": "streamed response",
    "websocket": "WebSocket `ws://`",
    "websocket_tls": "WebSocket `wss://`",
}

SCENARIO_DETAILS: dict[str, str] = {
    "plain": "`GET http://inventory.test/...` through `HTTP_PROXY`: the API sees the token",
    "upload": "`POST` of 1 MiB through `HTTP_PROXY`: size and SHA-256 intact, token added",
    "tunnel": "`https://localhost:<port>` (no upstream matches it) through `HTTPS_PROXY`: "
    "an opaque CONNECT tunnel, the server's own certificate, no token",
    "intercept": "`https://inventory.test/...` through `HTTPS_PROXY`, the client trusting "
    "the proxy's CA: intercepted, token added",
    "stream": "a chunked response whose second part is sent only once the client has "
    "shown the first: nothing is buffered on the way",
    "websocket": "`ws://inventory.test/ws`: the upgrade gets the token, messages echo",
    "websocket_tls": "`wss://inventory.test/ws` through interception: the same",
}

# How a request reaches the proxy: absolute-form (`GET http://host/...`) or inside a
# CONNECT tunnel. Scenarios not listed for a client use the usual way: absolute-form for
# http:// and ws://, CONNECT for https:// and wss://.
ABSOLUTE = "absolute"
CONNECT = "connect"


@dataclass(frozen=True)
class Client:
    name: str  # the test id
    label: str  # the README's row heading
    scenarios: tuple[str, ...]
    unsupported: dict[str, str] = field(default_factory=dict)  # scenario -> why not
    cell_notes: dict[str, str] = field(default_factory=dict)  # scenario -> what to know
    via: dict[str, str] = field(default_factory=dict)  # scenario -> ABSOLUTE or CONNECT
    defects: dict[str, str] = field(default_factory=dict)  # scenario -> proxy defect (xfail)
    setup: str = ""  # how the suite points it at the proxy, for the README

    def route(self, scenario: str) -> str:
        default = CONNECT if scenario in ("tunnel", "intercept", "websocket_tls") else ABSOLUTE
        return self.via.get(scenario, default)


HTTP = ("plain", "upload", "tunnel", "intercept", "stream")
NO_WEBSOCKET = dict.fromkeys(("websocket", "websocket_tls"), "WebSockets (it has no client)")
WEBSOCKET_ONLY = dict.fromkeys(HTTP, "HTTP requests (a WebSocket client only)")

PORT_80 = (
    "sent as plain HTTP inside a CONNECT tunnel to port 80, which the proxy serves with "
    "the token: the proxy needs `connect_ports: [80, 443]`"
)

CLIENTS: tuple[Client, ...] = (
    Client(
        "curl",
        "curl",
        HTTP,
        unsupported=dict.fromkeys(
            ("websocket", "websocket_tls"), "WebSockets (not in Debian's curl 7.88)"
        ),
        setup="`http_proxy` (lower case only: it ignores `HTTP_PROXY`), `HTTPS_PROXY` or "
        "`https_proxy`; `CURL_CA_BUNDLE`. With `-p` it tunnels `http://` too, as plain "
        "HTTP in CONNECT to port 80",
    ),
    Client(
        "wget",
        "wget",
        HTTP,
        unsupported=NO_WEBSOCKET,
        setup="`http_proxy`, `https_proxy` (lower case only); `--ca-certificate` (Debian's "
        "GnuTLS build reads no `SSL_CERT_FILE`)",
    ),
    Client(
        "requests",
        "Python requests",
        HTTP,
        unsupported=NO_WEBSOCKET,
        setup="`HTTP_PROXY`, `HTTPS_PROXY`; `REQUESTS_CA_BUNDLE` (it trusts certifi's "
        "bundle, not the system store)",
    ),
    Client(
        "httpx",
        "Python httpx",
        HTTP,
        unsupported=NO_WEBSOCKET,
        setup="`HTTP_PROXY`, `HTTPS_PROXY`; `SSL_CERT_FILE`",
    ),
    Client(
        "aiohttp",
        "Python aiohttp",
        (*HTTP, "websocket", "websocket_tls"),
        cell_notes={
            "websocket": "sent as `GET ws://inventory.test/ws` with the Upgrade (absolute form), "
            "which the proxy reads as `http://`",
        },
        setup="`ClientSession(trust_env=True)` (without it no proxy variable is read): "
        "`HTTP_PROXY`, `HTTPS_PROXY`, and for WebSockets `WS_PROXY`/`WSS_PROXY` (it "
        "ignores `HTTP_PROXY` for `ws://`); `SSL_CERT_FILE`",
    ),
    Client(
        "urllib",
        "Python urllib",
        HTTP,
        unsupported=NO_WEBSOCKET,
        setup="`HTTP_PROXY`, `HTTPS_PROXY`; `SSL_CERT_FILE`",
    ),
    Client(
        "websocket-client",
        "Python websocket-client",
        ("websocket", "websocket_tls"),
        unsupported=WEBSOCKET_ONLY,
        via={"websocket": CONNECT},
        cell_notes={"websocket": PORT_80},
        setup="`http_proxy` for `ws://`, `https_proxy` for `wss://`; `SSL_CERT_FILE`",
    ),
    Client(
        "undici",
        "Node undici `EnvHttpProxyAgent`",
        (*HTTP, "websocket", "websocket_tls"),
        via={"plain": CONNECT, "upload": CONNECT, "stream": CONNECT, "websocket": CONNECT},
        cell_notes={"plain": PORT_80, "upload": PORT_80, "stream": PORT_80, "websocket": PORT_80},
        setup="`setGlobalDispatcher(new EnvHttpProxyAgent())` (`HTTP_PROXY`, `HTTPS_PROXY`), "
        "`fetch`, `new WebSocket(url, {dispatcher})`; `NODE_EXTRA_CA_CERTS`. By default "
        "(`proxyTunnel: true`) it tunnels `http://` and `ws://` with CONNECT too",
    ),
    Client(
        "undici-no-tunnel",
        "Node undici `EnvHttpProxyAgent({proxyTunnel: false})`",
        (*HTTP, "websocket", "websocket_tls"),
        setup="as above with `proxyTunnel: false`: `http://` and `ws://` go in absolute "
        "form, `https://` and `wss://` still through CONNECT",
    ),
    Client(
        "axios",
        "Node axios",
        HTTP,
        unsupported=NO_WEBSOCKET,
        setup="its defaults: it reads `HTTP_PROXY`/`HTTPS_PROXY` itself (absolute form for "
        "`http://`, CONNECT for `https://`); `NODE_EXTRA_CA_CERTS`",
    ),
    Client(
        "ws",
        "Node ws",
        ("websocket", "websocket_tls"),
        unsupported=WEBSOCKET_ONLY,
        via={"websocket": CONNECT},
        cell_notes={"websocket": PORT_80},
        setup="ws reads no proxy variable: `new WebSocket(url, {agent: new "
        "HttpsProxyAgent(proxy)})` (https-proxy-agent, which tunnels `ws://` too); "
        "`NODE_EXTRA_CA_CERTS`",
    ),
    Client(
        "java",
        "Java `java.net.http`",
        (*HTTP, "websocket", "websocket_tls"),
        via={"websocket": CONNECT},
        cell_notes={
            "tunnel": "the default `http.nonProxyHosts` (`localhost|127.*|[::1]|...`) "
            "bypasses the proxy for the suite's `localhost` target: it sets "
            "`-Dhttp.nonProxyHosts=`",
            "websocket": PORT_80,
        },
        setup="Java reads no proxy variable and no CA file: `-Dhttp.proxyHost/Port` for "
        "`http://` and `-Dhttps.proxyHost/Port` for `https://` (either alone leaves the "
        "other direct), and a trust store with the CA (`keytool -importcert`, "
        "`-Djavax.net.ssl.trustStore`). Plain `GET`s carry `Content-Length: 0`",
    ),
    Client(
        "go",
        "Go `net/http`",
        HTTP,
        unsupported=dict.fromkeys(
            ("websocket", "websocket_tls"), "WebSockets (none in the standard library)"
        ),
        cell_notes={
            "tunnel": "`http.ProxyFromEnvironment` never proxies `localhost` or loopback "
            "addresses, whatever `NO_PROXY` says: for the suite's `localhost` target the "
            "program sets `Transport.Proxy = http.ProxyURL(proxy)`",
        },
        setup="a clone of `http.DefaultTransport` (`http.ProxyFromEnvironment`: "
        "`HTTP_PROXY`, `HTTPS_PROXY`; HTTP/2 offered, HTTP/1.1 agreed); `SSL_CERT_FILE`",
    ),
)

BY_NAME = {client.name: client for client in CLIENTS}


def cases() -> list[tuple[str, str]]:
    """Every (client, scenario) the suite runs."""
    return [(client.name, scenario) for client in CLIENTS for scenario in client.scenarios]
