"""The forward proxy (HTTP_PROXY) with real clients: aiohttp, requests and curl."""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import json
import shutil
import socket
import subprocess

import aiohttp
import pytest
import requests
from yarl import URL

from proxy.app import ProxyApp
from proxy.config import Address, LimitsConfig
from tests.support.configs import (
    CLIENT_ID,
    CLIENT_SECRET,
    StartProxy,
    proxy_config,
    proxy_url,
    start_inventory,
    token_config,
    upstream_config,
)
from tests.support.token_server import TokenServer
from tests.support.upstream import Upstream
from tests.support.waiting import eventually


async def get(app: ProxyApp, url: str, **kwargs: object) -> tuple[int, dict[str, str], bytes]:
    """GET `url` through the proxy; the URL is sent as written (encoded=True)."""
    async with (
        aiohttp.ClientSession(auto_decompress=False) as session,
        session.get(
            URL(url, encoded=True),
            proxy=proxy_url(app),
            allow_redirects=False,
            **kwargs,  # type: ignore[arg-type]
        ) as response,
    ):
        return response.status, dict(response.headers), await response.read()


async def test_matched_request_gets_the_token_and_exact_path(
    inventory_proxy: ProxyApp, upstream: Upstream, token_server: TokenServer
) -> None:
    status, _, body = await get(
        inventory_proxy, "http://inventory.internal/api/stock/1?sku=a%2Fb&x=%20"
    )
    assert status == 200
    seen = upstream.last()
    assert seen.path == "/api/stock/1?sku=a%2Fb&x=%20"
    # The upstream's `url` decides where the request goes, and so its Host.
    assert seen.header("Host") == f"127.0.0.1:{upstream.port}"
    assert seen.all("Authorization") == [f"Bearer {token_server.issued[-1]}"]
    assert json.loads(body)["path"] == "/api/stock/1?sku=a%2Fb&x=%20"


