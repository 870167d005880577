"""256 MiB gRPC streams, down and up, through a token-proxy process's h2c port, with the
process's memory staying flat.

A real grpcio upstream sends 4,096 messages of 64 KiB, each starting with its index
(server streaming), or reads as many from the client (client streaming), through the
upstream's reverse `listen` port of a proxy running as `python -m proxy run`, while the
test samples the proxy's VmRSS every 50 ms. Flow control both ways bounds what the proxy
holds for a stream (256 KiB per stream towards the upstream, 64 KiB from the client),
so its RSS may not grow by more than `RSS_GROWTH_LIMIT` over what it was after a
warm-up call; a proxy that buffered the body would grow by hundreds of MiB. Every byte
must arrive: the message count, the total and a SHA-256 over the bytes in order, and
every call must reach the upstream with a token the token endpoint issued.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import grpc
import pytest

from tests.support.configs import upstream_entry
from tests.support.grpc_server import SERVICE, GrpcServer
from tests.support.process import ProxyProcess, free_port, rss_bytes
from tests.support.token_server import TokenServer

MIB = 1024 * 1024
MESSAGE_SIZE = 64 * 1024
MESSAGES = 4096  # 256 MiB
WARM_UP_MESSAGES = 64
INDEX_BYTES = 8
RSS_GROWTH_LIMIT = 64 * MIB
SAMPLE_INTERVAL = 0.05
CALL_TIMEOUT = 60.0
# The block every message is cut from: not one repeated byte, so a checksum over the
# stream notices bytes from the wrong place.
BLOCK = random.Random(20).randbytes(MESSAGE_SIZE)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def numbered(index: int, size: int) -> bytes:
    return index.to_bytes(INDEX_BYTES, "big") + BLOCK[INDEX_BYTES:size]


class NumberedStreams(GrpcServer):
    """`ServerStream` answers `b"<count>,<size>"` with messages that carry their index;
    `Count` (client-streaming) answers `b"<messages>:<bytes>:<sha256>"` of what it read."""

    def _handlers(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "ServerStream": grpc.unary_stream_rpc_method_handler(self._server_stream),
                "Count": grpc.stream_unary_rpc_method_handler(self._count),
            },
        )

    def _count(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        self._record("Count", context)
        digest = hashlib.sha256()
        messages = total = 0
        for message in requests:
            digest.update(message)
            messages += 1
            total += len(message)
        return b"%d:%d:%s" % (messages, total, digest.hexdigest().encode())

    def _server_stream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        self._record("ServerStream", context)
        count, size = (int(part) for part in request.split(b","))
        for index in range(count):
            with self._lock:
                self.produced += 1
            yield numbered(index, size)


def expected_digest(count: int, size: int) -> str:
    digest = hashlib.sha256()
    for index in range(count):
        digest.update(numbered(index, size))
    return digest.hexdigest()


def channel(port: int) -> grpc.Channel:
    options = [("grpc.enable_http_proxy", 0), ("grpc.enable_retries", 0)]
    return grpc.insecure_channel(f"127.0.0.1:{port}", options=options)


def download(port: int, count: int, size: int) -> tuple[int, int, str]:
    """Messages, bytes and SHA-256 of a `ServerStream` call through `port` (blocking)."""
    with channel(port) as open_channel:
        call = open_channel.unary_stream(f"/{SERVICE}/ServerStream")
        digest = hashlib.sha256()
        messages = total = 0
        for message in call(b"%d,%d" % (count, size), timeout=CALL_TIMEOUT):
            digest.update(message)
            messages += 1
            total += len(message)
        return messages, total, digest.hexdigest()


def upload(port: int, count: int, size: int) -> tuple[int, int, str]:
    """What `Count` read of `count` numbered messages sent through `port` (blocking)."""
    with channel(port) as open_channel:
        call = open_channel.stream_unary(f"/{SERVICE}/Count")
        answer = call((numbered(index, size) for index in range(count)), timeout=CALL_TIMEOUT)
        messages, total, digest = answer.split(b":")
        return int(messages), int(total), digest.decode()


class PeakRss:
    """Samples a process's VmRSS every 50 ms until stopped or `within` seconds pass."""

    def __init__(self, pid: int, within: float) -> None:
        self.pid = pid
        self.peak = rss_bytes(pid)
        self.samples = 1
        self.deadline = time.monotonic() + within
        self._stop = asyncio.Event()

    async def run(self) -> None:
        while not self._stop.is_set() and time.monotonic() < self.deadline:
            self.peak = max(self.peak, rss_bytes(self.pid))
            self.samples += 1
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=SAMPLE_INTERVAL)
            except TimeoutError:
                continue

    def stop(self) -> None:
        self._stop.set()


