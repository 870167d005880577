"""HTTP/2 upstream connections against real servers: grpcio (h2c and TLS) and, for what
grpcio cannot be made to do on demand (GOAWAY mid-stream, REFUSED_STREAM, RST_STREAM,
a window it never opens), a server written with h2 on an asyncio socket."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import h2.config
import h2.connection
import h2.errors
import h2.events
import pytest
import trustme
from hyperframe.frame import GoAwayFrame

from proxy.config import TlsClientConfig
from proxy.datapath.http2 import upstream_connection
from proxy.datapath.http2.upstream import Http2Upstreams, UpstreamStream
from proxy.datapath.http2.upstream_connection import STREAM_WINDOW
from proxy.datapath.upstream_connection import Origin
from proxy.errors import UpstreamTimeout, UpstreamUnreachable
from proxy.tls.client_context import client_ssl_context, http2_context
from tests.support.certificates import client_certificate_files
from tests.support.grpc_server import GrpcServer, grpc_message, grpc_messages, request_headers
from tests.support.upstream import Upstream
from tests.support.waiting import eventually

TOKEN = b"Bearer upstream-test-token"
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 10.0
MAX_READS = 100_000

Headers = list[tuple[bytes, bytes]]


@pytest.fixture
async def upstreams() -> AsyncIterator[Http2Upstreams]:
    pool = Http2Upstreams()
    yield pool
    await pool.close()


@pytest.fixture
def grpc_server() -> Iterator[GrpcServer]:
    with GrpcServer() as server:
        yield server


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def client_context(ca: trustme.CA, tmp_path: Path) -> ssl.SSLContext:
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return client_ssl_context(TlsClientConfig(ca_file=ca_file))


def h2c(port: int) -> Origin:
    return Origin("http", "127.0.0.1", port)


async def open_call(
    upstreams: Http2Upstreams,
    origin: Origin,
    method: str,
    *,
    metadata: Headers | None = None,
    read_timeout: float = READ_TIMEOUT,
) -> UpstreamStream:
    scheme = "https" if origin.ssl is not None else "http"
    return await upstreams.open_stream(
        origin,
        request_headers(
            f"{origin.host}:{origin.port}", method, scheme=scheme, metadata=metadata or []
        ),
        end_stream=False,
        connect_timeout=CONNECT_TIMEOUT,
        read_timeout=read_timeout,
    )


async def read_all(stream: UpstreamStream) -> bytes:
    body = bytearray()
    for _ in range(MAX_READS):
        chunk = await stream.read()
        if chunk is None:
            return bytes(body)
        body += chunk
    raise AssertionError("the stream did not end")


async def unary(
    upstreams: Http2Upstreams,
    origin: Origin,
    method: str,
    payload: bytes,
    metadata: Headers | None = None,
) -> tuple[int, dict[bytes, bytes], list[bytes], dict[bytes, bytes]]:
    stream = await open_call(upstreams, origin, method, metadata=metadata or [])
    await stream.send_data(grpc_message(payload))
    await stream.end()
    status, headers = await stream.response_head()
    body = await read_all(stream)
    return status, dict(headers), grpc_messages(body), dict(stream.trailers or [])


# -- grpcio, cleartext and TLS -------------------------------------------------------


async def test_unary_call_over_h2c_carries_metadata_and_trailers(
    upstreams: Http2Upstreams, grpc_server: GrpcServer
) -> None:
    origin = h2c(grpc_server.port)
    status, headers, messages, trailers = await unary(
        upstreams, origin, "Unary", b"hello", [(b"authorization", TOKEN)]
    )
    assert status == 200
    assert headers[b"content-type"] == b"application/grpc"
    assert headers[b"seen-authorization"] == TOKEN
    assert messages == [b"hello"]
    assert trailers[b"grpc-status"] == b"0"
    assert grpc_server.calls[0].metadata["authorization"] == TOKEN.decode()


async def test_unary_call_over_tls_negotiates_h2(
    upstreams: Http2Upstreams, ca: trustme.CA, client_context: ssl.SSLContext
) -> None:
    with GrpcServer(ca=ca) as server:
        origin = Origin("https", "127.0.0.1", server.port, client_context)
        _, _, messages, trailers = await unary(
            upstreams, origin, "Authorization", b"", [(b"authorization", TOKEN)]
        )
    assert messages == [TOKEN]
    assert trailers[b"grpc-status"] == b"0"


async def test_the_shared_context_keeps_offering_no_alpn(
    upstreams: Http2Upstreams, ca: trustme.CA, client_context: ssl.SSLContext
) -> None:
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    server_context.set_alpn_protocols(["h2", "http/1.1"])
    async with Upstream() as server:
        await server.close()
        await server.start(ssl_context=server_context)
        origin = Origin("https", "127.0.0.1", server.port, client_context)
        # aiohttp does not speak HTTP/2 even when its context offers it: the handshake
        # selects h2, and the connection fails later; what matters here is the offer.
        with contextlib.suppress(UpstreamUnreachable, UpstreamTimeout):
            await upstreams.connect(origin, connect_timeout=1.0)
        _, writer = await asyncio.open_connection("127.0.0.1", server.port, ssl=client_context)
        try:
            assert writer.get_extra_info("ssl_object").selected_alpn_protocol() is None
        finally:
            writer.close()


async def test_tls_origin_without_h2_is_told_apart(
    upstreams: Http2Upstreams, ca: trustme.CA, client_context: ssl.SSLContext
) -> None:
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    server_context.set_alpn_protocols(["http/1.1"])
    async with Upstream() as http1:
        await http1.close()
        await http1.start(ssl_context=server_context)
        origin = Origin("https", "127.0.0.1", http1.port, client_context)
        assert await upstreams.connect(origin, connect_timeout=CONNECT_TIMEOUT) is None
        with pytest.raises(UpstreamUnreachable, match="HTTP/2"):
            await open_call(upstreams, origin, "Unary")
    assert upstreams.connections(origin) == 0


async def test_a_failed_call_is_a_trailers_only_response(
    upstreams: Http2Upstreams, grpc_server: GrpcServer
) -> None:
    status, headers, messages, trailers = await unary(
        upstreams, h2c(grpc_server.port), "Refuse", b"UNAUTHENTICATED"
    )
    assert status == 200
    assert headers[b"grpc-status"] == b"16"
    assert messages == []
    assert trailers == {}


async def test_bidirectional_stream_relays_each_message(
    upstreams: Http2Upstreams, grpc_server: GrpcServer
) -> None:
    stream = await open_call(upstreams, h2c(grpc_server.port), "Bidi")
    for index in range(3):
        await stream.send_data(grpc_message(b"ping %d" % index))
        if index == 0:
            assert (await stream.response_head())[0] == 200
        received = b""
        for _ in range(100):
            received += await stream.read() or b""
            if len(received) >= 11:
                break
        assert grpc_messages(received) == [b"ping %d" % index]
    await stream.end()
    assert await read_all(stream) == b""
    assert dict(stream.trailers or [])[b"grpc-status"] == b"0"


async def test_streams_beyond_max_concurrent_streams_open_another_connection(
    upstreams: Http2Upstreams,
) -> None:
    with GrpcServer(max_concurrent_streams=2) as server:
        origin = h2c(server.port)
        streams = [await open_call(upstreams, origin, "Hold") for _ in range(2)]
        assert upstreams.connections(origin) == 1
        streams += [await open_call(upstreams, origin, "Hold") for _ in range(3)]
        assert upstreams.connections(origin) == 3
        for stream in streams:
            await stream.send_data(grpc_message(b"held"))
            await stream.end()

        async def all_holding() -> bool:
            return len(server.calls) == 5

        await eventually(all_holding)
        server.release_holds()
        for stream in streams:
            await stream.response_head()
            assert grpc_messages(await read_all(stream)) == [b"1:4"]  # one message, 4 bytes
            assert dict(stream.trailers or [])[b"grpc-status"] == b"0"
        # Finished streams leave room: the next call needs no new connection.
        await unary(upstreams, origin, "Unary", b"again")
        assert upstreams.connections(origin) == 3


async def test_a_slow_reader_slows_the_upstream(
    upstreams: Http2Upstreams, grpc_server: GrpcServer
) -> None:
    count, size = 512, 64 * 1024  # 32 MiB
    stream = await open_call(upstreams, h2c(grpc_server.port), "ServerStream")
    await stream.send_data(grpc_message(b"%d,%d" % (count, size)))
    await stream.end()
    await stream.response_head()

    async def window_full() -> bool:
        return stream.buffered >= STREAM_WINDOW - 16 * 1024

    await eventually(window_full)
    assert stream.buffered <= STREAM_WINDOW
    produced_while_stalled = grpc_server.produced
    assert produced_while_stalled < count // 2
    total = 0
    peak = 0
    for _ in range(MAX_READS):
        peak = max(peak, stream.buffered)
        chunk = await stream.read()
        if chunk is None:
            break
        total += len(chunk)
    assert total == count * (size + 5)
    assert peak <= STREAM_WINDOW
    assert dict(stream.trailers or [])[b"grpc-status"] == b"0"


async def test_silent_upstream_times_out_and_the_call_is_cancelled(
    upstreams: Http2Upstreams, grpc_server: GrpcServer
) -> None:
    stream = await open_call(upstreams, h2c(grpc_server.port), "Hold", read_timeout=0.3)
    await stream.send_data(grpc_message(b"x"))
    await stream.end()
    # grpcio sends its head only with the answer: nothing comes while the call is held.
    with pytest.raises(UpstreamTimeout):
        await stream.response_head()

    async def cancelled() -> bool:
        return grpc_server.cancelled == 1

    await eventually(cancelled)


async def test_reset_by_the_proxy_cancels_the_call(
    upstreams: Http2Upstreams, grpc_server: GrpcServer
) -> None:
    origin = h2c(grpc_server.port)
    stream = await open_call(upstreams, origin, "Hold")
    await stream.send_data(grpc_message(b"x"))

    async def holding() -> bool:
        return len(grpc_server.calls) == 1

    await eventually(holding)
    stream.reset()

    async def cancelled() -> bool:
        return grpc_server.cancelled == 1

    await eventually(cancelled)
    with pytest.raises(UpstreamUnreachable):
        await stream.read()
    # The connection stays usable for other streams.
    assert (await unary(upstreams, origin, "Unary", b"after"))[2] == [b"after"]
    assert upstreams.connections(origin) == 1


async def test_graceful_server_stop_lets_the_call_in_flight_finish(
    upstreams: Http2Upstreams, grpc_server: GrpcServer
) -> None:
    origin = h2c(grpc_server.port)
    stream = await open_call(upstreams, origin, "Hold")
    await stream.send_data(grpc_message(b"in flight"))
    await stream.end()

    async def holding() -> bool:
        return len(grpc_server.calls) == 1

    await eventually(holding)
    stopped = grpc_server.stop(grace=30)

    async def retired() -> bool:
        return upstreams.connections(origin) == 0

    await eventually(retired)  # GOAWAY: no new stream goes there
    grpc_server.release_holds()
    await stream.response_head()
    assert grpc_messages(await read_all(stream)) == [b"1:9"]  # one message, 9 bytes
    assert dict(stream.trailers or [])[b"grpc-status"] == b"0"
    assert await asyncio.to_thread(stopped.wait, 10)


# -- a scripted HTTP/2 server ----------------------------------------------------------


class Peer(asyncio.Protocol):
    """The server's side of one connection."""

    def __init__(self, server: ScriptedServer) -> None:
        self.server = server
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        self.h2 = h2.connection.H2Connection(config=config)
        self.transport: asyncio.Transport | None = None
        self.bodies: dict[int, bytearray] = {}
        self.unacknowledged: dict[int, int] = {}
        self.ping_acks = 0
        self.goaway_received = False
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.h2.initiate_connection()
        self.flush()
        self.server.peers.append(self)

    def data_received(self, data: bytes) -> None:
        for event in self.h2.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                assert event.stream_id is not None
                self.bodies[event.stream_id] = bytearray()
                self.server.on_request(self, event.stream_id)
            elif isinstance(event, h2.events.DataReceived):
                assert event.stream_id is not None
                assert event.data is not None
                self.bodies[event.stream_id] += event.data
                size = event.flow_controlled_length or 0
                if self.server.acknowledge:
                    self.h2.acknowledge_received_data(size, event.stream_id)
                else:
                    self.unacknowledged[event.stream_id] = (
                        self.unacknowledged.get(event.stream_id, 0) + size
                    )
            elif isinstance(event, h2.events.StreamEnded):
                assert event.stream_id is not None
                self.server.on_end(self, event.stream_id)
            elif isinstance(event, h2.events.PingAckReceived):
                self.ping_acks += 1
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.goaway_received = True
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True

    def flush(self) -> None:
        assert self.transport is not None
        self.transport.write(self.h2.data_to_send())

    def respond(self, stream_id: int, body: bytes = b"ok", headers: Headers | None = None) -> None:
        self.h2.send_headers(stream_id, [(b":status", b"200"), *(headers or [])])
        self.h2.send_data(stream_id, body, end_stream=True)
        self.flush()

    def acknowledge_all(self) -> None:
        for stream_id, size in self.unacknowledged.items():
            self.h2.acknowledge_received_data(size, stream_id)
        self.unacknowledged.clear()
        self.server.acknowledge = True
        self.flush()