async def test_requests_library_through_the_proxy(
    inventory_proxy: ProxyApp, upstream: Upstream, token_server: TokenServer
) -> None:
    proxies = {"http": proxy_url(inventory_proxy)}

    def call() -> requests.Response:
        return requests.post(
            "http://inventory.internal/orders", json={"sku": 1}, proxies=proxies, timeout=10
        )

    response = await asyncio.to_thread(call)
    assert response.status_code == 200
    seen = upstream.last()
    assert seen.method == "POST"
    assert seen.header("Authorization") == f"Bearer {token_server.issued[-1]}"
    assert json.loads(response.json()["body"]) == {"sku": 1}


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_curl_with_http_proxy(
    inventory_proxy: ProxyApp, upstream: Upstream, token_server: TokenServer
) -> None:
    result = await asyncio.to_thread(
        subprocess.run,
        ["curl", "-sS", "-x", proxy_url(inventory_proxy), "http://inventory.internal/api/stock/7"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["path"] == "/api/stock/7"
    assert upstream.last().header("Authorization") == f"Bearer {token_server.issued[-1]}"


async def test_unmatched_host_passes_through_without_token(
    inventory_proxy: ProxyApp, upstream: Upstream
) -> None:
    status, _, _ = await get(inventory_proxy, f"{upstream.url}/plain?q=1")
    assert status == 200
    seen = upstream.last()
    assert seen.path == "/plain?q=1"
    assert seen.header("Authorization") is None
    assert seen.header("Host") == f"127.0.0.1:{upstream.port}"


async def test_unknown_hosts_deny_answers_403(
    start_proxy: StartProxy, token_server: TokenServer, upstream: Upstream
) -> None:
    app = await start_inventory(
        start_proxy, token_server, upstream, proxy={"unknown_hosts": "deny"}
    )
    status, headers, body = await get(app, f"{upstream.url}/x")
    assert status == 403
    assert headers["Content-Type"] == "application/json"
    assert json.loads(body)["error"] == "host_not_allowed"
    assert json.loads(body)["upstream"] is None
    assert upstream.received == []


async def test_hop_by_hop_and_proxy_authorization_are_not_forwarded(
    inventory_proxy: ProxyApp, upstream: Upstream
) -> None:
    headers = {
        "Connection": "keep-alive, X-Drop-Me",
        "X-Drop-Me": "1",
        "Keep-Alive": "timeout=5",
        "Proxy-Authorization": "Basic cHJveHk6c2VjcmV0",
        "TE": "trailers",
        "X-Keep-Me": "yes",
    }
    status, _, _ = await get(inventory_proxy, "http://inventory.internal/h", headers=headers)
    assert status == 200
    names = {name.lower() for name, _ in upstream.last().headers}
    assert "x-keep-me" in names
    assert not names & {"x-drop-me", "keep-alive", "proxy-authorization", "te"}


async def test_overwrite_replaces_the_applications_authorization_once(
    inventory_proxy: ProxyApp, upstream: Upstream, token_server: TokenServer
) -> None:
    await get(
        inventory_proxy, "http://inventory.internal/a", headers={"Authorization": "Basic abc"}
    )
    assert upstream.last().all("Authorization") == [f"Bearer {token_server.issued[-1]}"]


async def test_overwrite_false_keeps_the_applications_authorization(
    start_proxy: StartProxy, token_server: TokenServer, upstream: Upstream
) -> None:
    app = await start_inventory(start_proxy, token_server, upstream, overwrite=False)
    await get(app, "http://inventory.internal/a", headers={"Authorization": "Basic abc"})
    assert upstream.last().all("Authorization") == ["Basic abc"]
    await get(app, "http://inventory.internal/b")
    assert upstream.last().all("Authorization") == [f"Bearer {token_server.issued[-1]}"]


async def test_custom_header_name(
    start_proxy: StartProxy, token_server: TokenServer, upstream: Upstream
) -> None:
    app = await start_inventory(start_proxy, token_server, upstream, header="X-Api-Token")
    await get(app, "http://inventory.internal/a")
    seen = upstream.last()
    assert seen.all("X-Api-Token") == [f"Bearer {token_server.issued[-1]}"]
    assert seen.header("Authorization") is None


async def test_redirects_cookies_and_encodings_come_back_untouched(
    inventory_proxy: ProxyApp, upstream: Upstream
) -> None:
    status, headers, _ = await get(inventory_proxy, "http://inventory.internal/redirect")
    assert status == 302
    assert headers["Location"] == "http://elsewhere.example/landing"
    assert len(upstream.received) == 1  # not followed

    status, headers, _ = await get(inventory_proxy, "http://inventory.internal/cookie")
    assert "session=abc123" in headers["Set-Cookie"]

    status, headers, body = await get(inventory_proxy, "http://inventory.internal/gzip")
    assert headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(body) == b"hello " * 100


async def test_only_host_the_token_and_via_are_added(
    inventory_proxy: ProxyApp, upstream: Upstream
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", inventory_proxy.port)
    writer.write(b"GET http://inventory.internal/bare HTTP/1.1\r\nHost: inventory.internal\r\n\r\n")
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    writer.close()
    names = sorted(name.lower() for name, _ in upstream.last().headers)
    assert names == ["authorization", "host", "via"]


async def test_chunked_request_and_response_stream(
    inventory_proxy: ProxyApp, upstream: Upstream
) -> None:
    async def produce():  # type: ignore[no-untyped-def]
        for _ in range(20):
            yield b"z" * 10_000

    async with (
        aiohttp.ClientSession() as session,
        session.post(
            "http://inventory.internal/upload", data=produce(), proxy=proxy_url(inventory_proxy)
        ) as response,
    ):
        assert response.status == 200
        assert (await response.json())["size"] == 200_000
    assert upstream.last().header("Transfer-Encoding") == "chunked"

    async with (
        aiohttp.ClientSession() as session,
        session.get(
            "http://inventory.internal/stream/300000", proxy=proxy_url(inventory_proxy)
        ) as response,
    ):
        assert response.headers["Transfer-Encoding"] == "chunked"
        assert len(await response.read()) == 300_000


async def test_keep_alive_connections_to_the_upstream_are_reused(
    inventory_proxy: ProxyApp, upstream: Upstream
) -> None:
    async with aiohttp.ClientSession() as session:
        for index in range(5):
            async with session.get(
                f"http://inventory.internal/k{index}", proxy=proxy_url(inventory_proxy)
            ) as r:
                assert r.status == 200
                await r.read()
    peers = {seen.peer for seen in upstream.received}
    assert len(upstream.received) == 5
    assert len(peers) == 1


async def test_upstream_down_is_502(
    start_proxy: StartProxy, token_server: TokenServer, upstream: Upstream
) -> None:
    app = await start_inventory(start_proxy, token_server, upstream, url="http://127.0.0.1:9")
    status, _, body = await get(app, "http://inventory.internal/x")
    assert status == 502
    assert json.loads(body) == {
        "error": "upstream_unreachable",
        "upstream": "inventory",
        "detail": json.loads(body)["detail"],
    }


async def test_upstream_silence_is_504(
    start_proxy: StartProxy, token_server: TokenServer, upstream: Upstream
) -> None:
    app = await start_inventory(start_proxy, token_server, upstream, timeout=0.5)
    status, _, body = await get(app, "http://inventory.internal/slow/1")
    upstream.release.set()
    assert status == 504
    assert json.loads(body)["error"] == "upstream_timeout"


async def test_silence_on_a_reused_connection_is_not_sent_again(
    start_proxy: StartProxy, token_server: TokenServer, upstream: Upstream
) -> None:
    # A stale keep-alive connection is retried on a fresh one; a slow upstream is not:
    # a second try would double its load and the client's wait.
    app = await start_inventory(start_proxy, token_server, upstream, timeout=0.5)
    status, _, _ = await get(app, "http://inventory.internal/first")
    assert status == 200
    status, _, body = await get(app, "http://inventory.internal/slow/once")
    upstream.release.set()
    assert status == 504
    assert json.loads(body)["error"] == "upstream_timeout"
    assert [seen.path for seen in upstream.received] == ["/first", "/slow/once"]
    assert upstream.received[1].peer == upstream.received[0].peer  # it was reused


async def test_each_request_waits_as_long_as_its_own_upstream_allows(
    start_proxy: StartProxy, token_server: TokenServer, upstream: Upstream
) -> None:
    # Two upstreams send to one origin, so they share its keep-alive connections; the
    # timeout that applies is the request's upstream's, not the one that opened them.
    token = token_config(token_server)
    app = await start_proxy(
        proxy_config(
            upstream_config("quick", ["quick.internal"], token, url=upstream.url, timeout=0.5),
            upstream_config("patient", ["patient.internal"], token, url=upstream.url, timeout=30.0),
        )
    )
    status, _, _ = await get(app, "http://quick.internal/first")
    assert status == 200  # its connection now waits in the pool
    patient = asyncio.create_task(get(app, "http://patient.internal/slow/patient"))
    try:

        async def arrived() -> bool:
            return len(upstream.received) == 2

        await eventually(arrived)
        assert upstream.received[1].peer == upstream.received[0].peer  # the same connection
        # A quick request sent after it times out: the patient one has waited longer.
        status, _, body = await get(app, "http://quick.internal/slow/quick")
        assert status == 504
        assert json.loads(body)["upstream"] == "quick"
        assert not patient.done()
        upstream.release.set()
        status, _, body = await patient
        assert (status, body) == (200, b"finally")
        paths = [seen.path for seen in upstream.received]
        assert paths == ["/first", "/slow/patient", "/slow/quick"]  # each sent once
    finally:
        upstream.release.set()
        if not patient.done():
            patient.cancel()


async def test_token_unavailable_is_503_with_retry_after(
    start_proxy: StartProxy, token_server: TokenServer, upstream: Upstream
) -> None:
    token_server.set_failing("500")
    app = await start_inventory(start_proxy, token_server, upstream)
    status, headers, body = await get(app, "http://inventory.internal/x")
    assert status == 503
    assert int(headers["Retry-After"]) >= 1
    assert json.loads(body)["error"] == "token_unavailable"
    assert json.loads(body)["upstream"] == "inventory"
    assert upstream.received == []  # never sent without a token
    # Other traffic is unaffected.
    status, _, _ = await get(app, f"{upstream.url}/plain")
    assert status == 200


async def test_path_prefix_limits_what_gets_the_token(
    start_proxy: StartProxy, token_server: TokenServer, upstream: Upstream
) -> None:
    host = f"127.0.0.1:{upstream.port}"
    app = await start_proxy(
        proxy_config(
            upstream_config("inventory", [host], token_config(token_server), path_prefix="/api")
        )
    )
    for path, expect_token in [
        ("/api", True),
        ("/api/x?y", True),
        ("/apiary", False),
        ("/other", False),
    ]:
        status, _, _ = await get(app, f"http://{host}{path}")
        assert status == 200
        assert (upstream.last().header("Authorization") is not None) is expect_token, path


@pytest.mark.parametrize(
    ("purge_on_status", "replayed"), [((401, 403), True), ((401,), False)], ids=["403", "default"]
)
async def test_purge_on_status_drops_the_refused_token(
    start_proxy: StartProxy,
    token_server: TokenServer,
    upstream: Upstream,
    purge_on_status: tuple[int, ...],
    replayed: bool,
) -> None:
    upstream.refusal_status = 403
    app = await start_inventory(
        start_proxy, token_server, upstream, purge_on_status=purge_on_status
    )
    status, _, _ = await get(app, "http://inventory.internal/warm")
    assert status == 200
    first = token_server.issued[-1]
    token_server.revoke(first)
    status, _, _ = await get(app, "http://inventory.internal/again")
    tried = [seen.header("Authorization") for seen in upstream.received if seen.path == "/again"]
    if replayed:
        assert status == 200
        assert len(token_server.issued) == 2
        assert tried == [f"Bearer {first}", f"Bearer {token_server.issued[-1]}"]
    else:
        # A 403 outside purge_on_status is relayed, and the token kept.
        assert status == 403
        assert len(token_server.issued) == 1
        assert tried == [f"Bearer {first}"]


async def test_methods_tell_upstreams_of_one_host_apart(
    start_proxy: StartProxy, token_server: TokenServer, upstream: Upstream
) -> None:
    upstream.validate = None  # tokens of two token servers
    host = f"127.0.0.1:{upstream.port}"
    async with TokenServer(clients={CLIENT_ID: CLIENT_SECRET}) as write_server:
        app = await start_proxy(
            proxy_config(
                upstream_config(
                    "reader",
                    [host],
                    token_config(token_server, scope=("read",)),
                    methods=("GET", "HEAD"),
                ),
                upstream_config("writer", [host], token_config(write_server, scope=("write",))),
            )
        )
        methods = ["GET", "HEAD", "POST", "DELETE", "PUT", "GET"]
        async with aiohttp.ClientSession() as session:
            for method in methods:
                async with session.request(
                    method, f"http://{host}/api/x", proxy=proxy_url(app)
                ) as response:
                    assert response.status == 200, method
        (read,) = token_server.issued
        (write,) = write_server.issued
    assert [seen.method for seen in upstream.received] == methods
    assert [seen.header("Authorization") for seen in upstream.received] == [
        f"Bearer {token}" for token in (read, read, write, write, write, read)
    ]


async def test_the_longest_path_prefix_wins(
    start_proxy: StartProxy, token_server: TokenServer, upstream: Upstream
) -> None:
    upstream.validate = None  # tokens of two token servers
    host = f"127.0.0.1:{upstream.port}"
    async with TokenServer(clients={CLIENT_ID: CLIENT_SECRET}) as admin_server:
        app = await start_proxy(
            proxy_config(
                upstream_config("api", [host], token_config(token_server), path_prefix="/api"),
                upstream_config(
                    "admin", [host], token_config(admin_server), path_prefix="/api/admin"
                ),
            )
        )
        seen: dict[str, str | None] = {}
        for path in ["/api/admin/users", "/api/admin", "/api/stock", "/api/administrator", "/api"]:
            status, _, _ = await get(app, f"http://{host}{path}")
            assert status == 200, path
            seen[path] = upstream.last().header("Authorization")
        (api,) = token_server.issued
        (admin,) = admin_server.issued
    assert seen == {
        "/api/admin/users": f"Bearer {admin}",
        "/api/admin": f"Bearer {admin}",
        "/api/stock": f"Bearer {api}",
        "/api/administrator": f"Bearer {api}",
        "/api": f"Bearer {api}",
    }


# aiohttp sends the URL it is given as the absolute-form target: `GET ws://host/ws`.
@pytest.mark.parametrize("scheme", ["http", "ws"])
async def test_websocket_upgrade_carries_the_token(
    inventory_proxy: ProxyApp, token_server: TokenServer, scheme: str
) -> None:
    url = f"{scheme}://inventory.internal/ws"
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(url, proxy=proxy_url(inventory_proxy)) as ws,
    ):
        hello = json.loads(await ws.receive_str())
        assert hello["authorization"] == f"Bearer {token_server.issued[-1]}"
        await ws.send_str("ping")
        assert await ws.receive_str() == "echo:ping"
        await ws.send_bytes(b"\x00\x01" * 1000)
        assert await ws.receive_bytes() == b"\x00\x01" * 1000


async def test_reverse_proxy_port(
    start_proxy: StartProxy, token_server: TokenServer, upstream: Upstream
) -> None:
    app = await start_inventory(start_proxy, token_server, upstream, listen=Address("127.0.0.1", 0))
    port = app.reverse_listeners["inventory"].port
    async with (
        aiohttp.ClientSession() as session,
        session.get(URL(f"http://127.0.0.1:{port}/api/x?y=%2F", encoded=True)) as r,
    ):
        assert r.status == 200
    seen = upstream.last()
    assert seen.path == "/api/x?y=%2F"
    assert seen.header("Authorization") == f"Bearer {token_server.issued[-1]}"
    assert seen.header("Host") == f"127.0.0.1:{upstream.port}"


async def test_origin_form_on_the_forward_port_is_400(
    inventory_proxy: ProxyApp, upstream: Upstream
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", inventory_proxy.port)
    writer.write(b"GET /api HTTP/1.1\r\nHost: inventory.internal\r\n\r\n")
    await writer.drain()
    data = await reader.read()
    writer.close()
    assert data.startswith(b"HTTP/1.1 400")
    assert b'"error":"bad_request"' in data
    assert upstream.received == []


async def test_metrics_count_requests(inventory_proxy: ProxyApp, upstream: Upstream) -> None:
    await get(inventory_proxy, "http://inventory.internal/m")
    await get(inventory_proxy, f"{upstream.url}/m")
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{inventory_proxy.admin_port}/metrics") as r,
    ):
        text = await r.text()
    assert 'token_proxy_requests_total{code="200",upstream="inventory"} 1.0' in text
    assert 'token_proxy_requests_total{code="200",upstream="unmatched"} 1.0' in text
    assert 'token_proxy_token_fetches_total{outcome="success",upstream="inventory"} 1.0' in text


async def test_no_cleartext_token_to_a_non_loopback_host_without_opt_in(
    start_proxy: StartProxy, token_server: TokenServer, upstream: Upstream
) -> None:
    app = await start_inventory(start_proxy, token_server, upstream, url=None)
    status, _, body = await get(app, "http://inventory.internal/x")
    assert status == 403
    answer = json.loads(body)
    assert answer["error"] == "host_not_allowed"
    assert "cleartext" in answer["detail"]
    assert token_server.issued[-1] not in body.decode()


async def test_a_client_that_stops_reading_is_cut_off(
    start_proxy: StartProxy, token_server: TokenServer, upstream: Upstream
) -> None:
    app = await start_inventory(
        start_proxy, token_server, upstream, proxy={"limits": LimitsConfig(idle_timeout=1.0)}
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", app.port)
    writer.transport.set_write_buffer_limits(0)  # type: ignore[attr-defined]
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    writer.write(
        b"GET http://inventory.internal/stream/200000000 HTTP/1.1\r\n"
        b"Host: inventory.internal\r\n\r\n"
    )
    await writer.drain()
    reader._transport.pause_reading()  # type: ignore[attr-defined]
    assert app.forward_listener is not None
    listener = app.forward_listener

    async def cut_off() -> bool:
        return not listener.connections

    await eventually(cut_off, within=20)
    writer.close()


async def test_an_unfinished_head_gets_408_at_the_header_timeout(
    start_proxy: StartProxy, token_server: TokenServer, upstream: Upstream
) -> None:
    app = await start_inventory(
        start_proxy, token_server, upstream, proxy={"limits": LimitsConfig(header_timeout=0.5)}
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", app.port)
    writer.write(b"GET http://inventory.internal/x HTTP/1.1\r\nHost: inventory.internal\r\n")
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), timeout=10)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b"Connection: close" in answer
    assert upstream.received == []


async def test_a_client_that_closes_mid_body_frees_the_upstream_at_once(
    start_proxy: StartProxy, token_server: TokenServer, upstream: Upstream
) -> None:
    app = await start_inventory(start_proxy, token_server, upstream, timeout=30.0)
    reader, writer = await asyncio.open_connection("127.0.0.1", app.port)
    writer.write(
        b"POST http://inventory.internal/upload HTTP/1.1\r\nHost: inventory.internal\r\n"
        b"Content-Length: 100\r\n\r\n0123456789"
    )
    await writer.drain()

    async def upload_started() -> bool:
        return any(seen.path == "/upload" for seen in upstream.received)

    await eventually(upload_started)
    writer.write_eof()
    answer = await asyncio.wait_for(reader.read(), timeout=5)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"before the request body ended" in answer


async def test_a_reload_that_changes_only_how_the_token_is_written_takes_at_once(
    inventory_proxy: ProxyApp, upstream: Upstream, token_server: TokenServer
) -> None:
    # The token stays (its config did not change), but the header and overwrite do:
    # the very next request, on a kept-alive connection (the fast path) or a new one
    # with a body (the coroutine path), carries it the new way.
    async with aiohttp.ClientSession() as session:
        async with session.get("http://inventory.internal/a", proxy=proxy_url(inventory_proxy)):
            pass
        token = f"Bearer {token_server.issued[-1]}"
        assert upstream.last().header("Authorization") == token
        (config,) = inventory_proxy.config.upstreams
        changed = dataclasses.replace(config, header="X-Api-Token", overwrite=False)
        await inventory_proxy.reload(
            dataclasses.replace(inventory_proxy.config, upstreams=(changed,))
        )
        async with session.get("http://inventory.internal/b", proxy=proxy_url(inventory_proxy)):
            pass
        seen = upstream.last()
        assert (seen.header("X-Api-Token"), seen.header("Authorization")) == (token, None)
        async with session.post(
            "http://inventory.internal/c",
            data=b"body",
            headers={"X-Api-Token": "the application's own"},
            proxy=proxy_url(inventory_proxy),
        ):
            pass
        # overwrite: false now: the application's own field is kept, no token added.
        assert upstream.last().all("X-Api-Token") == ["the application's own"]
    assert len(token_server.issued) == 1  # the token itself was kept across the reload
