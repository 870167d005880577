"""Token exchange and JWT bearer upstreams through the whole proxy.

A real token server that checks both grants strictly, a real upstream that accepts only
tokens the server issued, real clients through the proxy port. Everything but the token
request itself is shared with client credentials, and shown to be: the 401 retry, single
flight at a cold start, 503 while no token can be had and recovery after it, discovery,
metrics, the fleet cache. No subject token, assertion or access token reaches a log line
or /status.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from proxy.app import ProxyApp
from proxy.config import TokenConfig
from tests.support.configs import CLIENT_ID, StartProxy, proxy_config, proxy_url, upstream_config
from tests.support.redis_server import RedisServer
from tests.support.token_server import JWT_TOKEN_TYPE, TokenServer
from tests.support.upstream import Upstream
from tests.support.waiting import eventually
from tests.tokens.fleet import cache_config

EXCHANGE_HOST = "cloud-api.internal"
BEARER_HOST = "partner-api.internal"
ACCOUNT = "system:serviceaccount:orders:order-service"
REFRESH_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:refresh_token"


@pytest.fixture(scope="module")
def cluster_key() -> ec.EllipticCurvePrivateKey:
    """The key the cluster signs projected service-account tokens with."""
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def client_key() -> ec.EllipticCurvePrivateKey:
    """The key order-service signs its JWT-bearer assertions with."""
    return ec.generate_private_key(ec.SECP256R1())


class Credentials:
    """The files a pod has: a projected service-account token and a signing key."""

    def __init__(
        self,
        directory: Path,
        server: TokenServer,
        cluster_key: ec.EllipticCurvePrivateKey,
        client_key: ec.EllipticCurvePrivateKey,
    ) -> None:
        self.server = server
        self.cluster_key = cluster_key
        self.subject_file = directory / "sts-token"
        self.key_file = directory / "client-key.pem"
        self.key_file.write_bytes(
            client_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        self.subject_tokens: list[str] = []
        self.rotate()

    def rotate(self) -> str:
        """What the kubelet does: a new token in the file; the server accepts only it."""
        now = int(time.time())
        token = jwt.encode(
            {
                "iss": "https://kubernetes.default.svc",
                "sub": ACCOUNT,
                "aud": "sts.example.com",
                "iat": now,
                "exp": now + 3600,
                "jti": f"sa-{len(self.subject_tokens)}",
            },
            self.cluster_key,
            algorithm="ES256",
        )
        self.server.subject_tokens = {token: JWT_TOKEN_TYPE}
        self.subject_file.write_text(token)
        self.subject_tokens.append(token)
        return token

    def exchange(self, **changes: Any) -> TokenConfig:
        settings: dict[str, Any] = {
            "client_id": "",
            "token_url": self.server.url,
            "grant": "token_exchange",
            "auth_method": "none",
            "subject_token_file": self.subject_file,
            "audience": "//iam.example.com/pools/k8s/providers/cluster-1",
            "scope": ("cloud-platform",),
            "timeout": 5.0,
            "retry_initial": 0.2,
            "retry_max": 1.0,
        }
        settings.update(changes)
        return TokenConfig(**settings)

    def jwt_bearer(self, **changes: Any) -> TokenConfig:
        settings: dict[str, Any] = {
            "client_id": CLIENT_ID,
            "token_url": self.server.url,
            "grant": "jwt_bearer",
            "auth_method": "none",
            "private_key_file": self.key_file,
            "scope": ("partner.read",),
            "timeout": 5.0,
            "retry_initial": 0.2,
            "retry_max": 1.0,
        }
        settings.update(changes)
        return TokenConfig(**settings)


@pytest.fixture
def credentials(
    tmp_path: Path,
    token_server: TokenServer,
    cluster_key: ec.EllipticCurvePrivateKey,
    client_key: ec.EllipticCurvePrivateKey,
) -> Credentials:
    token_server.allow_unauthenticated = True
    token_server.jwt_keys[CLIENT_ID] = client_key.public_key()
    return Credentials(tmp_path, token_server, cluster_key, client_key)


@pytest.fixture
def captured(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="token_proxy")
    return caplog


async def both_upstreams(
    start_proxy: StartProxy, credentials: Credentials, upstream: Upstream, **proxy: Any
) -> ProxyApp:
    return await start_proxy(
        proxy_config(
            upstream_config("cloud", [EXCHANGE_HOST], credentials.exchange(), url=upstream.url),
            upstream_config("partner", [BEARER_HOST], credentials.jwt_bearer(), url=upstream.url),
            **proxy,
        )
    )


async def get(
    session: aiohttp.ClientSession, app: ProxyApp, host: str, path: str
) -> tuple[int, dict[str, Any], dict[str, str]]:
    async with session.get(f"http://{host}{path}", proxy=proxy_url(app)) as response:
        body = await response.read()
        try:
            document = json.loads(body)
        except ValueError:
            document = {}
        return response.status, document, dict(response.headers)


def metric(app: ProxyApp, name: str, **labels: str) -> float:
    value = app.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def assert_nothing_secret_in(text: str, credentials: Credentials, server: TokenServer) -> None:
    secrets = [*credentials.subject_tokens, *server.issued]
    secrets += [r.param("assertion") or "" for r in server.requests if r.param("assertion")]
    secrets += [credentials.key_file.read_text().splitlines()[1]]
    for secret in secrets:
        assert secret not in text


async def test_exchange_and_jwt_bearer_upstreams_serve_requests(
    start_proxy: StartProxy,
    credentials: Credentials,
    upstream: Upstream,
    token_server: TokenServer,
    captured: pytest.LogCaptureFixture,
) -> None:
    app = await both_upstreams(start_proxy, credentials, upstream)
    async with aiohttp.ClientSession() as session:
        for host in (EXCHANGE_HOST, BEARER_HOST, EXCHANGE_HOST, BEARER_HOST):
            status, _, _ = await get(session, app, host, "/v1/items")
            assert status == 200
        async with session.get(f"http://127.0.0.1:{app.admin_port}/status") as response:
            status_text = await response.text()
    grants = {r.param("grant_type"): r for r in token_server.requests}
    assert set(grants) == {
        "urn:ietf:params:oauth:grant-type:token-exchange",
        "urn:ietf:params:oauth:grant-type:jwt-bearer",
    }
    assert all(r.outcome == "issued" for r in token_server.requests)
    assert len(token_server.requests) == 2  # one per upstream, cached afterwards
    exchange = grants["urn:ietf:params:oauth:grant-type:token-exchange"]
    assert exchange.param("subject_token") == credentials.subject_tokens[-1]
    assert exchange.param("audience") == "//iam.example.com/pools/k8s/providers/cluster-1"
    authorizations = {seen.header("Authorization") for seen in upstream.received}
    assert authorizations == {f"Bearer {token}" for token in token_server.issued}
    for name in ("cloud", "partner"):
        assert metric(app, "token_proxy_token_fetches_total", upstream=name, outcome="success") == 1
    status_document = json.loads(status_text)
    for name in ("cloud", "partner"):
        assert status_document["upstreams"][name]["state"] == "valid"
    assert status_document["upstreams"]["cloud"]["grant"] == "token_exchange"
    assert status_document["upstreams"]["partner"]["grant"] == "jwt_bearer"
    assert_nothing_secret_in(status_text, credentials, token_server)
    logged = captured.text + "".join(str(record.__dict__) for record in captured.records)
    assert_nothing_secret_in(logged, credentials, token_server)


async def test_401_retry_exchanges_the_rotated_subject_token(
    start_proxy: StartProxy,
    credentials: Credentials,
    upstream: Upstream,
    token_server: TokenServer,
) -> None:
    app = await both_upstreams(start_proxy, credentials, upstream)
    async with aiohttp.ClientSession() as session:
        assert (await get(session, app, EXCHANGE_HOST, "/warm"))[0] == 200
        [warm] = [seen for seen in upstream.received if seen.path == "/warm"]
        first = (warm.header("Authorization") or "").removeprefix("Bearer ")
        rotated = credentials.rotate()
        token_server.revoke(first)
        assert (await get(session, app, EXCHANGE_HOST, "/after"))[0] == 200
    exchanges = [r for r in token_server.requests if r.param("subject_token")]
    assert [r.param("subject_token") for r in exchanges] == [
        credentials.subject_tokens[0],
        rotated,
    ]
    tried = [seen.header("Authorization") for seen in upstream.received if seen.path == "/after"]
    assert tried[0] == f"Bearer {first}"
    assert tried[1] == f"Bearer {token_server.issued[-1]}" != tried[0]
    assert metric(app, "token_proxy_upstream_unauthorized_retries_total", upstream="cloud") == 1


async def test_cold_start_makes_one_request_per_grant(
    start_proxy: StartProxy,
    credentials: Credentials,
    upstream: Upstream,
    token_server: TokenServer,
) -> None:
    token_server.hold = asyncio.Event()
    app = await both_upstreams(start_proxy, credentials, upstream)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        requests = [
            asyncio.create_task(get(session, app, host, f"/r{i}"))
            for i in range(100)
            for host in (EXCHANGE_HOST, BEARER_HOST)
        ]
        await token_server.wait_for_requests(2)
        token_server.hold.set()
        results = await asyncio.gather(*requests)
    assert [status for status, _, _ in results] == [200] * 200
    assert len(token_server.requests) == 2


@pytest.mark.parametrize(
    ("break_it", "reason"),
    [
        ("invalid_grant", "invalid_client"),
        ("500", "http_5xx"),
        ("refresh_token_type", "invalid_response"),
    ],
)
async def test_no_token_is_503_and_the_exchange_recovers(
    start_proxy: StartProxy,
    credentials: Credentials,
    upstream: Upstream,
    token_server: TokenServer,
    break_it: str,
    reason: str,
) -> None:
    if break_it == "refresh_token_type":
        token_server.response_overrides = {"issued_token_type": REFRESH_TOKEN_TYPE}
    else:
        token_server.set_failing(break_it)
    app = await both_upstreams(start_proxy, credentials, upstream)
    async with aiohttp.ClientSession() as session:
        status, body, headers = await get(session, app, EXCHANGE_HOST, "/x")
        assert status == 503
        assert (body["error"], body["upstream"]) == ("token_unavailable", "cloud")
        assert "Retry-After" in headers
        assert (
            metric(app, "token_proxy_token_fetch_failures_total", upstream="cloud", reason=reason)
            >= 1
        )
        # Mend the server: the proxy's retries (a second at most apart here) recover,
        # and requests are served again.
        token_server.set_failing(None)
        token_server.response_overrides = {}

        async def recovered() -> bool:
            return (await get(session, app, EXCHANGE_HOST, "/y"))[0] == 200

        await eventually(recovered, within=30)
    assert credentials.subject_tokens[-1] not in json.dumps(body)


async def test_exchange_through_discovery(
    start_proxy: StartProxy,
    credentials: Credentials,
    upstream: Upstream,
    token_server: TokenServer,
) -> None:
    token = credentials.exchange(token_url=None, issuer=token_server.issuer)
    app = await start_proxy(
        proxy_config(upstream_config("cloud", [EXCHANGE_HOST], token, url=upstream.url))
    )
    async with aiohttp.ClientSession() as session:
        assert (await get(session, app, EXCHANGE_HOST, "/discovered"))[0] == 200
    assert token_server.discovery_requests
    assert token_server.requests[0].param("subject_token") == credentials.subject_tokens[-1]


async def test_replicas_share_an_exchanged_token_through_the_fleet_cache(
    start_proxy: StartProxy,
    credentials: Credentials,
    upstream: Upstream,
    token_server: TokenServer,
    redis_server: RedisServer,
    key_file: Path,
) -> None:
    cache = cache_config(redis_server.url, key_file, lock_timeout=5.0)
    first = await both_upstreams(start_proxy, credentials, upstream, token_cache=cache)
    async with aiohttp.ClientSession() as session:
        for host in (EXCHANGE_HOST, BEARER_HOST):
            assert (await get(session, first, host, "/one"))[0] == 200
        # A second replica: same service account, another rotation of its token.
        credentials.rotate()
        second = await both_upstreams(start_proxy, credentials, upstream, token_cache=cache)
        assert (await get(session, second, EXCHANGE_HOST, "/two"))[0] == 200
    exchanges = [r for r in token_server.requests if r.param("subject_token")]
    assert len(exchanges) == 1
    assert (
        metric(second, "token_proxy_token_cache_lookups_total", upstream="cloud", result="hit") == 1
    )
    stored = b"".join((await redis_server.dump()).values())
    for secret in [*credentials.subject_tokens, *token_server.issued]:
        assert secret.encode() not in stored