class ScriptedServer:
    """An h2 server on 127.0.0.1; `on_request`/`on_end` say what each stream gets."""

    def __init__(
        self,
        on_request: Callable[[Peer, int], None] = lambda peer, stream_id: None,
        on_end: Callable[[Peer, int], None] = lambda peer, stream_id: peer.respond(stream_id),
    ) -> None:
        self.on_request = on_request
        self.on_end = on_end
        self.acknowledge = True
        self.peers: list[Peer] = []
        self._server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> ScriptedServer:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: Peer(self), "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        for peer in self.peers:
            if peer.transport is not None:
                peer.transport.abort()
        self._server.close()
        await self._server.wait_closed()


def get(origin: Origin, path: bytes = b"/") -> Headers:
    return [
        (b":method", b"GET"),
        (b":scheme", b"http"),
        (b":authority", f"{origin.host}:{origin.port}".encode()),
        (b":path", path),
    ]


async def open_get(upstreams: Http2Upstreams, origin: Origin, **options: float) -> UpstreamStream:
    return await upstreams.open_stream(
        origin,
        get(origin),
        end_stream=True,
        connect_timeout=options.get("connect_timeout", CONNECT_TIMEOUT),
        read_timeout=options.get("read_timeout", READ_TIMEOUT),
    )


