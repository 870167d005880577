"""The test token endpoint and API speak DPoP (RFC 9449) as strictly as the verifier.

A hand-made client signs its own proofs with PyJWT (`DpopClientKey`): it gets a DPoP-bound
token and is served with it, is told to use a nonce when one is demanded, and is refused
for every misuse an RFC 9449 server must refuse.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import jwt
import pytest

from tests.support.dpop import DpopClientKey, Reason
from tests.support.dpop_servers import DpopAuthority
from tests.support.token_server import TokenServer
from tests.support.upstream import Upstream

CLIENT = ("order-service", "s3cret")
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
BASIC = "Basic " + base64.b64encode(f"{CLIENT[0]}:{CLIENT[1]}".encode()).decode()


@pytest.fixture
def authority() -> DpopAuthority:
    return DpopAuthority()


@pytest.fixture
async def token_server(authority: DpopAuthority) -> AsyncIterator[TokenServer]:
    async with TokenServer(clients=dict([CLIENT]), dpop=authority) as server:
        yield server


@pytest.fixture
async def api(authority: DpopAuthority) -> AsyncIterator[Upstream]:
    async with Upstream(dpop=authority) as server:
        yield server


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client_session:
        yield client_session


@pytest.fixture(scope="module")
def signer() -> DpopClientKey:
    return DpopClientKey.generate("ES256")


async def request_token(
    session: aiohttp.ClientSession, server: TokenServer, proof: str | None
) -> tuple[int, dict[str, Any], Mapping[str, str]]:
    headers = {**FORM, "Authorization": BASIC}
    if proof is not None:
        headers["DPoP"] = proof
    async with session.post(server.url, data="grant_type=client_credentials", headers=headers) as r:
        return r.status, await r.json(), r.headers


async def call(
    session: aiohttp.ClientSession, url: str, authorization: str | None, *proofs: str
) -> aiohttp.ClientResponse:
    headers: list[tuple[str, str]] = [("DPoP", proof) for proof in proofs]
    if authorization is not None:
        headers.append(("Authorization", authorization))
    async with session.get(url, headers=headers) as response:
        await response.read()
        return response


async def dpop_token(
    session: aiohttp.ClientSession, server: TokenServer, signer: DpopClientKey
) -> str:
    status, body, _ = await request_token(session, server, signer.proof("POST", server.url))
    assert (status, body["token_type"]) == (200, "DPoP")
    return str(body["access_token"])


async def test_a_dpop_client_gets_a_bound_token_and_is_served(
    authority: DpopAuthority,
    token_server: TokenServer,
    api: Upstream,
    session: aiohttp.ClientSession,
    signer: DpopClientKey,
) -> None:
    token = await dpop_token(session, token_server, signer)
    assert authority.bindings == {token: signer.jkt}
    assert token_server.requests[-1].outcome == "issued"

    for path in ("/api/stock/1", "/api/stock/2?fields=all"):
        url = api.url + path
        proof = signer.proof("GET", url.split("?")[0], access_token=token)
        response = await call(session, url, f"DPoP {token}", proof)
        assert response.status == 200
        assert "DPoP-Nonce" not in response.headers
    assert authority.resource.verified == 2
    assert authority.authorization.verified == 1
    assert len(set(authority.jtis)) == len(authority.jtis) == 3
    assert api.last().header("DPoP") == proof


async def test_the_token_endpoint_demands_a_nonce_first(
    authority: DpopAuthority,
    token_server: TokenServer,
    session: aiohttp.ClientSession,
    signer: DpopClientKey,
) -> None:
    nonce = authority.authorization.demand_nonce()
    status, body, headers = await request_token(
        session, token_server, signer.proof("POST", token_server.url)
    )
    assert status == 400
    assert body["error"] == "use_dpop_nonce"
    assert body["error_description"]
    assert headers["DPoP-Nonce"] == nonce
    assert headers["Cache-Control"] == "no-store"
    assert token_server.requests[-1].outcome == "error:use_dpop_nonce"

    status, body, _ = await request_token(
        session, token_server, signer.proof("POST", token_server.url, nonce="stale")
    )
    assert (status, body["error"]) == (400, "use_dpop_nonce")

    status, body, _ = await request_token(
        session, token_server, signer.proof("POST", token_server.url, nonce=nonce)
    )
    assert (status, body["token_type"]) == (200, "DPoP")
    assert authority.authorization.reasons() == [Reason.NONCE_MISSING, Reason.NONCE_WRONG]
    assert token_server.fetch_count == 1


async def test_the_token_endpoint_refuses_a_bad_proof(
    authority: DpopAuthority,
    token_server: TokenServer,
    session: aiohttp.ClientSession,
    signer: DpopClientKey,
) -> None:
    cases = [
        signer.proof("GET", token_server.url),
        signer.proof("POST", token_server.origin + "/other"),
        signer.proof("POST", token_server.url, header={"typ": "JWT"}),
        "not-a-proof",
    ]
    for proof in cases:
        status, body, _ = await request_token(session, token_server, proof)
        assert (status, body["error"]) == (400, "invalid_dpop_proof")
    assert authority.authorization.reasons() == [
        Reason.HTM,
        Reason.HTU,
        Reason.TYP,
        Reason.MALFORMED,
    ]
    assert token_server.fetch_count == 0


async def test_without_a_proof_the_token_endpoint_serves_bearer_tokens_as_before(
    authority: DpopAuthority, token_server: TokenServer, session: aiohttp.ClientSession
) -> None:
    status, body, _ = await request_token(session, token_server, None)
    assert (status, body["token_type"]) == (200, "Bearer")
    assert authority.bindings == {}
    authority.require_proof = True
    status, body, _ = await request_token(session, token_server, None)
    assert (status, body["error"]) == (400, "invalid_dpop_proof")


async def test_a_token_endpoint_without_dpop_support_answers_bearer(
    authority: DpopAuthority,
    token_server: TokenServer,
    session: aiohttp.ClientSession,
    signer: DpopClientKey,
) -> None:
    authority.token_type = "Bearer"
    status, body, _ = await request_token(
        session, token_server, signer.proof("POST", token_server.url)
    )
    assert (status, body["token_type"]) == (200, "Bearer")
    assert authority.bindings == {}
    token = body["access_token"]

    def validate(authorization: str | None) -> bool:
        scheme, _, credentials = (authorization or "").partition(" ")
        return scheme == "Bearer" and token_server.is_valid(credentials)

    async with Upstream(dpop=authority, validate=validate) as api:
        assert (await call(session, api.url + "/a", f"Bearer {token}")).status == 200
        proof = signer.proof("GET", api.url + "/a", access_token=token)
        refused = await call(session, api.url + "/a", f"DPoP {token}", proof)
    assert refused.status == 401
    assert refused.headers["WWW-Authenticate"].startswith('DPoP error="invalid_token"')


async def test_jwt_tokens_carry_the_key_thumbprint(
    authority: DpopAuthority, session: aiohttp.ClientSession, signer: DpopClientKey
) -> None:
    async with TokenServer(clients=dict([CLIENT]), dpop=authority, token_format="jwt") as server:
        token = await dpop_token(session, server, signer)
    assert jwt.decode(token, options={"verify_signature": False})["cnf"] == {"jkt": signer.jkt}


async def test_discovery_names_the_proof_algorithms(
    token_server: TokenServer, session: aiohttp.ClientSession
) -> None:
    async with session.get(token_server.issuer + "/.well-known/openid-configuration") as r:
        document = await r.json()
    assert "ES256" in document["dpop_signing_alg_values_supported"]
    assert "HS256" not in document["dpop_signing_alg_values_supported"]


async def test_the_api_demands_its_own_nonce(
    authority: DpopAuthority,
    token_server: TokenServer,
    api: Upstream,
    session: aiohttp.ClientSession,
    signer: DpopClientKey,
) -> None:
    token = await dpop_token(session, token_server, signer)
    nonce = authority.resource.demand_nonce("rs-nonce-1")
    url = api.url + "/api/stock/1"

    refused = await call(
        session, url, f"DPoP {token}", signer.proof("GET", url, access_token=token)
    )
    assert refused.status == 401
    challenge = refused.headers["WWW-Authenticate"]
    assert challenge.startswith('DPoP error="use_dpop_nonce", error_description="')
    assert 'algs="' in challenge
    assert refused.headers["DPoP-Nonce"] == nonce

    proof = signer.proof("GET", url, access_token=token, nonce=nonce)
    assert (await call(session, url, f"DPoP {token}", proof)).status == 200
    assert authority.resource.reasons() == [Reason.NONCE_MISSING]
    assert authority.resource.verified == 1
    # The token endpoint's nonce is its own: it demands none.
    assert authority.authorization.nonce is None


async def test_the_api_rotates_its_nonce_on_a_successful_answer(
    authority: DpopAuthority,
    token_server: TokenServer,
    api: Upstream,
    session: aiohttp.ClientSession,
    signer: DpopClientKey,
) -> None:
    token = await dpop_token(session, token_server, signer)
    first = authority.resource.demand_nonce()
    second = authority.resource.rotate_nonce()
    url = api.url + "/stream/10"  # a streamed answer gets the header too

    def proof(nonce: str) -> str:
        return signer.proof("GET", url, access_token=token, nonce=nonce)

    served = await call(session, url, f"DPoP {token}", proof(first))
    assert (served.status, served.headers["DPoP-Nonce"]) == (200, second)
    stale = await call(session, url, f"DPoP {token}", proof(first))
    assert (stale.status, stale.headers["DPoP-Nonce"]) == (401, second)
    served = await call(session, url, f"DPoP {token}", proof(second))
    assert served.status == 200
    assert "DPoP-Nonce" not in served.headers

    authority.resource.rotate_every = 2
    nonces = [second]
    for _ in range(4):
        served = await call(session, url, f"DPoP {token}", proof(nonces[-1]))
        assert served.status == 200
        if "DPoP-Nonce" in served.headers:
            nonces.append(served.headers["DPoP-Nonce"])
    assert len(nonces) == 3
    assert authority.resource.nonces == [first, second, *nonces[1:]]


async def test_the_api_refuses_every_misuse_of_a_dpop_token(
    authority: DpopAuthority,
    token_server: TokenServer,
    api: Upstream,
    session: aiohttp.ClientSession,
    signer: DpopClientKey,
) -> None:
    token = await dpop_token(session, token_server, signer)
    other_token = await dpop_token(session, token_server, DpopClientKey.generate("EdDSA"))
    url = api.url + "/api/stock/1"
    good = signer.proof("GET", url, access_token=token)
    assert (await call(session, url, f"DPoP {token}", good)).status == 200

    attempts: list[tuple[str | None, list[str], str, str]] = [
        (f"Bearer {token}", [], "invalid_token", "bound_token_as_bearer"),
        (f"DPoP {token}", [], "invalid_dpop_proof", Reason.HEADER_COUNT),
        (f"DPoP {token}", [good], "invalid_dpop_proof", Reason.JTI_REPLAYED),
        (
            f"DPoP {token}",
            [signer.proof("GET", url, access_token=token)] * 2,
            "invalid_dpop_proof",
            Reason.HEADER_COUNT,
        ),
        (
            f"DPoP {token}",
            [signer.proof("GET", url, access_token=other_token)],
            "invalid_dpop_proof",
            Reason.ATH_WRONG,
        ),
        (
            f"DPoP {other_token}",
            [signer.proof("GET", url, access_token=other_token)],
            "invalid_token",
            Reason.JKT_MISMATCH,
        ),
        (
            f"DPoP {token}",
            [signer.proof("POST", url, access_token=token)],
            "invalid_dpop_proof",
            Reason.HTM,
        ),
        (
            f"DPoP {token}",
            [signer.proof("GET", api.url + "/api/stock/2", access_token=token)],
            "invalid_dpop_proof",
            Reason.HTU,
        ),
        (
            "DPoP tok-never-issued",
            [signer.proof("GET", url, access_token="tok-never-issued")],
            "invalid_token",
            "unbound_token",
        ),
    ]
    for authorization, proofs, error, reason in attempts:
        refused = await call(session, url, authorization, *proofs)
        assert refused.status == 401, reason
        assert refused.headers["WWW-Authenticate"].startswith(f'DPoP error="{error}"'), reason
        assert authority.resource.refusals[-1].reason == reason

    token_server.revoke(token)
    revoked = await call(
        session, url, f"DPoP {token}", signer.proof("GET", url, access_token=token)
    )
    assert revoked.status == 401
    assert authority.resource.reasons()[-1] == "token_invalid"
    assert authority.resource.verified == 1


async def test_the_api_checks_htu_against_the_origin_the_test_names(
    authority: DpopAuthority,
    token_server: TokenServer,
    session: aiohttp.ClientSession,
    signer: DpopClientKey,
) -> None:
    token = await dpop_token(session, token_server, signer)
    async with Upstream(dpop=authority, dpop_origin="https://inventory.test") as api:
        url = api.url + "/api/stock/1?x=1"
        as_seen = signer.proof("GET", "https://inventory.test/api/stock/1", access_token=token)
        assert (await call(session, url, f"DPoP {token}", as_seen)).status == 200
        own = signer.proof("GET", api.url + "/api/stock/1", access_token=token)
        assert (await call(session, url, f"DPoP {token}", own)).status == 401


async def test_other_requests_reach_validate_unless_dpop_is_required(
    authority: DpopAuthority, session: aiohttp.ClientSession
) -> None:
    async with Upstream(dpop=authority, validate=lambda auth: auth in (None, "Bearer good")) as api:
        assert (await call(session, api.url + "/a", None)).status == 200
        assert (await call(session, api.url + "/a", "Bearer good")).status == 200
        assert (await call(session, api.url + "/a", "Bearer bad")).status == 401
        authority.require_dpop = True
        refused = await call(session, api.url + "/a", "Bearer good")
        assert refused.status == 401
        assert refused.headers["WWW-Authenticate"].startswith('DPoP algs="')
        assert (await call(session, api.url + "/a", None)).status == 401
    assert len(api.received) == 5
