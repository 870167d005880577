"""A real upstream API on 127.0.0.1 that records exactly what reached it.

Routes:
- any path: answers JSON describing the request (method, raw path, raw headers, body size);
- `/status/{code}`: answers that status;
- `/redirect`: 302 to another host; `/cookie`: sets a cookie; `/gzip`: a gzip-encoded body;
- `/stream/{n}`: n bytes, chunked; `/sized/{n}`: n bytes with Content-Length;
- `/upload`: reads the body in a streaming way and answers its size and a checksum;
- `/slow/{seconds}`: waits before answering; `/ws`: a WebSocket echo.
If a `validate` callback is set, requests whose Authorization it rejects get 401 (or
`refusal_status`). Given a `DpopAuthority` (`dpop`), it checks `Authorization: DPoP`
requests and their proofs first (RFC 9449 §7), with `dpop_origin` the scheme and
authority their `htu` must name (default: this server's own); see
tests/support/dpop_servers.py.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import WSMsgType, web

from tests.support.dpop_servers import DpopAuthority, DpopRefusal, add_dpop_response_headers

CHUNK = 64 * 1024


@dataclass
class Received:
    """One request as the upstream saw it."""

    method: str
    path: str  # raw, as on the wire
    headers: list[tuple[str, str]]
    body_size: int = 0
    peer: str = ""

    def header(self, name: str) -> str | None:
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


@dataclass
class Upstream:
    """A recording upstream API server."""

    validate: Callable[[str | None], bool] | None = None
    refusal_status: int = 401
    received: list[Received] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    dpop: DpopAuthority | None = None
    dpop_origin: str | None = None  # e.g. "https://inventory.test"
    _runner: web.AppRunner | None = None
    port: int = 0
    _scheme: str = "http"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> Upstream:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self, port: int = 0, ssl_context: object = None) -> None:
        app = web.Application(client_max_size=2**40)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        app.on_response_prepare.append(add_dpop_response_headers)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port, ssl_context=ssl_context)  # type: ignore[arg-type]
        await site.start()
        self.port = self._runner.addresses[0][1]
        self._scheme = "https" if ssl_context is not None else "http"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def last(self) -> Received:
        assert self.received, "the upstream received nothing"
        return self.received[-1]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw_headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers]
        peer = request.transport.get_extra_info("peername") if request.transport else None
        record = Received(request.method, request.raw_path, raw_headers, peer=str(peer))
        self.received.append(record)
        checked = None
        if self.dpop is not None:
            origin = self.dpop_origin or f"{self._scheme}://127.0.0.1:{self.port}"
            checked = self.dpop.check_resource_request(request, origin)
            if isinstance(checked, DpopRefusal):
                return checked.response()
        if (
            checked is None
            and self.validate is not None
            and not self.validate(request.headers.get("Authorization"))
        ):
            return web.json_response({"error": "invalid_token"}, status=self.refusal_status)
        path = request.path
        if path == "/ws":
            return await self._websocket(request)
        if path == "/upload":
            digest = hashlib.sha256()
            async for data in request.content.iter_chunked(CHUNK):
                digest.update(data)
                record.body_size += len(data)
            return web.json_response({"size": record.body_size, "sha256": digest.hexdigest()})
        body = await request.read()
        record.body_size = len(body)
        if path.startswith("/status/"):
            return web.Response(status=int(path.rsplit("/", 1)[1]), text="status")
        if path == "/redirect":
            raise web.HTTPFound("http://elsewhere.example/landing")
        if path == "/cookie":
            response = web.Response(text="cookie")
            response.set_cookie("session", "abc123")
            return response
        if path == "/gzip":
            return web.Response(
                body=gzip.compress(b"hello " * 100),
                headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"},
            )
        if path.startswith("/sized/"):
            size = int(path.rsplit("/", 1)[1])
            return web.Response(body=b"x" * size)
        if path.startswith("/stream/"):
            return await self._stream(request, int(path.rsplit("/", 1)[1]))
        if path.startswith("/slow/"):
            await self.release.wait()
            return web.Response(text="finally")
        return web.json_response(
            {
                "method": request.method,
                "path": request.raw_path,
                "headers": raw_headers,
                "body": body.decode("latin-1"),
            }
        )

    async def _stream(self, request: web.Request, size: int) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        block = b"y" * CHUNK
        sent = 0
        while sent < size:
            part = block[: min(CHUNK, size - sent)]
            await response.write(part)
            sent += len(part)
        await response.write_eof()
        return response

    async def _websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str(json.dumps({"authorization": request.headers.get("Authorization")}))
        async for message in ws:
            if message.type == WSMsgType.TEXT:
                await ws.send_str("echo:" + message.data)
            elif message.type == WSMsgType.BINARY:
                await ws.send_bytes(message.data)
        return ws
