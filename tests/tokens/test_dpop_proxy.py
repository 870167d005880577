"""DPoP (RFC 9449) through the whole proxy, judged by a strict verifier.

A real token endpoint and real APIs that check every DPoP proof the way RFC 9449 §4.3
and §7.1 say (tests/support/dpop.py, which shares no code with the proxy's signer),
real clients through the forward port, a reverse port and an intercepted CONNECT
tunnel. Both servers demand nonces and rotate them; the proxy must follow. No token,
proof or key reaches a log line or /status.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import trustme
from cryptography.hazmat.primitives.asymmetric import ec

from proxy.app import ProxyApp
from proxy.config import Address, DpopConfig, TlsClientConfig, TlsInterceptConfig
from tests.config.documents import pem
from tests.support.certificates import server_context
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
from tests.support.dpop import jwk_thumbprint
from tests.support.dpop_servers import DpopAuthority
from tests.support.redis_server import RedisServer
from tests.support.token_server import TokenServer
from tests.support.upstream import Upstream
from tests.tokens.fleet import cache_config

INVENTORY = "inventory.internal"
CONCURRENCY = 16


@pytest.fixture
def authority() -> DpopAuthority:
    """The DPoP side of the token endpoint and the APIs: strict, DPoP tokens only."""
    return DpopAuthority(require_dpop=True)


@pytest.fixture
async def dpop_token_server(authority: DpopAuthority) -> AsyncIterator[TokenServer]:
    async with TokenServer(clients={CLIENT_ID: CLIENT_SECRET}, dpop=authority) as server:
        yield server


@pytest.fixture
async def api(authority: DpopAuthority) -> AsyncIterator[Upstream]:
    """A plain-HTTP API that accepts only DPoP-bound tokens with valid proofs."""
    async with Upstream(dpop=authority) as server:
        yield server


@pytest.fixture
async def https_api(authority: DpopAuthority, server_ca: trustme.CA) -> AsyncIterator[Upstream]:
    """The same API over HTTPS, for interception."""
    server = Upstream(dpop=authority)
    await server.start(ssl_context=server_context(server_ca))
    yield server
    await server.close()


def dpop_token(server: TokenServer, **dpop: Any) -> Any:
    return token_config(server, dpop=DpopConfig(**dpop))


async def start_dpop_inventory(
    start_proxy: StartProxy, server: TokenServer, api: Upstream, **changes: Any
) -> ProxyApp:
    """A proxy whose `inventory` upstream (inventory.internal, sent to `api`) has DPoP
    tokens from `server`; `dpop` changes the `token.dpop` section, `proxy` the proxy's."""
    token = dpop_token(server, **changes.pop("dpop", {}))
    return await start_inventory(start_proxy, server, api, token=token, **changes)


def metric(app: ProxyApp, name: str, **labels: str) -> float:
    return app.metrics.registry.get_sample_value(name, labels) or 0.0


def nonce_retries(app: ProxyApp, upstream: str, server: str) -> float:
    return metric(app, "token_proxy_dpop_nonce_retries_total", upstream=upstream, server=server)


async def status_of(app: ProxyApp, upstream: str) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{app.admin_port}/status") as response,
    ):
        document: dict[str, Any] = await response.json()
    upstreams: dict[str, Any] = document["upstreams"]
    return dict(upstreams[upstream])


async def many(count: int, call: Any) -> list[int]:
    """`count` calls of `call(index)`, CONCURRENCY at a time; their statuses."""
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(index: int) -> int:
        async with gate:
            status: int = await call(index)
            return status

    return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(count))), 120)


