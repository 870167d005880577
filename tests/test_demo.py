"""`token-proxy demo` works as the README says: curl through it gains a token."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys

import pytest

from tests.support.process import free_port
from tests.support.waiting import eventually


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_demo_request_gains_its_token() -> None:
    ports = {name: free_port() for name in ("port", "admin-port", "token-port", "api-port")}
    args = [arg for name, port in ports.items() for arg in (f"--{name}", str(port))]
    demo = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "demo",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    proxy = f"http://127.0.0.1:{ports['port']}"

    async def curl(*extra: str, env: dict[str, str] | None = None) -> str:
        process = await asyncio.create_subprocess_exec(
            "curl", "-s", *extra, stdout=asyncio.subprocess.PIPE, env=env
        )
        out, _ = await process.communicate()
        return out.decode()

    async def answers() -> bool:
        return "in_stock" in await curl("-x", proxy, "http://inventory.demo/api/stock/1")

    try:
        await eventually(answers, within=30)
        via_env = await curl(
            "http://inventory.demo/api/stock/2", env={**os.environ, "http_proxy": proxy}
        )
        assert json.loads(via_env)["item"] == "2"
        direct = await curl(f"http://127.0.0.1:{ports['api-port']}/api/stock/1")
        assert json.loads(direct) == {"error": "invalid_token"}
    finally:
        demo.send_signal(signal.SIGINT)
        output, _ = await asyncio.wait_for(demo.communicate(), timeout=30)
    assert demo.returncode == 0
    assert f"curl -x {proxy} http://inventory.demo/api/stock/1" in output.decode()
