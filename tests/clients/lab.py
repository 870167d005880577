"""The servers every client in the matrix talks to, and the proxy between them.

All of it runs in one background thread with its own event loop, for the whole test
session, on 127.0.0.1 only:

- a token endpoint (tests/support/token_server.py);
- `api`: the protected API, HTTPS with a trustme certificate, recording every request
  (tests/support/upstream.py) and refusing tokens the token endpoint did not issue;
- `outside`: an HTTPS server no upstream matches (reached as `localhost`), to test the
  opaque tunnel;
- token-proxy with one upstream, `inventory`, matching the host `inventory.test` (a name
  that resolves nowhere: proxied clients do not resolve it) and sending it to `api`
  over verified TLS; `connect_ports: [80, 443, <outside's port>]`; TLS interception
  with a generated CA.

Both servers also answer `/gated/<id>`: a first part of a chunked body, then nothing
until the test has seen the client receive that part (`release`), then the rest. A
client that delivers the body only when it is complete never sees the first part in
time; the server then gives up and closes the connection.

Clients trust `bundle`: the trustme CA (the servers' certificates) and the proxy's CA.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import ssl
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import trustme
from aiohttp import web

from proxy.app import ProxyApp
from proxy.config import TlsClientConfig, TlsInterceptConfig
from proxy.ops.metrics import Metrics
from tests.support.configs import (
    CLIENT_ID,
    CLIENT_SECRET,
    proxy_config,
    token_config,
    upstream_config,
)
from tests.support.token_server import TokenServer
from tests.support.upstream import Received, Upstream

T = TypeVar("T")

API_HOST = "inventory.test"
OUTSIDE_HOST = "localhost"
GATE_TIMEOUT = 20.0
FIRST_PART = b"a" * 1000
REST = b"b" * 100_000
GATED_BODY_SHA256 = hashlib.sha256(FIRST_PART + REST).hexdigest()


class GatedUpstream(Upstream):
    """The recording upstream, plus `/gated/<id>` (see the module docstring)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.gates: dict[str, asyncio.Event] = {}
        self.gate_outcomes: dict[str, str] = {}

    def gate(self, gate_id: str) -> asyncio.Event:
        return self.gates.setdefault(gate_id, asyncio.Event())

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if not request.path.startswith("/gated/"):
            return await super()._handle(request)
        raw_headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers]
        self.received.append(Received(request.method, request.raw_path, raw_headers))
        if self.validate is not None and not self.validate(request.headers.get("Authorization")):
            return web.json_response({"error": "invalid_token"}, status=401)
        gate_id = request.path.removeprefix("/gated/")
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(FIRST_PART)
        try:
            async with asyncio.timeout(GATE_TIMEOUT):
                await self.gate(gate_id).wait()
        except TimeoutError:
            self.gate_outcomes[gate_id] = "timeout"
            if request.transport is not None:
                request.transport.abort()
            return response
        self.gate_outcomes[gate_id] = "released"
        await response.write(REST)
        await response.write_eof()
        return response


class EofWarnings(logging.Handler):
    """Collects asyncio's `eof_received()` warnings (a closed intercepted WebSocket)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "eof_received" in message:
            self.messages.append(message)


class Lab:
    """Token endpoint, API, outside server and proxy, in a thread of their own."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ca = trustme.CA()
        self.server_ca_file = directory / "server-ca.pem"
        self.proxy_ca_file = directory / "token-proxy-ca.pem"
        self.bundle = directory / "ca-bundle.pem"
        self.upload_file = directory / "upload.bin"
        self.upload = hashlib.sha256(b"token-proxy client matrix").digest() * (1 << 15)
        self.eof_warnings = EofWarnings()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="client-lab")
        self.token_server: TokenServer
        self.api: GatedUpstream
        self.outside: GatedUpstream
        self.app: ProxyApp

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        self.ca.cert_pem.write_to_path(str(self.server_ca_file))
        self.upload_file.write_bytes(self.upload)
        self._thread.start()
        self.call(self._start())
        self.bundle.write_bytes(self.server_ca_file.read_bytes() + self.proxy_ca_file.read_bytes())
        logging.getLogger("asyncio").addHandler(self.eof_warnings)

    def stop(self) -> None:
        logging.getLogger("asyncio").removeHandler(self.eof_warnings)
        try:
            self.call(self._stop())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(30)
            self._loop.close()

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        return future.result(timeout)

    async def _start(self) -> None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
        self.token_server = TokenServer(clients={CLIENT_ID: CLIENT_SECRET})
        await self.token_server.start()

        def validate(authorization: str | None) -> bool:
            if authorization is None or not authorization.startswith("Bearer "):
                return True  # recorded, so that the test sees what arrived
            return self.token_server.is_valid(authorization.removeprefix("Bearer "))

        self.api = GatedUpstream(validate=validate)
        await self.api.start(ssl_context=context)
        self.outside = GatedUpstream()
        await self.outside.start(ssl_context=context)
        inventory = upstream_config(
            "inventory",
            [API_HOST],
            token_config(self.token_server),
            url=f"https://127.0.0.1:{self.api.port}",
            tls=TlsClientConfig(ca_file=self.server_ca_file),
        )
        config = proxy_config(
            inventory,
            connect_ports=(80, 443, self.outside.port),
            tls_intercept=TlsInterceptConfig(write_ca_cert_to=self.proxy_ca_file),
        )
        self.app = ProxyApp(config, metrics=Metrics())
        await self.app.start()

    async def _stop(self) -> None:
        await self.app.shutdown()
        await self.api.close()
        await self.outside.close()
        await self.token_server.close()

    # -- what the tests read and do ----------------------------------------------------

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.app.port}"

    def release(self, server: GatedUpstream, gate_id: str) -> None:
        """Let `/gated/<gate_id>` send the rest of its body."""
        self._loop.call_soon_threadsafe(lambda: server.gate(gate_id).set())

    def tokens(self) -> list[str]:
        return list(self.token_server.issued)

    def metric(self, name: str, **labels: str) -> float:
        return self.app.metrics.registry.get_sample_value(name, labels) or 0.0

    def tunnels(self, upstream: str, outcome: str) -> float:
        return self.metric("token_proxy_tunnels_total", upstream=upstream, outcome=outcome)

    def client_connections(self) -> float:
        return self.metric("token_proxy_client_connections")
