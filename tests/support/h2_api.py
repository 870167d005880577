"""An HTTPS API on 127.0.0.1 that offers h2 (and, if asked, http/1.1) in ALPN and
answers in whichever protocol the client chose, written with h2 (and h11).

Each request is recorded (`received`: the protocol, method, path, fields, the body's
size and SHA-256) and answered:

* 401 with a `WWW-Authenticate` challenge when `refuse(authorization)` says so;
* with `dpop_nonce` set, 401 `use_dpop_nonce` (RFC 9449 §9) to a DPoP request whose
  proof does not carry that nonce (the proof is read, not verified: tests/support/dpop.py
  is the strict verifier);
* `GET /download/<n>` (HTTP/2 only): `n` bytes in DATA frames without `content-length`,
  sent as the proxy's flow-control window allows; `sent` counts them and `blocked`
  tells whether the sender waits for a WINDOW_UPDATE now;
* `/trailers` (HTTP/2 only): the JSON below announced in a `trailer` field and followed
  by an `x-checksum` trailer;
* anything else: 200 with JSON describing what arrived, with `content-length`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h11
import trustme

from tests.support.certificates import server_context

DOWNLOAD = "/download/"
TRAILERS = "/trailers"
_PIECE = b"d" * 16384


@dataclass
class ApiRequest:
    protocol: str  # "h2" or "http/1.1"
    method: str
    path: str
    headers: dict[str, str]
    body: hashlib._Hash = field(default_factory=hashlib.sha256)
    body_size: int = 0

    def describe(self) -> bytes:
        return json.dumps(
            {
                "protocol": self.protocol,
                "method": self.method,
                "path": self.path,
                "authorization": self.headers.get("authorization"),
                "body_size": self.body_size,
                "body_sha256": self.body.hexdigest(),
            }
        ).encode()


@dataclass
class H2Api:
    alpn: tuple[str, ...] = ("h2",)
    refuse: Callable[[str | None], bool] = lambda _: False
    dpop_nonce: str | None = None
    received: list[ApiRequest] = field(default_factory=list)
    sent: int = 0  # download bytes sent
    blocked: bool = False  # a download waits for the peer's window
    port: int = 0
    _server: asyncio.Server | None = None

    async def start(self, ca: trustme.CA, *, client_ca: trustme.CA | None = None) -> None:
        """Listen with a certificate `ca` signed; with `client_ca`, clients must present
        a certificate it signed (mutual TLS)."""
        context = server_context(ca, client_ca=client_ca)
        context.set_alpn_protocols(list(self.alpn))
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=context)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def _answer_for(self, request: ApiRequest) -> tuple[int, bytes]:
        self.received.append(request)
        if self.refuse(request.headers.get("authorization")):
            return 401, b'{"error": "invalid_token"}'
        if self.dpop_nonce is not None and _proof_nonce(request) != self.dpop_nonce:
            return 401, b'{"error": "use_dpop_nonce"}'
        return 200, request.describe()

    def challenge(self, body: bytes) -> list[tuple[str, str]]:
        """The fields of a 401 `_answer_for` gave with `body`."""
        if b"use_dpop_nonce" in body and self.dpop_nonce is not None:
            return [
                ("www-authenticate", 'DPoP error="use_dpop_nonce"'),
                ("dpop-nonce", self.dpop_nonce),
            ]
        return [("www-authenticate", 'Bearer error="invalid_token"')]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ssl_object = writer.get_extra_info("ssl_object")
        try:
            if ssl_object is not None and ssl_object.selected_alpn_protocol() == "h2":
                await _Http2Session(self, reader, writer).run()
            else:
                await self._serve_http11(reader, writer)
        except (ConnectionError, ssl.SSLError, h11.RemoteProtocolError):
            pass
        finally:
            writer.close()

    async def _serve_http11(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        conn = h11.Connection(h11.SERVER)
        request: ApiRequest | None = None
        for _ in range(100_000):
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(65536)
                conn.receive_data(data)
                if not data:
                    return
            elif isinstance(event, h11.Request):
                headers = {k.decode().lower(): v.decode() for k, v in event.headers}
                request = ApiRequest(
                    "http/1.1", event.method.decode(), event.target.decode(), headers
                )
            elif isinstance(event, h11.Data) and request is not None:
                request.body.update(event.data)
                request.body_size += len(event.data)
            elif isinstance(event, h11.EndOfMessage) and request is not None:
                status, body = self._answer_for(request)
                fields = [("content-type", "application/json"), ("content-length", str(len(body)))]
                writer.write(conn.send(h11.Response(status_code=status, headers=fields)) or b"")
                writer.write(conn.send(h11.Data(data=body)) or b"")
                writer.write(conn.send(h11.EndOfMessage()) or b"")
                await writer.drain()
                conn.start_next_cycle()
                request = None
            elif isinstance(event, h11.ConnectionClosed):
                return


def _proof_nonce(request: ApiRequest) -> str | None:
    proof = request.headers.get("dpop")
    if proof is None or proof.count(".") != 2:
        return None
    payload = proof.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    nonce = claims.get("nonce")
    return nonce if isinstance(nonce, str) else None


class _Http2Session:
    def __init__(
        self, api: H2Api, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.api = api
        self.reader = reader
        self.writer = writer
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        )
        self.window = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        conn = self.conn
        conn.initiate_connection()
        self.writer.write(conn.data_to_send())
        requests: dict[int, ApiRequest] = {}
        try:
            while data := await self.reader.read(65536):
                for event in conn.receive_data(data):
                    stream_id = getattr(event, "stream_id", 0) or 0
                    if isinstance(event, h2.events.RequestReceived):
                        headers = dict(event.headers or [])  # type: ignore[arg-type]
                        requests[stream_id] = ApiRequest(
                            "h2", headers.pop(":method"), headers.pop(":path"), headers
                        )
                    elif isinstance(event, h2.events.DataReceived):
                        request = requests[stream_id]
                        request.body.update(event.data or b"")
                        request.body_size += len(event.data or b"")
                        conn.acknowledge_received_data(event.flow_controlled_length or 0, stream_id)
                    elif isinstance(event, h2.events.WindowUpdated):
                        self.window.set()
                    elif isinstance(event, h2.events.StreamReset):
                        requests.pop(stream_id, None)
                    if isinstance(event, h2.events.StreamEnded) or (
                        isinstance(event, h2.events.RequestReceived)
                        and event.stream_ended is not None
                    ):
                        request = requests.pop(stream_id, None)
                        if request is not None:
                            self._answer(stream_id, request)
                self.writer.write(conn.data_to_send())
        finally:
            for task in self.tasks:
                task.cancel()

    def _answer(self, stream_id: int, request: ApiRequest) -> None:
        status, body = self.api._answer_for(request)
        conn = self.conn
        if status == 200 and request.path.startswith(DOWNLOAD):
            conn.send_headers(stream_id, [(":status", "200"), ("content-type", "text/plain")])
            task = asyncio.get_running_loop().create_task(
                self._download(stream_id, int(request.path.removeprefix(DOWNLOAD)))
            )
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            return
        fields = [(":status", str(status)), ("content-type", "application/json")]
        fields.append(("content-length", str(len(body))))
        if status == 401:
            fields += self.api.challenge(body)
        with_trailers = status == 200 and request.path == TRAILERS
        if with_trailers:
            fields.append(("trailer", "x-checksum"))
        conn.send_headers(stream_id, fields)
        conn.send_data(stream_id, body, end_stream=not with_trailers)
        if with_trailers:
            checksum = hashlib.sha256(body).hexdigest()
            conn.send_headers(stream_id, [("x-checksum", checksum)], end_stream=True)

    async def _download(self, stream_id: int, size: int) -> None:
        conn = self.conn
        api = self.api
        remaining = size
        for _ in range(10 * size // len(_PIECE) + 100):
            if not remaining:
                break
            self.window.clear()
            window = min(
                conn.local_flow_control_window(stream_id), conn.max_outbound_frame_size, remaining
            )
            if window <= 0:
                api.blocked = True
                await self.window.wait()
                api.blocked = False
                continue
            conn.send_data(stream_id, _PIECE[:window] if window <= len(_PIECE) else b"d" * window)
            remaining -= window
            api.sent += window
            self.writer.write(conn.data_to_send())
            await self.writer.drain()
        conn.end_stream(stream_id)
        self.writer.write(conn.data_to_send())