async def test_a_dpop_bound_api_answers_1000_requests_on_every_port_with_nonces_on_the_way(
    start_proxy: StartProxy,
    authority: DpopAuthority,
    dpop_token_server: TokenServer,
    api: Upstream,
    https_api: Upstream,
    server_ca_file: Path,
    tmp_path: Path,
) -> None:
    # Both servers want nonces from the first request on, and hand out new ones as
    # they go: the proxy must ask again once each time, never more.
    authority.authorization.demand_nonce()
    authority.resource.demand_nonce()
    authority.resource.rotate_every = 150
    ca_file = tmp_path / "token-proxy-ca.pem"
    reverse = upstream_config(
        "inventory",
        [INVENTORY],
        dpop_token(dpop_token_server),
        url=api.url,
        listen=Address("127.0.0.1", 0),
    )
    intercepted = upstream_config(
        "secure",
        [f"127.0.0.1:{https_api.port}"],
        dpop_token(dpop_token_server, alg="EdDSA"),
        tls=TlsClientConfig(ca_file=server_ca_file),
    )
    app = await start_proxy(
        proxy_config(
            reverse,
            intercepted,
            connect_ports=(https_api.port,),
            tls_intercept=TlsInterceptConfig(write_ca_cert_to=ca_file),
        )
    )
    reverse_port = app.reverse_listeners["inventory"].port
    client_tls = ssl.create_default_context(cafile=str(ca_file))
    async with aiohttp.ClientSession() as session:

        async def forward(index: int) -> int:
            url = f"http://{INVENTORY}/items/{index}?page=2"
            async with session.get(url, proxy=proxy_url(app)) as response:
                await response.read()
                return response.status

        async def reverse_port_call(index: int) -> int:
            url = f"http://127.0.0.1:{reverse_port}/orders/{index}"
            async with session.delete(url) as response:
                await response.read()
                return response.status

        async def intercept(index: int) -> int:
            url = f"https://127.0.0.1:{https_api.port}/stock/{index}"
            async with session.get(url, proxy=proxy_url(app), ssl=client_tls) as response:
                await response.read()
                return response.status

        statuses = await many(400, forward)
        statuses += await many(300, reverse_port_call)
        statuses += await many(300, intercept)

    assert statuses == [200] * 1000
    resource = authority.resource
    assert resource.verified >= 1000
    jtis = authority.jtis
    assert len(set(jtis)) == len(jtis), "a jti was used twice"
    # Every refusal was a nonce being asked for, and each was answered by a retry.
    assert set(resource.reasons()) <= {"nonce_missing", "nonce_wrong"}
    assert resource.refusals, "the API never asked for a nonce"
    assert len(authority.resource.nonces) >= 1000 // 150
    for name in ("inventory", "secure"):
        assert nonce_retries(app, name, "authorization") == 1
        assert nonce_retries(app, name, "resource") >= 1
    retried = nonce_retries(app, "inventory", "resource") + nonce_retries(app, "secure", "resource")
    assert retried == len(resource.refusals)
    # Each upstream's proofs name its own key, which /status shows by thumbprint.
    keys = {proof.jkt for proof in resource.proofs}
    status = [await status_of(app, name) for name in ("inventory", "secure")]
    assert keys == {entry["dpop"]["jkt"] for entry in status}
    assert [entry["dpop"]["alg"] for entry in status] == ["ES256", "EdDSA"]
    assert {entry["dpop"]["token_type"] for entry in status} == {"DPoP"}
    # What the APIs saw: the URL each proof names is the URL they received.
    seen = {proof.claims["htu"] for proof in resource.proofs}
    assert f"http://127.0.0.1:{api.port}/items/0" in seen
    assert f"http://127.0.0.1:{api.port}/orders/0" in seen
    assert f"https://127.0.0.1:{https_api.port}/stock/0" in seen
    assert not any("?" in htu for htu in seen)
    assert {r.method for r in api.received} == {"GET", "DELETE"}
    for received in [*api.received, *https_api.received]:
        assert (received.header("Authorization") or "").startswith("DPoP ")
        assert len(received.all("DPoP")) == 1


async def test_a_post_is_not_sent_twice_but_its_nonce_serves_the_next_request(
    start_proxy: StartProxy,
    authority: DpopAuthority,
    dpop_token_server: TokenServer,
    api: Upstream,
) -> None:
    app = await start_dpop_inventory(start_proxy, dpop_token_server, api)
    nonce = authority.resource.demand_nonce()
    async with aiohttp.ClientSession() as session:
        post = session.post(f"http://{INVENTORY}/orders", data=b"{}", proxy=proxy_url(app))
        async with post as response:
            assert response.status == 401
            assert response.headers["DPoP-Nonce"] == nonce
            assert "use_dpop_nonce" in response.headers["WWW-Authenticate"]
        async with session.post(
            f"http://{INVENTORY}/orders", data=b"{}", proxy=proxy_url(app)
        ) as response:
            assert response.status == 200
    assert [r.method for r in api.received] == ["POST", "POST"]
    assert nonce_retries(app, "inventory", "resource") == 0