async def test_goaway_finishes_earlier_streams_and_retries_later_ones(
    upstreams: Http2Upstreams,
) -> None:
    def on_end(peer: Peer, stream_id: int) -> None:
        if peer is not peer.server.peers[0]:
            peer.respond(stream_id, b"second connection")
        elif stream_id == 3:
            assert peer.transport is not None
            # h2 refuses to send anything after its own GOAWAY: the frame goes out raw.
            peer.transport.write(GoAwayFrame(0, last_stream_id=1).serialize())
            peer.respond(1, b"finished after GOAWAY")

    async with ScriptedServer(on_end=on_end) as server:
        origin = h2c(server.port)
        first = await open_get(upstreams, origin)
        second = await open_get(upstreams, origin)
        assert (first.stream_id, second.stream_id) == (1, 3)
        assert await first.response_head() == (200, [])
        assert await read_all(first) == b"finished after GOAWAY"
        assert (await second.response_head())[0] == 200
        assert await read_all(second) == b"second connection"
        assert len(server.peers) == 2
        assert upstreams.connections(origin) == 1


async def test_refused_stream_is_sent_again_with_its_body(upstreams: Http2Upstreams) -> None:
    refused: list[int] = []

    def on_request(peer: Peer, stream_id: int) -> None:
        if not refused:
            refused.append(stream_id)
            peer.h2.reset_stream(stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)

    def on_end(peer: Peer, stream_id: int) -> None:
        if stream_id not in refused:
            peer.respond(stream_id, bytes(peer.bodies[stream_id]))

    async with ScriptedServer(on_request=on_request, on_end=on_end) as server:
        origin = h2c(server.port)
        stream = await upstreams.open_stream(
            origin,
            [*get(origin), (b"content-type", b"text/plain")],
            end_stream=False,
            connect_timeout=CONNECT_TIMEOUT,
            read_timeout=READ_TIMEOUT,
        )
        await stream.send_data(b"request body")
        await stream.end()
        assert (await stream.response_head())[0] == 200
        assert await read_all(stream) == b"request body"
        assert stream.reset_code is None
        assert refused == [1]
        assert stream.stream_id == 3  # REFUSED_STREAM is per stream: same connection
        assert len(server.peers) == 1


