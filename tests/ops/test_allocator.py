"""The allocator setting `token-proxy run` applies for relaying large bodies."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest

from proxy.ops.allocator import tune_for_streaming
from tests.support.configs import upstream_entry
from tests.support.process import ProxyProcess
from tests.support.token_server import TokenServer
from tests.support.upstream import Upstream
from tests.support.waiting import eventually

GLIBC = platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not GLIBC, reason="the setting is glibc's")
def test_the_top_pad_is_set_on_glibc() -> None:
    assert tune_for_streaming()


@pytest.mark.skipif(GLIBC, reason="for other C libraries")
def test_other_c_libraries_are_left_alone() -> None:
    assert not tune_for_streaming()


@pytest.mark.skipif(not GLIBC, reason="the setting is glibc's")
async def test_token_proxy_run_sets_it_at_start(
    tmp_path: Path, token_server: TokenServer, upstream: Upstream
) -> None:
    proxy = ProxyProcess(
        tmp_path,
        {
            "log_level": "debug",
            "upstreams": {
                "inventory": upstream_entry("inventory.internal", upstream.url, token_server)
            },
        },
    )
    await proxy.start()
    try:

        async def logged() -> bool:
            return "malloc top pad set" in proxy.logs()

        await eventually(logged)
    finally:
        await proxy.stop()
