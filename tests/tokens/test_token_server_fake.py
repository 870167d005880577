"""The test token server is as strict as the RFCs: a lenient fake would hide client bugs."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlencode

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from tests.support.token_server import JWT_BEARER, TokenServer

FORM = {"Content-Type": "application/x-www-form-urlencoded"}


@pytest.fixture
async def server() -> AsyncIterator[TokenServer]:
    async with TokenServer(clients={"order-service": "p+ss word"}) as ts:
        yield ts


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client_session:
        yield client_session


async def post(
    session: aiohttp.ClientSession,
    url: str,
    body: str,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any], dict[str, str]]:
    async with session.post(url, data=body, headers={**FORM, **(headers or {})}) as response:
        return response.status, await response.json(), dict(response.headers)


def basic(client_id: str, secret: str) -> dict[str, str]:
    pair = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
    return {"Authorization": f"Basic {pair}"}


async def test_properly_encoded_basic_credentials_get_a_token(
    server: TokenServer, session: aiohttp.ClientSession
) -> None:
    status, body, _ = await post(
        session, server.url, "grant_type=client_credentials", basic("order-service", "p%2Bss+word")
    )
    assert status == 200
    assert body["access_token"] == server.issued[0]
    assert body["token_type"] == "Bearer"
    assert server.is_valid(body["access_token"])
    assert server.requests[0].outcome == "issued"


async def test_unencoded_basic_credentials_are_rejected(
    server: TokenServer, session: aiohttp.ClientSession
) -> None:
    # "+" decodes to a space per RFC 6749 §2.3.1, so the raw secret does not match.
    status, body, headers = await post(
        session, server.url, "grant_type=client_credentials", basic("order-service", "p+ss word")
    )
    assert status == 401
    assert body["error"] == "invalid_client"
    assert headers["WWW-Authenticate"].startswith("Basic")
    assert server.fetch_count == 0


@pytest.mark.parametrize(
    ("body", "headers", "status", "error"),
    [
        ("grant_type=client_credentials", {}, 401, "invalid_client"),
        (
            "grant_type=password",
            basic("order-service", "p%2Bss+word"),
            400,
            "unsupported_grant_type",
        ),
        (
            "grant_type=client_credentials&client_id=order-service&client_secret=p%2Bss+word",
            basic("order-service", "p%2Bss+word"),
            400,
            "invalid_request",
        ),
        (
            "grant_type=client_credentials&scope=a&scope=b",
            basic("order-service", "p%2Bss+word"),
            400,
            "invalid_request",
        ),
        (
            "grant_type=client_credentials",
            {**basic("order-service", "p%2Bss+word"), "Content-Type": "application/json"},
            400,
            "invalid_request",
        ),
    ],
)
async def test_malformed_requests_are_refused(
    server: TokenServer,
    session: aiohttp.ClientSession,
    body: str,
    headers: dict[str, str],
    status: int,
    error: str,
) -> None:
    got_status, got_body, _ = await post(session, server.url, body, headers)
    assert (got_status, got_body["error"]) == (status, error)
    assert server.fetch_count == 0


async def test_client_assertions_are_verified_and_single_use(
    server: TokenServer, session: aiohttp.ClientSession
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    server.jwt_keys["order-service"] = key.public_key()

    def assertion(**claims: Any) -> str:
        now = int(time.time())
        base: dict[str, Any] = {"iss": "order-service", "sub": "order-service", "aud": server.url}
        base.update({"jti": "j-1", "iat": now, "exp": now + 60})
        base.update(claims)
        token = jwt.encode(base, key, algorithm="ES256")
        return urlencode(
            {
                "grant_type": "client_credentials",
                "client_assertion_type": JWT_BEARER,
                "client_assertion": token,
            }
        )

    assert (await post(session, server.url, assertion()))[0] == 200
    reused = await post(session, server.url, assertion())
    wrong_audience = await post(session, server.url, assertion(jti="j-2", aud="https://x"))
    expired = await post(session, server.url, assertion(jti="j-3", exp=int(time.time()) - 10))
    for status, body, _ in (reused, wrong_audience, expired):
        assert (status, body["error"]) == (401, "invalid_client")
    assert server.fetch_count == 1


async def test_tokens_expire_and_can_be_revoked(
    server: TokenServer, session: aiohttp.ClientSession
) -> None:
    server.expires_in = 0.2
    credentials = basic("order-service", "p%2Bss+word")
    first = (await post(session, server.url, "grant_type=client_credentials", credentials))[1]
    server.expires_in = 3600
    second = (await post(session, server.url, "grant_type=client_credentials", credentials))[1]
    server.revoke(second["access_token"])
    assert not server.is_valid(second["access_token"])
    assert not server.is_valid("tok-never-issued")
    deadline = time.monotonic() + 5
    while server.is_valid(first["access_token"]):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)


async def test_failures_queue_in_order_then_persist_when_set(
    server: TokenServer, session: aiohttp.ClientSession
) -> None:
    credentials = basic("order-service", "p%2Bss+word")
    server.fail_next("503", "invalid_scope")
    statuses = []
    for _ in range(3):
        status, _, headers = await post(
            session, server.url, "grant_type=client_credentials", credentials
        )
        statuses.append((status, headers.get("Retry-After")))
    assert statuses == [(503, "1"), (400, None), (200, None)]
    server.set_failing("500")
    assert (await post(session, server.url, "grant_type=client_credentials", credentials))[0] == 500
    assert [r.outcome for r in server.requests] == [
        "failure:503",
        "failure:invalid_scope",
        "issued",
        "failure:500",
    ]
    await server.wait_for_requests(4, timeout=1)  # already there: returns at once
