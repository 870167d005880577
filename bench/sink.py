"""The upload sink: an HTTP server that reads request bodies, counts them and drops them.

Run as `python -m bench.sink PORT`. It answers only once the whole body has arrived
(so a client's upload time covers the full transfer), with the byte count as the
body, and 401 when the request carries no bearer token. An asyncio protocol with
httptools' C parser keeps it far faster than the proxies it is measured through.
"""

from __future__ import annotations

import asyncio
import sys
from typing import cast

import httptools


class SinkConnection(asyncio.Protocol):
    """One client connection to the sink; keep-alive, requests answered in order."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._received = 0
        self._authorized = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            assert self._transport is not None
            self._transport.close()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._received = 0
        self._authorized = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"authorization" and value.startswith(b"Bearer "):
            self._authorized = True

    def on_body(self, body: bytes) -> None:
        self._received += len(body)

    def on_message_complete(self) -> None:
        assert self._transport is not None
        status = b"200 OK" if self._authorized else b"401 Unauthorized"
        text = str(self._received).encode()
        self._transport.write(
            b"HTTP/1.1 %s\r\nContent-Length: %d\r\n\r\n%s" % (status, len(text), text)
        )


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(SinkConnection, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    port = int(sys.argv[1])
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(port))
    else:
        uvloop.run(serve(port))


if __name__ == "__main__":
    main()
