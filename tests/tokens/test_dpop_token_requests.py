"""DPoP token requests (RFC 9449 §5, §8) from `TokenClient`, judged by a strict token
endpoint: a proof on every request, one retry with the nonce the server asks for, the
newest nonce kept, and the answer's `token_type` taken at its word."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from proxy.config import DpopConfig
from proxy.errors import InvalidTokenResponse, TokenEndpointClientError
from proxy.tokens.client import TokenClient
from proxy.tokens.dpop import DpopSession
from tests.support.configs import CLIENT_ID, CLIENT_SECRET, token_config
from tests.support.dpop_servers import DpopAuthority
from tests.support.token_server import TokenServer


@pytest.fixture
def authority() -> DpopAuthority:
    return DpopAuthority(require_proof=True)


@pytest.fixture
async def server(authority: DpopAuthority) -> AsyncIterator[TokenServer]:
    async with TokenServer(clients={CLIENT_ID: CLIENT_SECRET}, dpop=authority) as server:
        yield server


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        yield session


class Client:
    """A DPoP token client for `server`, counting its nonce retries."""

    def __init__(self, server: TokenServer, session: aiohttp.ClientSession) -> None:
        config = token_config(server, dpop=DpopConfig())
        assert config.dpop is not None
        self.dpop = DpopSession.from_config(config.dpop)
        self.retries = 0
        self.url = server.url
        self.client = TokenClient(
            config, session, upstream="inventory", dpop=self.dpop, on_nonce_retry=self.count
        )

    def count(self) -> None:
        self.retries += 1

    async def fetch(self) -> str:
        response = await self.client.fetch(self.url)
        return response.token_type


async def test_a_token_request_carries_a_proof_and_gets_a_token_bound_to_the_key(
    server: TokenServer, session: aiohttp.ClientSession, authority: DpopAuthority
) -> None:
    client = Client(server, session)
    assert await client.fetch() == "DPoP"
    (proof,) = authority.authorization.proofs
    assert (proof.claims["htm"], proof.claims["htu"]) == ("POST", server.url)
    assert proof.jkt == client.dpop.key.thumbprint
    assert authority.bindings == {server.issued[-1]: client.dpop.key.thumbprint}
    assert client.retries == 0


async def test_a_nonce_asked_for_is_sent_once_and_kept_for_later_requests(
    server: TokenServer, session: aiohttp.ClientSession, authority: DpopAuthority
) -> None:
    nonce = authority.authorization.demand_nonce()
    client = Client(server, session)
    assert await client.fetch() == "DPoP"
    assert client.retries == 1
    assert [r.outcome for r in server.requests] == ["error:use_dpop_nonce", "issued"]
    # The next fetch sends the kept nonce at once.
    assert await client.fetch() == "DPoP"
    assert client.retries == 1
    assert [p.claims.get("nonce") for p in authority.authorization.proofs] == [nonce, nonce]


async def test_a_nonce_handed_out_on_success_is_used_next_time(
    server: TokenServer, session: aiohttp.ClientSession, authority: DpopAuthority
) -> None:
    client = Client(server, session)
    rotated = authority.authorization.rotate_nonce()
    assert await client.fetch() == "DPoP"
    assert await client.fetch() == "DPoP"
    assert client.retries == 0
    assert authority.authorization.proofs[-1].claims["nonce"] == rotated


async def test_a_server_that_asks_again_and_again_is_asked_only_twice(
    server: TokenServer, session: aiohttp.ClientSession, authority: DpopAuthority
) -> None:
    client = Client(server, session)
    # Every answer names a new nonce (and demands it): the proxy tries once more, no more.
    original_check = authority.authorization.check

    def moving_target(*args: object, **kwargs: object) -> object:
        authority.authorization.demand_nonce()
        return original_check(*args, **kwargs)  # type: ignore[arg-type]

    authority.authorization.check = moving_target  # type: ignore[method-assign]
    with pytest.raises(TokenEndpointClientError, match="HTTP 400 \\(use_dpop_nonce\\)"):
        await client.fetch()
    assert len(server.requests) == 2
    assert client.retries == 1


async def test_a_bearer_answer_gives_a_bearer_token(
    server: TokenServer, session: aiohttp.ClientSession, authority: DpopAuthority
) -> None:
    authority.token_type = "Bearer"
    assert await Client(server, session).fetch() == "Bearer"


async def test_a_dpop_answer_without_dpop_configured_is_refused(
    session: aiohttp.ClientSession,
) -> None:
    async with TokenServer(clients={CLIENT_ID: CLIENT_SECRET}) as plain:
        plain.response_overrides = {"token_type": "DPoP"}
        config = token_config(plain)
        with pytest.raises(InvalidTokenResponse, match=r"set token\.dpop to use DPoP tokens"):
            await TokenClient(config, session).fetch(plain.url)
