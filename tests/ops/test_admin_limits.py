"""The admin port's limits: connection cap, header and idle timeouts, head size.

The admin port listens on all interfaces, so it must not let anyone on the pod network
hold connections for ever or starve the proxy ports of descriptors. In-process tests
drive `AdminServer` with real sockets; the flood test runs `token-proxy run` as a
child process with a low descriptor limit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy.config import Address, LimitsConfig
from proxy.ops.admin import AdminServer, create_admin_app
from proxy.ops.admin_limits import admin_connection_cap
from proxy.ops.metrics import Metrics
from proxy.ops.throttled_log import ThrottledLog
from tests.support.configs import upstream_entry
from tests.support.process import ProxyProcess
from tests.support.token_server import TokenServer
from tests.support.upstream import Upstream
from tests.support.waiting import eventually

pytestmark = pytest.mark.timeout(90)


class _NoUpstreams:
    draining = False

    def upstreams(self) -> dict[str, object]:
        return {}


async def start_admin(**limits: object) -> AdminServer:
    app = create_admin_app(Metrics(), _NoUpstreams())  # type: ignore[arg-type]
    server = AdminServer(app, Address("127.0.0.1", 0), LimitsConfig(**limits))  # type: ignore[arg-type]
    await server.start()
    return server


@pytest.fixture
async def admin_servers() -> AsyncIterator[list[AdminServer]]:
    servers: list[AdminServer] = []
    yield servers
    for server in servers:
        await server.close()


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def healthz(port: int) -> bytes:
    reader, writer = await connect(port)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """Everything the server sends until it closes; fails if it has not closed in time."""
    received = b""
    async with asyncio.timeout(seconds):
        try:
            while chunk := await reader.read(65536):
                received += chunk
        except ConnectionError:
            pass  # closed while the client was still sending: a reset may follow the answer
    return received


async def test_an_unfinished_head_gets_408_at_the_header_timeout(
    admin_servers: list[AdminServer],
) -> None:
    server = await start_admin(header_timeout=0.3)
    admin_servers.append(server)
    reader, writer = await connect(server.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: admin\r\n")
    started = time.monotonic()
    answer = await closed_within(reader, 5)
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert 0.2 < time.monotonic() - started < 4
    writer.close()


async def test_a_silent_connection_is_closed_at_the_header_timeout(
    admin_servers: list[AdminServer],
) -> None:
    server = await start_admin(header_timeout=0.3)
    admin_servers.append(server)
    reader, writer = await connect(server.port)
    assert await closed_within(reader, 5) == b""
    writer.close()


async def test_a_head_trickled_byte_by_byte_is_cut_at_the_header_timeout(
    admin_servers: list[AdminServer],
) -> None:
    server = await start_admin(header_timeout=0.5)
    admin_servers.append(server)
    reader, writer = await connect(server.port)
    started = time.monotonic()
    for byte in b"GET /healthz HTTP/1.1\r\nX-Slow: " + b"a" * 200:
        if reader.at_eof() or writer.is_closing() or time.monotonic() - started > 5:
            break
        try:
            writer.write(bytes([byte]))
            await writer.drain()
        except ConnectionError:
            break
        await asyncio.sleep(0.02)  # the slow client under test, not synchronisation
    answer = await closed_within(reader, 5)
    assert answer == b"" or answer.startswith(b"HTTP/1.1 408 ")
    assert time.monotonic() - started < 4


async def test_an_oversized_head_is_cut_off(admin_servers: list[AdminServer]) -> None:
    server = await start_admin(max_header_size=4096)
    admin_servers.append(server)
    reader, writer = await connect(server.port)
    writer.write(b"GET /healthz HTTP/1.1\r\n" + b"X-Big: " + b"a" * 200_000)
    answer = await closed_within(reader, 5)
    assert b"200 OK" not in answer
    writer.close()


async def test_keep_alive_and_pipelined_requests_still_work(
    admin_servers: list[AdminServer],
) -> None:
    server = await start_admin(header_timeout=2.0, idle_timeout=2.0)
    admin_servers.append(server)
    reader, writer = await connect(server.port)
    request = b"GET /healthz HTTP/1.1\r\nHost: admin\r\n\r\n"
    writer.write(request * 3)
    for _ in range(3):
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 ")
        assert await asyncio.wait_for(reader.readexactly(3), 5) == b"ok\n"
    # A request split across reads, well inside the timeout, is served.
    writer.write(request[:10])
    await writer.drain()
    writer.write(request[10:])
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200 ")
    await asyncio.wait_for(reader.readexactly(3), 5)
    # Then, idle: closed by the keep-alive timeout.
    assert await closed_within(reader, 5) == b""
    writer.close()


async def test_connections_over_the_cap_are_closed_at_once(
    admin_servers: list[AdminServer],
) -> None:
    server = await start_admin(admin_max_connections=5, header_timeout=30)
    admin_servers.append(server)
    held = [await connect(server.port) for _ in range(5)]
    await eventually(lambda: _at(server, 5), within=5)
    reader, writer = await connect(server.port)
    assert await closed_within(reader, 5) == b""
    writer.close()
    for _, held_writer in held:
        held_writer.close()
    await eventually(lambda: _at(server, 0), within=5)
    assert (await healthz(server.port)).startswith(b"HTTP/1.1 200 ")


async def _at(server: AdminServer, count: int) -> bool:
    assert server.guard is not None
    return server.guard.open == count


def test_the_cap_stays_under_an_eighth_of_the_descriptor_limit() -> None:
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert admin_connection_cap(64) == min(64, soft // 8)
    assert admin_connection_cap(10**6) <= soft // 8


async def test_an_admin_flood_with_few_descriptors_leaves_the_proxy_port_serving(
    tmp_path: Path, token_server: TokenServer, upstream: Upstream
) -> None:
    proxy = ProxyProcess(
        tmp_path,
        {
            "limits": {"header_timeout": "3s"},
            "upstreams": {
                "inventory": upstream_entry("inventory.internal", upstream.url, token_server)
            },
        },
    )
    await proxy.start(max_open_files=400)
    flood: list[asyncio.StreamWriter] = []
    try:
        for _ in range(420):
            try:
                _, writer = await connect(proxy.admin_port)
            except OSError:
                break
            writer.write(b"GET /healthz HTTP/1.1\r\n")  # a head that never ends
            flood.append(writer)
        # The forward port still answers, token and all, with the flood held open.
        for _ in range(20):
            reader, writer = await connect(proxy.port)
            writer.write(
                b"GET http://inventory.internal/api/x HTTP/1.1\r\n"
                b"Host: inventory.internal\r\nConnection: close\r\n\r\n"
            )
            answer = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
        assert all(seen.header("Authorization") for seen in upstream.received)
        assert len(upstream.received) == 20

        # The flood's connections are let go at the header timeout; /healthz is back.
        async def healthy() -> bool:
            try:
                return (await healthz(proxy.admin_port)).startswith(b"HTTP/1.1 200 ")
            except (OSError, TimeoutError):
                return False

        await eventually(healthy, within=30)
    finally:
        for writer in flood:
            writer.close()
        await proxy.stop()
    # Refusals are logged, but rate-limited: not a line (or traceback) per attempt.
    assert len(proxy.logs()) < 20_000, proxy.logs()[-2000:]


def test_repeated_loop_errors_are_logged_once_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # What an event loop reports for every failed accept() when descriptors run out.
    clock = [0.0]
    throttle = ThrottledLog(logging.getLogger("test.throttle"), 10.0, clock=lambda: clock[0])
    loop = asyncio.new_event_loop()
    try:
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            for _ in range(1000):
                throttle.loop_exception_handler(
                    loop,
                    {"message": "socket.accept() out of system resource", "exception": OSError(24)},
                )
            clock[0] = 11.0
            throttle.loop_exception_handler(
                loop,
                {"message": "socket.accept() out of system resource", "exception": OSError(24)},
            )
    finally:
        loop.close()
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 2
    assert "999 more like this" in lines[1]
