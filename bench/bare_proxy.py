"""A bare reverse proxy with no features: the floor of a Python data path, for comparison.

Run as `python -m bench.bare_proxy LISTEN_PORT ORIGIN_PORT`. Each client connection
gets one upstream connection of its own; httptools reads the client's requests, each
is re-sent with a static `Authorization` field added, and the origin's bytes are
relayed to the client as they come (a response parser still reads them, as a proxy
must to know where a response ends). No routing, token, limits, timeouts, hop-by-hop
handling, metrics or error answers: whatever token-proxy spends above this is the
price of those. Good for the benchmark's keep-alive GETs, not for anything else.
"""

from __future__ import annotations

import asyncio
import sys
from typing import cast

import httptools

STATIC_AUTHORIZATION = b"Authorization: Bearer bare-bench-token\r\n"


class OriginSide(asyncio.Protocol):
    """The upstream connection of one client connection: relays what the origin sends."""

    def __init__(self, client: ClientSide) -> None:
        self.client = client
        self.parser = httptools.HttpResponseParser(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.client.origin_ready(cast(asyncio.Transport, transport))

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)
        self.client.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.transport.close()


class ClientSide(asyncio.Protocol):
    """One client connection: parses its requests and sends them on, with the header."""

    def __init__(self, origin_port: int) -> None:
        self.origin_port = origin_port
        self.parser = httptools.HttpRequestParser(self)
        self.transport = cast(asyncio.Transport, None)
        self.origin: asyncio.Transport | None = None
        self.waiting: list[bytes] = []
        self.url = b""
        self.fields: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        loop = asyncio.get_running_loop()
        self.connecting = loop.create_task(self._connect(loop))

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            await loop.create_connection(lambda: OriginSide(self), "127.0.0.1", self.origin_port)
        except OSError:
            self.transport.close()

    def origin_ready(self, origin: asyncio.Transport) -> None:
        self.origin = origin
        if self.transport.is_closing():
            origin.close()
        elif self.waiting:
            origin.write(b"".join(self.waiting))
            self.waiting.clear()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.origin is not None:
            self.origin.close()

    # httptools callbacks
    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append(b"%b: %b\r\n" % (name, value))

    def on_message_complete(self) -> None:
        method = self.parser.get_method()
        head = b"%b %b HTTP/1.1\r\n%b%b\r\n" % (
            method,
            self.url,
            b"".join(self.fields),
            STATIC_AUTHORIZATION,
        )
        self.url = b""
        self.fields = []
        if self.origin is None:
            self.waiting.append(head)
        else:
            self.origin.write(head)


async def serve(listen_port: int, origin_port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: ClientSide(origin_port), "127.0.0.1", listen_port, backlog=1024
    )
    async with server:
        await server.serve_forever()


def main() -> None:
    listen_port, origin_port = int(sys.argv[1]), int(sys.argv[2])
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(listen_port, origin_port))
    else:
        uvloop.run(serve(listen_port, origin_port))


if __name__ == "__main__":
    main()