@pytest.fixture
def upstream_server() -> Iterator[NumberedStreams]:
    server = NumberedStreams(workers=4)
    with server:
        yield server


@pytest.fixture
async def reverse_proxy(
    tmp_path: Path, token_server: TokenServer, upstream_server: NumberedStreams
) -> AsyncIterator[tuple[ProxyProcess, int]]:
    reverse_port = free_port()
    entry = upstream_entry(
        "inventory.internal", f"http://127.0.0.1:{upstream_server.port}", token_server
    )
    proxy = ProxyProcess(
        tmp_path,
        {
            "log_level": "warning",
            "upstreams": {"inventory": {**entry, "listen": f"127.0.0.1:{reverse_port}"}},
        },
    )
    await proxy.start()
    try:
        yield proxy, reverse_port
    finally:
        await proxy.stop()


async def peak_during(
    proxy: ProxyProcess, transfer: Callable[[], tuple[int, int, str]]
) -> tuple[tuple[int, int, str], int, int]:
    """The result of `transfer` (run in a thread), the proxy's RSS just before it and
    its peak during it; fails if too few samples were taken to have seen a peak."""
    baseline = rss_bytes(proxy.pid)
    sampler = PeakRss(proxy.pid, within=CALL_TIMEOUT + 10)
    sampling = asyncio.create_task(sampler.run())
    started = time.monotonic()
    try:
        result = await asyncio.wait_for(asyncio.to_thread(transfer), CALL_TIMEOUT + 5)
    finally:
        sampler.stop()
        await sampling
    seconds = time.monotonic() - started
    # Enough samples that a buffered body could not have come and gone between two.
    assert sampler.samples >= max(3, int(seconds / SAMPLE_INTERVAL) // 4), (
        f"{sampler.samples} RSS samples in {seconds:.1f} s"
    )
    return result, baseline, sampler.peak


def assert_flat(baseline: int, peak: int, total: int) -> None:
    growth = peak - baseline
    assert growth < RSS_GROWTH_LIMIT, (
        f"proxy RSS grew by {growth / MIB:.1f} MiB (from {baseline / MIB:.1f} to "
        f"{peak / MIB:.1f} MiB) during a {total // MIB} MiB stream"
    )


def assert_tokens(server: NumberedStreams, token_server: TokenServer, calls: int) -> None:
    authorizations = [call.metadata.get("authorization", "") for call in server.calls]
    assert len(authorizations) == calls
    assert all(
        value.startswith("Bearer ") and token_server.is_valid(value.removeprefix("Bearer "))
        for value in authorizations
    ), authorizations


@pytest.mark.parametrize("transfer", [download, upload], ids=["server_stream", "client_stream"])
async def test_a_256_mib_stream_keeps_the_proxy_memory_flat(
    reverse_proxy: tuple[ProxyProcess, int],
    upstream_server: NumberedStreams,
    token_server: TokenServer,
    transfer: Callable[[int, int, int], tuple[int, int, str]],
) -> None:
    proxy, port = reverse_proxy
    # Warm-up: the token, the HTTP/2 connection upstream, the allocator's arenas.
    warm_up = await asyncio.wait_for(
        asyncio.to_thread(transfer, port, WARM_UP_MESSAGES, MESSAGE_SIZE), CALL_TIMEOUT
    )
    assert warm_up[:2] == (WARM_UP_MESSAGES, WARM_UP_MESSAGES * MESSAGE_SIZE)

    (messages, total, digest), baseline, peak = await peak_during(
        proxy, lambda: transfer(port, MESSAGES, MESSAGE_SIZE)
    )

    # What the receiving end read: every message, every byte, in order.
    assert (messages, total) == (MESSAGES, MESSAGES * MESSAGE_SIZE)
    assert digest == expected_digest(MESSAGES, MESSAGE_SIZE)
    assert_flat(baseline, peak, total)
    assert_tokens(upstream_server, token_server, calls=2)
