"""Streams and the connection's lifecycle on the HTTP/2 server side, with a raw h2 client
over h2c: resets passed on both ways, GOAWAY from either side as a drain, what the
proxy announces in SETTINGS, and an idle connection closed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import h2.config
import h2.connection
import h2.events
import pytest
from hyperframe.frame import GoAwayFrame, SettingsFrame

from proxy.config import LimitsConfig
from proxy.datapath.http2.server import MAX_CONCURRENT_STREAMS
from tests.datapath.http2.conftest import GrpcProxy, StartGrpcProxy, method
from tests.support.grpc_server import GrpcServer, grpc_message
from tests.support.h2_client import RawH2
from tests.support.waiting import eventually

CANCEL = 0x8
ENHANCE_YOUR_CALM = 0xB
WITHIN = 15.0


def port_of(proxy: GrpcProxy) -> int:
    return int(proxy.target.rpartition(":")[2])


async def held_call(client: RawH2, server: GrpcServer) -> int:
    """Start a `Hold` call, wait until the upstream has it, and return its stream id."""
    stream_id = client.request(method("Hold").encode(), end_stream=False, grpc=True)
    client.h2.send_data(stream_id, grpc_message(b"held"), end_stream=True)
    client.flush()

    async def arrived() -> bool:
        return len(server.calls) == 1

    await eventually(arrived)
    return stream_id


async def trailers_of(client: RawH2, stream_id: int) -> dict[bytes, bytes]:
    """`stream_id`'s trailers, reading until they arrive."""
    async with asyncio.timeout(WITHIN):
        while True:
            for event in client.events:
                if isinstance(event, h2.events.TrailersReceived) and event.stream_id == stream_id:
                    return dict(event.headers or [])
            events = await client.read_events()
            assert events or not client.received.closed, "closed before the trailers"


async def test_settings_announce_the_limits(start_reverse_grpc: StartGrpcProxy) -> None:
    proxy = await start_reverse_grpc(limits=LimitsConfig(max_header_size=12345))
    client = await RawH2.open(port_of(proxy))
    await client.close()
    settings = next(f for f in client.received.frames if isinstance(f, SettingsFrame)).settings
    assert settings[SettingsFrame.MAX_CONCURRENT_STREAMS] == MAX_CONCURRENT_STREAMS
    assert settings[SettingsFrame.MAX_HEADER_LIST_SIZE] == 12345
    assert settings[SettingsFrame.ENABLE_PUSH] == 0


async def test_a_client_reset_cancels_the_upstream_call(
    start_reverse_grpc: StartGrpcProxy, plain_grpc_server: GrpcServer
) -> None:
    proxy = await start_reverse_grpc()
    client = await RawH2.open(port_of(proxy))
    try:
        stream_id = await held_call(client, plain_grpc_server)
        client.h2.reset_stream(stream_id, CANCEL)
        client.flush()

        async def cancelled() -> bool:
            return plain_grpc_server.cancelled == 1

        await eventually(cancelled)
    finally:
        await client.close()


class ResettingServer:
    """An h2c server that answers every request with a head, then RST_STREAM `code`."""

    def __init__(self, code: int) -> None:
        self.code = code
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        while data := await reader.read(65536):
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    stream_id = event.stream_id or 0
                    conn.send_headers(stream_id, [(":status", "200")])
                    conn.reset_stream(stream_id, self.code)
            writer.write(conn.data_to_send())
        writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest.fixture
async def resetting_server() -> AsyncIterator[ResettingServer]:
    server = ResettingServer(ENHANCE_YOUR_CALM)
    await server.start()
    yield server
    await server.close()


async def test_an_upstream_reset_reaches_the_client_with_its_code(
    start_reverse_grpc: StartGrpcProxy, resetting_server: ResettingServer
) -> None:
    proxy = await start_reverse_grpc(url=f"http://127.0.0.1:{resetting_server.port}")
    client = await RawH2.open(port_of(proxy))
    try:
        stream_id = client.request(b"/api/x")
        async with asyncio.timeout(WITHIN):
            while stream_id not in client.received.resets():
                assert await client.read_events() or not client.received.closed
    finally:
        await client.close()
    assert client.received.resets()[stream_id] == ENHANCE_YOUR_CALM


async def test_a_client_goaway_lets_its_streams_finish(
    start_reverse_grpc: StartGrpcProxy, plain_grpc_server: GrpcServer
) -> None:
    proxy = await start_reverse_grpc()
    client = await RawH2.open(port_of(proxy))
    try:
        stream_id = await held_call(client, plain_grpc_server)
        # Past h2's own state machine, which would take no more frames after it.
        client.write_frames(GoAwayFrame(0, last_stream_id=0, error_code=0))
        plain_grpc_server.release_holds()
        trailers = await trailers_of(client, stream_id)
        assert trailers[b"grpc-status"] == b"0"
        received = await client.until_closed(WITHIN)
    finally:
        await client.close()
    assert received.closed
    assert plain_grpc_server.cancelled == 0


async def test_draining_sends_goaway_and_answers_the_streams_in_flight(
    start_reverse_grpc: StartGrpcProxy, plain_grpc_server: GrpcServer
) -> None:
    proxy = await start_reverse_grpc()
    listener = proxy.app.reverse_listeners["inventory"]
    client = await RawH2.open(port_of(proxy))
    try:
        stream_id = await held_call(client, plain_grpc_server)
        await listener.stop_accepting()
        drained = asyncio.ensure_future(listener.drain(WITHIN))
        async with asyncio.timeout(WITHIN):
            while client.received.goaway() is None:
                assert await client.read_events() or not client.received.closed
        goaway = client.received.goaway()
        assert goaway is not None
        assert (goaway.error_code, goaway.last_stream_id) == (0, stream_id)
        assert not drained.done()  # the stream in flight holds the drain
        plain_grpc_server.release_holds()
        trailers = await trailers_of(client, stream_id)
        assert trailers[b"grpc-status"] == b"0"
        assert await asyncio.wait_for(drained, WITHIN)  # every connection closed in time
    finally:
        await client.close()


async def test_an_idle_connection_is_closed(start_reverse_grpc: StartGrpcProxy) -> None:
    proxy = await start_reverse_grpc(limits=LimitsConfig(idle_timeout=1.0, header_timeout=1.0))
    client = await RawH2.open(port_of(proxy))
    try:
        received = await client.until_closed(WITHIN)
    finally:
        await client.close()
    goaway = received.goaway()
    assert goaway is not None
    assert goaway.error_code == 0
    assert proxy.app.reverse_listeners["inventory"].connections == set()
