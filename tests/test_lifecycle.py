"""Graceful shutdown and live reload of a real proxy process, driven by real signals."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.configs import upstream_entry
from tests.support.process import ProxyProcess
from tests.support.token_server import TokenServer
from tests.support.upstream import Upstream
from tests.support.waiting import eventually

pytestmark = pytest.mark.timeout(90)


async def admin_get(proxy: ProxyProcess, path: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{proxy.admin_port}{path}") as response,
    ):
        return response.status, await response.text()


async def through(proxy: ProxyProcess, url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url, proxy=proxy.url) as response:
        return response.status, await response.text()


def reloads(metrics: str, outcome: str) -> float:
    prefix = f'token_proxy_config_reloads_total{{outcome="{outcome}"}} '
    for line in metrics.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    raise AssertionError(f"no reload series for {outcome}")


@pytest.fixture
async def running(
    tmp_path: Path, token_server: TokenServer, upstream: Upstream
) -> AsyncIterator[ProxyProcess]:
    proxy = ProxyProcess(
        tmp_path,
        {
            "shutdown_grace_period": "20s",
            "upstreams": {
                "inventory": upstream_entry("inventory.internal", upstream.url, token_server)
            },
        },
    )
    await proxy.start()

    async def ready() -> bool:
        return (await admin_get(proxy, "/readyz"))[0] == 200

    await eventually(ready)
    yield proxy
    await proxy.stop()


async def test_sigterm_lets_in_flight_requests_finish_and_exits_zero(
    running: ProxyProcess, upstream: Upstream
) -> None:
    slow = asyncio.create_task(through(running, "http://inventory.internal/slow/1"))

    async def in_flight() -> bool:
        return any(seen.path == "/slow/1" for seen in upstream.received)

    await eventually(in_flight)
    running.signal(signal.SIGTERM)

    async def not_ready() -> bool:
        return (await admin_get(running, "/readyz"))[0] == 503

    await eventually(not_ready)

    async def refusing() -> bool:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", running.port)
        except OSError:
            return True
        writer.close()
        return False

    await eventually(refusing)
    assert not slow.done()
    upstream.release.set()
    status, body = await slow
    assert (status, body) == (200, "finally")
    assert await running.wait(30) == 0
    assert "Traceback" not in running.logs()


async def test_idle_keep_alive_connections_are_closed_on_sigterm(running: ProxyProcess) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
    writer.write(b"GET http://inventory.internal/a HTTP/1.1\r\nHost: inventory.internal\r\n\r\n")
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    length = int(
        next(
            line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
        ).split(b":")[1]
    )
    await reader.readexactly(length)
    running.signal(signal.SIGTERM)
    assert await asyncio.wait_for(reader.read(), timeout=10) == b""  # closed by the proxy
    writer.close()
    assert await running.wait(30) == 0


async def test_sighup_reload_adds_changes_and_removes_upstreams(
    running: ProxyProcess, token_server: TokenServer, upstream: Upstream
) -> None:
    status, _ = await through(running, "http://inventory.internal/one")
    assert status == 200
    fetches_before = token_server.fetch_count
    first_token = upstream.last().header("Authorization")
    assert first_token is not None

    running.write_config(
        {
            "upstreams": {
                "inventory": upstream_entry("inventory.internal", upstream.url, token_server),
                "billing": upstream_entry(
                    "billing.internal", upstream.url, token_server, scope="billing"
                ),
            }
        }
    )
    running.signal(signal.SIGHUP)

    async def reloaded(count: float) -> bool:
        return reloads((await admin_get(running, "/metrics"))[1], "success") >= count

    await eventually(lambda: reloaded(1))
    await through(running, "http://inventory.internal/two")
    assert upstream.last().header("Authorization") == first_token  # unchanged: token kept
    status, _ = await through(running, "http://billing.internal/b")
    assert status == 200
    billing_token = upstream.last().header("Authorization")
    assert billing_token is not None
    assert billing_token != first_token
    assert token_server.fetch_count == fetches_before + 1

    # Change inventory's token settings, remove billing.
    running.write_config(
        {
            "upstreams": {
                "inventory": upstream_entry(
                    "inventory.internal", upstream.url, token_server, scope="new"
                )
            }
        }
    )
    running.signal(signal.SIGHUP)
    await eventually(lambda: reloaded(2))
    await through(running, "http://inventory.internal/three")
    changed_token = upstream.last().header("Authorization")
    assert changed_token not in (None, first_token)
    assert token_server.requests[-1].form.get("scope") == ["new"]
    # billing.internal is no longer configured: no token for it on the very next request
    # (refused here, so that nothing tries to resolve the name).
    running.write_config(
        {
            "unknown_hosts": "deny",
            "upstreams": {
                "inventory": upstream_entry(
                    "inventory.internal", upstream.url, token_server, scope="new"
                )
            },
        }
    )
    running.signal(signal.SIGHUP)
    await eventually(lambda: reloaded(3))
    status, body = await through(running, "http://billing.internal/b")
    assert status == 403
    assert "host_not_allowed" in body


async def test_invalid_config_is_rejected_and_the_old_one_keeps_serving(
    running: ProxyProcess,
) -> None:
    running.config_path.write_text("upstreams: {inventory: {match: {hosts: []}}}\nbogus: 1\n")
    running.signal(signal.SIGHUP)

    async def rejected() -> bool:
        return reloads((await admin_get(running, "/metrics"))[1], "failure") >= 1

    await eventually(rejected)
    status, _ = await through(running, "http://inventory.internal/still")
    assert status == 200
    assert "configuration reload rejected" in running.logs()


async def test_configmap_symlink_swap_is_picked_up(
    tmp_path: Path, token_server: TokenServer, upstream: Upstream
) -> None:
    """Kubernetes updates a ConfigMap volume by swapping the `..data` symlink."""
    import yaml

    mount = tmp_path / "mount"
    mount.mkdir()
    proxy = ProxyProcess(tmp_path, {})

    def publish(version: str, config: dict[str, Any]) -> None:
        directory = mount / f"..{version}"
        directory.mkdir()
        full = {
            "listen": f"127.0.0.1:{proxy.port}",
            "admin_listen": f"127.0.0.1:{proxy.admin_port}",
            **config,
        }
        (directory / "config.yaml").write_text(yaml.safe_dump(full))
        link = mount / "..data_tmp"
        link.symlink_to(directory.name)
        os.replace(link, mount / "..data")

    publish(
        "v1",
        {
            "unknown_hosts": "deny",
            "upstreams": {
                "inventory": upstream_entry("inventory.internal", upstream.url, token_server)
            },
        },
    )
    (mount / "config.yaml").symlink_to("..data/config.yaml")
    proxy.config_path = mount / "config.yaml"
    await proxy.start()
    try:
        status, _ = await through(proxy, "http://billing.internal/x")
        assert status == 403  # not configured yet
        publish(
            "v2",
            {
                "unknown_hosts": "deny",
                "upstreams": {
                    "inventory": upstream_entry("inventory.internal", upstream.url, token_server),
                    "billing": upstream_entry("billing.internal", upstream.url, token_server),
                },
            },
        )

        async def picked_up() -> bool:
            return reloads((await admin_get(proxy, "/metrics"))[1], "success") >= 1

        await eventually(picked_up)
        status, _ = await through(proxy, "http://billing.internal/x")
        assert status == 200
        assert upstream.last().header("Authorization") is not None
    finally:
        await proxy.stop()