async def test_a_stream_refused_every_time_fails(upstreams: Http2Upstreams) -> None:
    refused: list[int] = []

    def on_request(peer: Peer, stream_id: int) -> None:
        refused.append(stream_id)
        peer.h2.reset_stream(stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)

    async with ScriptedServer(on_request=on_request, on_end=lambda peer, stream_id: None) as server:
        stream = await open_get(upstreams, h2c(server.port))
        with pytest.raises(UpstreamUnreachable, match="refused"):
            await stream.response_head()
    assert refused == [1, 3, 5]  # the first attempt and MAX_REPLAYS more


async def test_calls_started_together_share_the_connection_being_opened(
    upstreams: Http2Upstreams,
) -> None:
    async with ScriptedServer() as server:
        origin = h2c(server.port)
        streams = await asyncio.gather(*(open_get(upstreams, origin) for _ in range(10)))
        for stream in streams:
            assert await read_all(stream) == b"ok"
        assert len(server.peers) == 1
        assert sorted(stream.stream_id for stream in streams) == list(range(1, 20, 2))


async def test_close_fails_open_streams_and_says_goodbye(upstreams: Http2Upstreams) -> None:
    async with ScriptedServer(on_end=lambda peer, stream_id: None) as server:
        stream = await open_get(upstreams, h2c(server.port))
        await upstreams.close()
        with pytest.raises(UpstreamUnreachable):
            await stream.response_head()

        async def gone() -> bool:
            return server.peers[0].lost

        await eventually(gone)
        assert server.peers[0].goaway_received


