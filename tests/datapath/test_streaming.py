"""1 GiB up and down through a real proxy process, with its memory staying flat."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.support.configs import upstream_entry
from tests.support.process import ProxyProcess, rss_bytes
from tests.support.token_server import TokenServer
from tests.support.upstream import Upstream

GIB = 1024**3
RSS_LIMIT = 100 * 1024**2
BLOCK = b"\xab" * (256 * 1024)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture
async def proxy_process(
    tmp_path: Path, token_server: TokenServer, upstream: Upstream
) -> AsyncIterator[ProxyProcess]:
    proxy = ProxyProcess(
        tmp_path,
        {
            "upstreams": {
                "inventory": upstream_entry("inventory.internal", upstream.url, token_server)
            }
        },
    )
    await proxy.start()
    yield proxy
    await proxy.stop()


class PeakRss:
    """Samples a process's RSS until stopped; keeps the peak."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = rss_bytes(pid)
        self._stop = asyncio.Event()

    async def run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes(self.pid))
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=0.05)
            except TimeoutError:
                continue

    def stop(self) -> None:
        self._stop.set()


async def test_one_gib_upload_streams_with_flat_memory(
    proxy_process: ProxyProcess, upstream: Upstream
) -> None:
    digest = hashlib.sha256()

    async def body() -> AsyncIterator[bytes]:
        sent = 0
        while sent < GIB:
            digest.update(BLOCK)
            sent += len(BLOCK)
            yield BLOCK

    sampler = PeakRss(proxy_process.pid)
    sampling = asyncio.create_task(sampler.run())
    timeout = aiohttp.ClientTimeout(total=240)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.post(
            "http://inventory.internal/upload",
            data=body(),
            proxy=proxy_process.url,
            headers={"Content-Length": str(GIB)},
        ) as response,
    ):
        result = await response.json()
    sampler.stop()
    await sampling
    assert response.status == 200
    assert result == {"size": GIB, "sha256": digest.hexdigest()}
    assert upstream.last().header("Authorization") is not None
    assert sampler.peak < RSS_LIMIT, f"proxy RSS peaked at {sampler.peak / 2**20:.0f} MiB"


async def test_one_gib_download_streams_with_flat_memory(proxy_process: ProxyProcess) -> None:
    sampler = PeakRss(proxy_process.pid)
    sampling = asyncio.create_task(sampler.run())
    received = 0
    timeout = aiohttp.ClientTimeout(total=240)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(f"http://inventory.internal/stream/{GIB}", proxy=proxy_process.url) as response,
    ):
        assert response.status == 200
        async for data in response.content.iter_chunked(1024 * 1024):
            received += len(data)
    sampler.stop()
    await sampling
    assert received == GIB
    assert sampler.peak < RSS_LIMIT, f"proxy RSS peaked at {sampler.peak / 2**20:.0f} MiB"
