"""No token or secret ever reaches a log line, an error body, /status or /metrics.

The proxy runs as a real process with debug logging, JSON logs and the access log on,
and is driven through success, token-endpoint failures, upstream 401s and upstream
outages; then every byte it wrote or answered is searched for every credential.
"""

from __future__ import annotations

from pathlib import Path

import aiohttp

from tests.support.configs import CLIENT_ID, CLIENT_SECRET
from tests.support.process import ProxyProcess
from tests.support.token_server import TokenServer
from tests.support.upstream import Upstream
from tests.support.waiting import eventually


async def test_credentials_never_leak(
    tmp_path: Path, token_server: TokenServer, upstream: Upstream
) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(CLIENT_SECRET + "\n")
    proxy = ProxyProcess(
        tmp_path,
        {
            "log_level": "debug",
            "log_format": "json",
            "access_log": True,
            "upstreams": {
                "inventory": {
                    "match": {"hosts": ["inventory.internal"]},
                    "url": upstream.url,
                    "token": {
                        "token_url": token_server.url,
                        "client_id": CLIENT_ID,
                        "client_secret_file": str(secret_file),
                        "retry_initial": "100ms",
                        "retry_max": "200ms",
                    },
                },
                "broken": {
                    "match": {"hosts": ["broken.internal"]},
                    "url": "http://127.0.0.1:9",
                    "token": {
                        "token_url": token_server.url,
                        "client_id": CLIENT_ID,
                        "client_secret": CLIENT_SECRET,
                    },
                },
            },
        },
    )
    await proxy.start()
    bodies: list[str] = []
    try:
        async with aiohttp.ClientSession() as session:

            async def call(url: str, **kwargs: object) -> int:
                async with session.get(url, proxy=proxy.url, **kwargs) as response:  # type: ignore[arg-type]
                    bodies.append(await response.text())
                    bodies.append(str(response.headers))
                    return response.status

            assert await call("http://inventory.internal/sized/10?access_token=in-query") == 200
            assert await call("http://broken.internal/down") == 502
            token_server.revoke(token_server.issued[-1])
            assert await call("http://inventory.internal/sized/11") == 200  # 401, new token, retry
            token_server.set_failing("invalid_client")
            token_server.revoke(token_server.issued[-1])
            assert await call("http://inventory.internal/sized/12") in (401, 503)
            for path in ("/status", "/metrics", "/readyz", "/healthz"):
                async with session.get(f"http://127.0.0.1:{proxy.admin_port}{path}") as response:
                    bodies.append(await response.text())
            token_server.set_failing(None)

            async def recovered() -> bool:
                return await call("http://inventory.internal/sized/13") == 200

            await eventually(recovered)
    finally:
        await proxy.stop()
    logs = proxy.logs()
    assert '"event": "access"' in logs or '"event":"access"' in logs
    assert "token fetch" in logs.lower() or "token_fetch" in logs
    everything = logs + "\n".join(bodies)
    assert token_server.issued
    for token in token_server.issued:
        assert token not in everything
    assert CLIENT_SECRET not in everything
    assert "in-query" not in logs
    assert "Traceback" not in logs