async def test_a_get_with_a_small_body_is_sent_again_with_the_nonce(
    start_proxy: StartProxy,
    authority: DpopAuthority,
    dpop_token_server: TokenServer,
    api: Upstream,
) -> None:
    app = await start_dpop_inventory(start_proxy, dpop_token_server, api)
    authority.resource.demand_nonce()
    async with aiohttp.ClientSession() as session:
        put = session.put(f"http://{INVENTORY}/upload", data=b"x" * 5000, proxy=proxy_url(app))
        async with put as response:
            assert response.status == 200
            assert (await response.json())["size"] == 5000
    assert nonce_retries(app, "inventory", "resource") == 1
    # The token was kept: one token request in all.
    assert dpop_token_server.fetch_count == 1


async def test_an_invalid_token_answer_drops_the_token_and_replays_with_a_new_one(
    start_proxy: StartProxy,
    authority: DpopAuthority,
    dpop_token_server: TokenServer,
    api: Upstream,
) -> None:
    app = await start_dpop_inventory(start_proxy, dpop_token_server, api)
    async with aiohttp.ClientSession() as session:
        get = session.get(f"http://{INVENTORY}/one", proxy=proxy_url(app))
        async with get as response:
            assert response.status == 200
        authority.bindings.clear()  # the server forgets the token: invalid_token from now on
        get = session.get(f"http://{INVENTORY}/two", proxy=proxy_url(app))
        async with get as response:
            assert response.status == 200
    assert dpop_token_server.fetch_count == 2
    assert "invalid_token" in [refusal.error for refusal in authority.resource.refusals]
    assert metric(app, "token_proxy_upstream_unauthorized_retries_total", upstream="inventory") == 1
    assert nonce_retries(app, "inventory", "resource") == 0


async def test_a_bearer_answer_is_used_as_a_bearer_token_with_a_warning(
    start_proxy: StartProxy,
    dpop_token_server: TokenServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    authority = DpopAuthority(token_type="Bearer")
    dpop_token_server.dpop = authority

    def validate(authorization: str | None) -> bool:
        token = (authorization or "").removeprefix("Bearer ")
        return dpop_token_server.is_valid(token)

    async with Upstream(validate=validate) as bearer_api:
        app = await start_dpop_inventory(start_proxy, dpop_token_server, bearer_api)
        with caplog.at_level(logging.WARNING, logger="token_proxy"):
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"http://{INVENTORY}/x", proxy=proxy_url(app)) as response,
            ):
                assert response.status == 200
    seen = bearer_api.last()
    assert seen.all("Authorization") == [f"Bearer {dpop_token_server.issued[-1]}"]
    assert seen.all("DPoP") == []
    assert authority.authorization.verified == 1  # the token request still had a proof
    warnings = [r for r in caplog.records if getattr(r, "event", "") == "dpop_bearer_token"]
    assert len(warnings) == 1
    assert (await status_of(app, "inventory"))["dpop"]["token_type"] == "Bearer"


async def test_the_applications_own_credential_and_proof_are_kept_without_overwrite(
    start_proxy: StartProxy,
    dpop_token_server: TokenServer,
    api: Upstream,
) -> None:
    app = await start_dpop_inventory(start_proxy, dpop_token_server, api, overwrite=False)
    async with aiohttp.ClientSession() as session:
        headers = {"Authorization": "DPoP its-own", "DPoP": "its-own-proof"}
        async with session.get(
            f"http://{INVENTORY}/x", headers=headers, proxy=proxy_url(app)
        ) as response:
            assert response.status == 401  # the API does not know the application's token
        headers = {"DPoP": "stray-proof"}
        async with session.get(
            f"http://{INVENTORY}/y", headers=headers, proxy=proxy_url(app)
        ) as response:
            assert response.status == 200
    own, ours = api.received
    assert (own.all("Authorization"), own.all("DPoP")) == (["DPoP its-own"], ["its-own-proof"])
    # With the proxy's token, only the proxy's proof goes: a stray one is dropped.
    assert ours.all("DPoP") != ["stray-proof"]
    assert len(ours.all("DPoP")) == 1