async def test_a_lost_connection_fails_its_streams_and_is_replaced(
    upstreams: Http2Upstreams,
) -> None:
    async with ScriptedServer(on_end=lambda peer, stream_id: None) as server:
        origin = h2c(server.port)
        stream = await open_get(upstreams, origin)

        async def arrived() -> bool:
            return len(server.peers) == 1 and 1 in server.peers[0].bodies

        await eventually(arrived)
        transport = server.peers[0].transport
        assert transport is not None
        transport.abort()
        with pytest.raises(UpstreamUnreachable, match="closed"):
            await stream.response_head()
        assert upstreams.connections(origin) == 0
        server.on_end = lambda peer, stream_id: peer.respond(stream_id)
        assert await read_all(await open_get(upstreams, origin)) == b"ok"
        assert len(server.peers) == 2


async def test_a_complete_response_stays_readable_after_the_connection_closes(
    upstreams: Http2Upstreams,
) -> None:
    def on_end(peer: Peer, stream_id: int) -> None:
        peer.respond(stream_id, b"complete")
        assert peer.transport is not None
        peer.transport.close()

    async with ScriptedServer(on_end=on_end) as server:
        origin = h2c(server.port)
        stream = await open_get(upstreams, origin)

        async def lost() -> bool:
            return upstreams.connections(origin) == 0

        await eventually(lost)
        assert await stream.response_head() == (200, [])
        assert await read_all(stream) == b"complete"


@pytest.mark.parametrize("after_head", [False, True])
async def test_reset_by_the_upstream_ends_the_stream(
    upstreams: Http2Upstreams, after_head: bool
) -> None:
    def on_end(peer: Peer, stream_id: int) -> None:
        if after_head:
            peer.h2.send_headers(stream_id, [(b":status", b"200")])
            peer.h2.send_data(stream_id, b"partial")
        peer.h2.reset_stream(stream_id, h2.errors.ErrorCodes.INTERNAL_ERROR)
        peer.flush()

    async with ScriptedServer(on_end=on_end) as server:
        stream = await open_get(upstreams, h2c(server.port))
        if after_head:
            assert (await stream.response_head())[0] == 200
            with pytest.raises(UpstreamUnreachable, match="reset"):
                await read_all(stream)
        else:
            with pytest.raises(UpstreamUnreachable, match="reset"):
                await stream.response_head()
        assert stream.reset_code == h2.errors.ErrorCodes.INTERNAL_ERROR


