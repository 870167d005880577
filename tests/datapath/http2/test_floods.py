"""The known HTTP/2 attacks against the server side, each sent by a raw h2 client over
h2c to an upstream's own port: the proxy answers GOAWAY (ENHANCE_YOUR_CALM where the
client asked for too much) and closes, and nothing reaches the upstream."""

from __future__ import annotations

import logging

import hpack
import pytest
from hyperframe.frame import (
    ContinuationFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
)

from proxy.config import LimitsConfig
from proxy.datapath.http2.guards import CONTROL_FRAMES_PER_WINDOW, RESETS_PER_WINDOW
from tests.datapath.http2.conftest import GrpcProxy, StartGrpcProxy
from tests.support.grpc_server import GrpcServer
from tests.support.h2_client import RawH2, Received

PROTOCOL_ERROR = 0x1
ENHANCE_YOUR_CALM = 0xB
MAX_HEADER_SIZE = 4096
CLOSE_WITHIN = 10.0
LIMITS = LimitsConfig(max_header_size=MAX_HEADER_SIZE, header_timeout=1.0, idle_timeout=1.0)


@pytest.fixture
async def proxy(start_reverse_grpc: StartGrpcProxy) -> GrpcProxy:
    return await start_reverse_grpc(limits=LIMITS)


def port_of(proxy: GrpcProxy) -> int:
    return int(proxy.target.rpartition(":")[2])


async def closed_calm(client: RawH2, reason: bytes) -> Received:
    try:
        received = await client.until_closed(CLOSE_WITHIN)
    finally:
        await client.close()
    goaway = received.goaway()
    assert goaway is not None, "no GOAWAY"
    assert goaway.error_code == ENHANCE_YOUR_CALM
    assert reason in goaway.additional_data
    return received


async def test_hpack_bomb_is_refused(proxy: GrpcProxy, plain_grpc_server: GrpcServer) -> None:
    # One large field in the dynamic table, then referenced by index, one byte each:
    # a small header block that decodes to far more than the header list may hold.
    client = await RawH2.open(port_of(proxy))
    encoder = hpack.Encoder()
    bomb = [(b"x-bomb", b"a" * 3000)] * 200
    block = encoder.encode(
        [
            (b":method", b"GET"),
            (b":scheme", b"http"),
            (b":authority", b"inventory.internal"),
            (b":path", b"/"),
            *bomb,
        ]
    )
    assert len(block) < 2 * MAX_HEADER_SIZE  # within the encoded bound: the decoder's catch
    client.write_frames(HeadersFrame(1, block, flags=["END_HEADERS", "END_STREAM"]))
    await closed_calm(client, b"")
    assert plain_grpc_server.calls == []


async def test_rapid_reset_is_refused(proxy: GrpcProxy) -> None:
    # CVE-2023-44487: open streams and reset them at once, in one write.
    client = await RawH2.open(port_of(proxy))
    for _ in range(RESETS_PER_WINDOW + 10):
        stream_id = client.request(b"/api/x", end_stream=False)
        client.h2.reset_stream(stream_id)
    client.flush()
    await closed_calm(client, b"too many stream resets")


async def test_continuation_flood_is_refused(
    proxy: GrpcProxy, plain_grpc_server: GrpcServer
) -> None:
    # A header block that never ends: CONTINUATION frames until the bound, no END_HEADERS.
    client = await RawH2.open(port_of(proxy))
    frames = [HeadersFrame(1, b"\x82", flags=["END_STREAM"])]  # :method GET, to be continued
    frames += [ContinuationFrame(1, b"\x00" * 1000) for _ in range(20)]
    client.write_frames(*frames)
    await closed_calm(client, b"header block too large")
    assert plain_grpc_server.calls == []


async def test_a_header_block_held_open_is_closed(proxy: GrpcProxy) -> None:
    # A few bytes of a header block, then nothing: closed after header_timeout.
    client = await RawH2.open(port_of(proxy))
    client.write_frames(HeadersFrame(1, b"\x82"), ContinuationFrame(1, b"\x84"))
    await closed_calm(client, b"header block not completed in time")


@pytest.mark.parametrize("kind", ["SETTINGS", "PING"])
async def test_control_frame_floods_are_refused(proxy: GrpcProxy, kind: str) -> None:
    client = await RawH2.open(port_of(proxy))
    flood = (
        SettingsFrame(0, settings={SettingsFrame.MAX_CONCURRENT_STREAMS: 10})
        if kind == "SETTINGS"
        else PingFrame(0, b"12345678")
    )
    client.write_frames(*[flood] * (CONTROL_FRAMES_PER_WINDOW + 10))
    received = await closed_calm(client, b"too many control frames")
    # Not every one of them was answered.
    answered = [frame for frame in received.frames if type(frame) is type(flood)]
    assert len(answered) <= CONTROL_FRAMES_PER_WINDOW + 1


async def test_resets_of_unknown_streams_count_too(proxy: GrpcProxy) -> None:
    client = await RawH2.open(port_of(proxy))
    client.write_frames(*[RstStreamFrame(1, error_code=8)] * (RESETS_PER_WINDOW + 10))
    received = await client.until_closed(CLOSE_WITHIN)
    await client.close()
    goaway = received.goaway()
    assert goaway is not None
    # Counted before h2 reads them (ENHANCE_YOUR_CALM); h2 would refuse the first one
    # anyway, a reset of a stream never opened being a connection error (RFC 9113 §6.4).
    assert goaway.error_code in (ENHANCE_YOUR_CALM, PROTOCOL_ERROR)


@pytest.mark.parametrize("value", [b" Bearer the-clients-secret", b"Bearer the-clients-secret\x00"])
async def test_a_malformed_field_value_is_refused_without_being_logged(
    proxy: GrpcProxy, plain_grpc_server: GrpcServer, caplog: pytest.LogCaptureFixture, value: bytes
) -> None:
    # h2 quotes the offending value in its error; that value may be a credential.
    caplog.set_level(logging.DEBUG, logger="token_proxy")
    client = await RawH2.open(port_of(proxy))
    block = hpack.Encoder().encode(
        [
            (b":method", b"GET"),
            (b":scheme", b"http"),
            (b":authority", b"inventory.internal"),
            (b":path", b"/"),
            (b"authorization", value),
        ]
    )
    client.write_frames(HeadersFrame(1, block, flags=["END_HEADERS", "END_STREAM"]))
    try:
        received = await client.until_closed(CLOSE_WITHIN)
    finally:
        await client.close()
    goaway = received.goaway()
    assert goaway is not None
    assert goaway.error_code == PROTOCOL_ERROR
    assert "HTTP/2 protocol error" in caplog.text
    assert "the-clients-secret" not in caplog.text
    assert plain_grpc_server.calls == []