async def test_no_token_proof_or_key_reaches_the_log_or_status(
    start_proxy: StartProxy,
    authority: DpopAuthority,
    dpop_token_server: TokenServer,
    api: Upstream,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    key_file = tmp_path / "dpop.pem"
    key_file.write_bytes(pem(key))
    authority.authorization.demand_nonce()
    authority.resource.demand_nonce()
    with caplog.at_level(logging.DEBUG):
        app = await start_dpop_inventory(
            start_proxy,
            dpop_token_server,
            api,
            dpop={"key_file": key_file},
            proxy={"access_log": True},
        )
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://{INVENTORY}/x", proxy=proxy_url(app)) as response,
        ):
            assert response.status == 200
        status = await status_of(app, "inventory")
    private = key.private_numbers().private_value.to_bytes(32, "big")
    public_jwk = jwt.get_unverified_header(api.last().header("DPoP") or "")["jwk"]
    assert status["dpop"] == {
        "alg": "ES256",
        "jkt": jwk_thumbprint(public_jwk),
        "key": "file",
        "token_type": "DPoP",
    }
    text = caplog.text + json.dumps(status)
    for token in dpop_token_server.issued:
        assert token not in text
    for received in api.received:
        assert (received.header("DPoP") or "") not in text
    assert jwt.utils.base64url_encode(private).decode() not in text


async def test_dpop_tokens_are_shared_through_the_cache_only_with_a_key_file(
    start_proxy: StartProxy,
    dpop_token_server: TokenServer,
    api: Upstream,
    redis_server: RedisServer,
    key_file: Path,
    tmp_path: Path,
) -> None:
    dpop_key_file = tmp_path / "dpop.pem"
    dpop_key_file.write_bytes(pem(ec.generate_private_key(ec.SECP256R1())))
    cache = cache_config(redis_server.url, key_file, lock_timeout=5.0)

    async def replica(**dpop: Any) -> ProxyApp:
        upstream = upstream_config(
            "inventory", [INVENTORY], dpop_token(dpop_token_server, **dpop), url=api.url
        )
        return await start_proxy(proxy_config(upstream, token_cache=cache))

    async def call(app: ProxyApp) -> int:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://{INVENTORY}/x", proxy=proxy_url(app)) as response,
        ):
            return response.status

    # With the same key file, the second replica takes the first one's token.
    first = await replica(key_file=dpop_key_file)
    assert await call(first) == 200
    second = await replica(key_file=dpop_key_file)
    assert await call(second) == 200
    assert dpop_token_server.fetch_count == 1
    assert (await status_of(second, "inventory"))["token_source"] == "shared_cache"
    # With keys generated by each replica, each has a token of its own.
    third = await replica()
    assert await call(third) == 200
    assert dpop_token_server.fetch_count == 2
    assert (await status_of(third, "inventory"))["token_cache"] == "local"


async def test_tls_origination_and_websocket_upgrades_carry_proofs(
    start_proxy: StartProxy,
    authority: DpopAuthority,
    dpop_token_server: TokenServer,
    https_api: Upstream,
    server_ca_file: Path,
) -> None:
    authority.resource.demand_nonce()
    app = await start_dpop_inventory(
        start_proxy,
        dpop_token_server,
        https_api,
        url=f"https://127.0.0.1:{https_api.port}",
        tls=TlsClientConfig(ca_file=server_ca_file),
    )
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://{INVENTORY}/plain", proxy=proxy_url(app)) as response:
            assert response.status == 200
        async with session.ws_connect(f"http://{INVENTORY}/ws", proxy=proxy_url(app)) as ws:
            greeting = json.loads(await asyncio.wait_for(ws.receive_str(), 10))
            assert greeting["authorization"] == f"DPoP {dpop_token_server.issued[-1]}"
            await ws.send_str("over DPoP")
            assert (await asyncio.wait_for(ws.receive_str(), 10)) == "echo:over DPoP"
    htus = [proof.claims["htu"] for proof in authority.resource.proofs]
    assert htus == [
        f"https://127.0.0.1:{https_api.port}/plain",
        f"https://127.0.0.1:{https_api.port}/ws",
    ]
    assert [proof.claims["htm"] for proof in authority.resource.proofs] == ["GET", "GET"]