async def test_send_data_waits_for_the_upstream_window(upstreams: Http2Upstreams) -> None:
    size = 1024 * 1024
    async with ScriptedServer() as server:
        server.acknowledge = False
        origin = h2c(server.port)
        stream = await upstreams.open_stream(
            origin, get(origin), end_stream=False, connect_timeout=5, read_timeout=READ_TIMEOUT
        )
        sending = asyncio.ensure_future(stream.send_data(b"u" * size))

        async def window_used() -> bool:
            return sum(len(body) for body in server.peers[0].bodies.values()) == 65535

        await eventually(window_used)
        assert not sending.done()
        server.peers[0].acknowledge_all()
        await sending
        await stream.end()
        assert await read_all(stream) == b"ok"
        assert len(server.peers[0].bodies[stream.stream_id]) == size


async def test_the_h2_context_is_built_once_from_the_same_settings(
    client_context: ssl.SSLContext,
) -> None:
    offering_h2 = http2_context(client_context)
    assert offering_h2 is not client_context
    assert http2_context(client_context) is offering_h2
    assert offering_h2.verify_mode == ssl.CERT_REQUIRED
    assert offering_h2.check_hostname
    assert offering_h2.get_ca_certs() == client_context.get_ca_certs()
    with pytest.raises(ValueError, match="client_ssl_context"):
        http2_context(ssl.create_default_context())


async def test_mutual_tls_over_h2_presents_the_client_certificate(
    upstreams: Http2Upstreams,
    ca: trustme.CA,
    client_ca: trustme.CA,
    client_context: ssl.SSLContext,
    tmp_path: Path,
) -> None:
    cert, key = client_certificate_files(client_ca, "order-service.clients.test", tmp_path)
    with_identity = client_ssl_context(
        TlsClientConfig(ca_file=tmp_path / "ca.pem", client_cert_file=cert, client_key_file=key)
    )
    with GrpcServer(ca=ca, client_ca=client_ca) as server:
        origin = Origin("https", "127.0.0.1", server.port, with_identity)
        _, _, messages, trailers = await unary(
            upstreams, origin, "Authorization", b"", [(b"authorization", TOKEN)]
        )
        assert messages == [TOKEN]
        assert trailers[b"grpc-status"] == b"0"
        # The same server refuses a client without a certificate.
        anonymous = Origin("https", "127.0.0.1", server.port, client_context)
        with pytest.raises(UpstreamUnreachable):
            await unary(upstreams, anonymous, "Authorization", b"", [(b"authorization", TOKEN)])
    assert len(server.calls) == 1


async def test_oversized_response_head_is_refused(upstreams: Http2Upstreams) -> None:
    def on_end(peer: Peer, stream_id: int) -> None:
        peer.respond(stream_id, headers=[(b"x-large", b"v" * (80 * 1024))])

    async with ScriptedServer(on_end=on_end) as server:
        stream = await open_get(upstreams, h2c(server.port))
        with pytest.raises(UpstreamUnreachable):
            await stream.response_head()


async def test_ping_is_answered(upstreams: Http2Upstreams) -> None:
    async with ScriptedServer() as server:
        origin = h2c(server.port)
        await read_all(await open_get(upstreams, origin))
        peer = server.peers[0]
        peer.h2.ping(b"12345678")
        peer.flush()

        async def answered() -> bool:
            return peer.ping_acks == 1

        await eventually(answered)


async def test_idle_connection_is_closed(
    upstreams: Http2Upstreams, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(upstream_connection, "UPSTREAM_IDLE_TIMEOUT", 0.2)
    async with ScriptedServer() as server:
        origin = h2c(server.port)
        assert await read_all(await open_get(upstreams, origin)) == b"ok"

        async def closed() -> bool:
            return server.peers[0].lost and upstreams.connections(origin) == 0

        await eventually(closed)


async def test_connection_refused_is_unreachable(upstreams: Http2Upstreams) -> None:
    async with ScriptedServer() as server:
        port = server.port
    with pytest.raises(UpstreamUnreachable):
        await open_get(upstreams, h2c(port))


async def test_peer_that_never_sends_settings_times_out(upstreams: Http2Upstreams) -> None:
    loop = asyncio.get_running_loop()
    silent = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0)
    try:
        port = silent.sockets[0].getsockname()[1]
        with pytest.raises(UpstreamTimeout):
            await open_get(upstreams, h2c(port), connect_timeout=0.3)
    finally:
        silent.close()
        with contextlib.suppress(Exception):
            await silent.wait_closed()
