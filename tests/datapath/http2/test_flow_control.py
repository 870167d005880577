"""Flow control through the HTTP/2 server side, with a raw h2 client over h2c and a real
grpcio upstream: what the proxy holds for a slow side stays bounded by the windows,
whichever side is slow, and a window held shut ends the stream instead of holding it."""

from __future__ import annotations

import asyncio

import h2.events
from hyperframe.frame import DataFrame, HeadersFrame, PingFrame

from proxy.config import LimitsConfig
from tests.datapath.http2.conftest import GrpcProxy, StartGrpcProxy, method
from tests.support.grpc_server import GrpcServer, grpc_message
from tests.support.h2_client import RawH2

CANCEL = 0x8
IDLE_TIMEOUT = 1.0
WITHIN = 15.0
MESSAGE = 64 * 1024
UPLOAD = 32 * 1024 * 1024
# What may sit between the client and a handler that reads nothing: the proxy's stream
# window, and what grpcio's transport takes in (its windows grow with its BDP probes:
# 4 MiB measured). Half of UPLOAD: a proxy that acknowledged data as it arrived would
# have let all of it through.
HELD_AT_MOST = 16 * 1024 * 1024
# What the upstream may have produced for a client that opened no window: the proxy's
# upstream stream window (256 KiB) and grpcio's buffers (270 kB measured).
PRODUCED_AT_MOST = 2 * 1024 * 1024


def port_of(proxy: GrpcProxy) -> int:
    return int(proxy.target.rpartition(":")[2])


async def test_a_window_held_shut_resets_the_stream_and_reads_no_further(
    start_reverse_grpc: StartGrpcProxy, plain_grpc_server: GrpcServer
) -> None:
    proxy = await start_reverse_grpc(limits=LimitsConfig(idle_timeout=IDLE_TIMEOUT))
    # Stream windows of 0: the client can be sent no DATA at all.
    client = await RawH2.open(port_of(proxy), initial_window=0)
    try:
        stream_id = client.request(method("ServerStream").encode(), end_stream=False, grpc=True)
        client.h2.send_data(stream_id, grpc_message(b"100000,10000"), end_stream=True)
        client.flush()
        async with asyncio.timeout(WITHIN):
            while stream_id not in client.received.resets():
                assert await client.read_events() or not client.received.closed
        assert client.received.resets()[stream_id] == CANCEL
        heads = [f for f in client.received.frames if isinstance(f, HeadersFrame)]
        assert [f.stream_id for f in heads] == [stream_id]  # the response head went out
        assert not [f for f in client.received.frames if isinstance(f, DataFrame) and f.data]
        # The proxy stopped reading the upstream's answer at the windows (a megabyte or
        # so of the 1 GB it would have sent): nothing piled up in the proxy meanwhile.
        assert plain_grpc_server.produced * 10000 < PRODUCED_AT_MOST
        # The connection itself is still of use.
        client.h2.ping(b"still-on")
        client.flush()
        async with asyncio.timeout(WITHIN):
            while not any(
                isinstance(event, h2.events.PingAckReceived) for event in await client.read_events()
            ):
                assert not client.received.closed
    finally:
        await client.close()


async def test_the_client_may_send_only_what_went_upstream(
    start_reverse_grpc: StartGrpcProxy, plain_grpc_server: GrpcServer
) -> None:
    proxy = await start_reverse_grpc()
    client = await RawH2.open(port_of(proxy))
    message = grpc_message(b"m" * MESSAGE)
    body = message * (UPLOAD // len(message))
    try:
        stream_id = client.request(method("Hold").encode(), end_stream=False, grpc=True)
        sent = await send_until_blocked(client, stream_id, body)
        # The handler reads nothing yet: the proxy acknowledged only what went upstream.
        assert sent < HELD_AT_MOST
        plain_grpc_server.release_holds()
        sent += await send_all(client, stream_id, body[sent:])
        assert sent == len(body)
        answer = await response_body(client, stream_id)
    finally:
        await client.close()
    count = len(body) // len(message)
    assert answer == grpc_message(b"%d:%d" % (count, count * MESSAGE))


async def send_until_blocked(client: RawH2, stream_id: int, body: bytes) -> int:
    """Send `body` as the windows allow until they stay shut: after the last DATA, a
    PING and its ACK (the server has read everything before it) and no WINDOW_UPDATE
    within a second."""
    sent = 0
    async with asyncio.timeout(WITHIN * 2):
        while sent < len(body):
            sent += send_window(client, stream_id, body[sent:])
            client.write_frames(PingFrame(0, b"blocked?"))
            opened = False
            acked = False
            while not acked:
                events = await client.read_events()
                assert not client.received.closed
                acked = any(isinstance(e, h2.events.PingAckReceived) for e in events)
                opened = opened or any(isinstance(e, h2.events.WindowUpdated) for e in events)
            if not opened and client.h2.local_flow_control_window(stream_id) == 0:
                try:
                    async with asyncio.timeout(1.0):
                        while not any(
                            isinstance(e, h2.events.WindowUpdated)
                            for e in await client.read_events()
                        ):
                            assert not client.received.closed
                except TimeoutError:
                    return sent
    return sent


def send_window(client: RawH2, stream_id: int, rest: bytes) -> int:
    window = client.h2.local_flow_control_window(stream_id)
    size = min(window, len(rest))
    frame = client.h2.max_outbound_frame_size
    for offset in range(0, size, frame):
        client.h2.send_data(stream_id, rest[offset : min(offset + frame, size)])
    client.flush()
    return size


async def send_all(client: RawH2, stream_id: int, rest: bytes) -> int:
    sent = 0
    async with asyncio.timeout(WITHIN * 2):
        while sent < len(rest):
            step = send_window(client, stream_id, rest[sent:])
            sent += step
            if not step:
                await client.read_events()
                assert not client.received.closed
    client.h2.end_stream(stream_id)
    client.flush()
    return sent


async def response_body(client: RawH2, stream_id: int) -> bytes:
    body = b""
    async with asyncio.timeout(WITHIN):
        while True:
            for event in await client.read_events():
                if isinstance(event, h2.events.DataReceived) and event.stream_id == stream_id:
                    body += event.data or b""
                    client.h2.acknowledge_received_data(
                        event.flow_controlled_length or 0, stream_id
                    )
                if isinstance(event, h2.events.StreamEnded) and event.stream_id == stream_id:
                    return body
            assert not client.received.closed
