"""An HTTPS API on 127.0.0.1 that speaks only HTTP/2 (ALPN h2), written with h2 on an
asyncio server: every request is answered 200 with JSON describing what arrived
(method, path, the `authorization` field, the body's size), and recorded."""

from __future__ import annotations

import asyncio
import json
import ssl
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import trustme


@dataclass
class H2Request:
    method: str
    path: str
    headers: dict[str, str]
    body_size: int = 0


@dataclass
class H2Upstream:
    received: list[H2Request] = field(default_factory=list)
    port: int = 0
    _server: asyncio.Server | None = None

    async def start(self, ca: trustme.CA) -> None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("localhost", "127.0.0.1").configure_cert(context)
        context.set_alpn_protocols(["h2"])
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=context)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        )
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        requests: dict[int, H2Request] = {}
        try:
            while data := await reader.read(65536):
                for event in conn.receive_data(data):
                    stream_id = getattr(event, "stream_id", 0) or 0
                    if isinstance(event, h2.events.RequestReceived):
                        headers = dict(event.headers or [])  # type: ignore[arg-type]
                        requests[stream_id] = H2Request(
                            headers.pop(":method"), headers.pop(":path"), headers
                        )
                    elif isinstance(event, h2.events.DataReceived):
                        requests[stream_id].body_size += len(event.data or b"")
                        conn.acknowledge_received_data(event.flow_controlled_length or 0, stream_id)
                    if getattr(event, "stream_ended", None) is not None or isinstance(
                        event, h2.events.StreamEnded
                    ):
                        request = requests.pop(stream_id, None)
                        if request is not None:
                            self._answer(conn, stream_id, request)
                writer.write(conn.data_to_send())
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    def _answer(self, conn: h2.connection.H2Connection, stream_id: int, request: H2Request) -> None:
        self.received.append(request)
        body = json.dumps(
            {
                "method": request.method,
                "path": request.path,
                "authorization": request.headers.get("authorization"),
                "body_size": request.body_size,
            }
        ).encode()
        conn.send_headers(
            stream_id,
            [
                (":status", "200"),
                ("content-type", "application/json"),
                ("content-length", str(len(body))),
            ],
        )
        conn.send_data(stream_id, body, end_stream=True)
