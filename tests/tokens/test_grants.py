"""Token exchange (RFC 8693) and JWT bearer (RFC 7523 §2.1) requests against a real server.

The token server checks every parameter of both grants strictly
(tests/support/token_server.py); the RFCs' examples are used as vectors: the proxy's
request for a config like RFC 8693 §2.3's is that example byte for byte, and RFC 7523
§2.1's likewise. Also here: the subject token, actor token and assertion files are
re-read at every fetch, every answer a grant cannot use is refused, every error answer
is classified like any other, and no message carries a token or an assertion.
"""

from __future__ import annotations

import time
import typing
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from proxy.config.model import GrantName, Secret, TokenConfig
from proxy.errors import (
    InvalidClient,
    InvalidTokenResponse,
    TokenEndpointClientError,
    TokenEndpointServerError,
    TokenFetchError,
)
from proxy.tokens import TokenClient, TokenResponse
from proxy.tokens.cache_crypto import CacheKeys, credential_identity
from proxy.tokens.grants import GRANTS
from tests.support.token_server import (
    ACCESS_TOKEN_TYPE,
    JWT_TOKEN_TYPE,
    OMIT,
    Failure,
    TokenServer,
)

CLIENT_ID = "order-service"
SECRET = "s3cret-VALUE-9f2c"
REFRESH_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:refresh_token"
ID_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:id_token"
SAML2_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:saml2"

# RFC 8693 §2.3: the example request, client rs08 authenticated with Basic.
RFC8693_CLIENT, RFC8693_SECRET = "rs08", "long-secure-random-secret"
RFC8693_SUBJECT_TOKEN = "accVkjcJyb4BWCxGsndESCJQbdFMogUC5PbRDqceLTC"
RFC8693_BODY = (
    b"grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange"
    b"&resource=https%3A%2F%2Fbackend.example.com%2Fapi"
    b"&subject_token=accVkjcJyb4BWCxGsndESCJQbdFMogUC5PbRDqceLTC"
    b"&subject_token_type=urn%3Aietf%3Aparams%3Aoauth%3Atoken-type%3Aaccess_token"
)
RFC8693_AUTHORIZATION = "Basic cnMwODpsb25nLXNlY3VyZS1yYW5kb20tc2VjcmV0"
# RFC 7523 §3.1: the example claims set of an assertion from another identity provider.
RFC7523_CLAIMS: dict[str, Any] = {
    "iss": "https://jwt-idp.example.com",
    "sub": "mailto:mike@example.com",
    "aud": "https://jwt-rp.example.net",
    "nbf": 1300815780,
    "exp": 1300819380,
    "http://claims.example.com/member": True,
}
RFC7523_BODY_PREFIX = b"grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion="


@pytest.fixture(scope="module")
def idp_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def sa_token(key: ec.EllipticCurvePrivateKey, subject: str, **claims: Any) -> str:
    """A service-account token as the kubelet projects it (ES256 here)."""
    now = int(time.time())
    body = {
        "iss": "https://kubernetes.default.svc",
        "sub": subject,
        "aud": "sts.example.com",
        "iat": now,
        "exp": now + 3600,
        **claims,
    }
    return jwt.encode(body, key, algorithm="ES256", headers={"kid": "k8s-1"})


@pytest.fixture
async def server(idp_key: ec.EllipticCurvePrivateKey) -> AsyncIterator[TokenServer]:
    async with TokenServer(
        clients={CLIENT_ID: SECRET, RFC8693_CLIENT: RFC8693_SECRET},
        jwt_keys={"https://jwt-idp.example.com": idp_key.public_key()},
        allow_unauthenticated=True,
    ) as ts:
        yield ts


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as client_session:
        yield client_session


@pytest.fixture
def subject_file(tmp_path: Path, server: TokenServer, idp_key: ec.EllipticCurvePrivateKey) -> Path:
    """A projected service-account token the server accepts as a JWT subject token."""
    token = sa_token(idp_key, "system:serviceaccount:orders:order-service")
    server.subject_tokens[token] = JWT_TOKEN_TYPE
    path = tmp_path / "sa-token"
    path.write_text(token)
    return path


def exchange_config(server: TokenServer, subject_file: Path, **changes: Any) -> TokenConfig:
    settings: dict[str, Any] = {
        "client_id": "",
        "token_url": server.url,
        "grant": "token_exchange",
        "auth_method": "none",
        "subject_token_file": subject_file,
        "timeout": 5.0,
    }
    settings.update(changes)
    return TokenConfig(**settings)


def bearer_config(server: TokenServer, **changes: Any) -> TokenConfig:
    settings: dict[str, Any] = {
        "client_id": CLIENT_ID,
        "token_url": server.url,
        "grant": "jwt_bearer",
        "auth_method": "none",
        "timeout": 5.0,
    }
    settings.update(changes)
    return TokenConfig(**settings)


async def fetch(session: aiohttp.ClientSession, config: TokenConfig) -> TokenResponse:
    assert config.token_url is not None
    return await TokenClient(config, session).fetch(config.token_url)


def read_token(path: Path) -> str:
    return path.read_text()


def write_token(path: Path, token: str) -> None:
    """Replace the file's content, as the kubelet rotates a projected token."""
    path.write_text(token)


def remove(path: Path) -> None:
    path.unlink()


def write_pem(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


def test_every_configurable_grant_has_a_module() -> None:
    assert set(GRANTS) == set(typing.get_args(GrantName))
    assert {grant.grant_type for grant in GRANTS.values()} == {
        "client_credentials",
        "urn:ietf:params:oauth:grant-type:token-exchange",
        "urn:ietf:params:oauth:grant-type:jwt-bearer",
    }


# -- RFC vectors -----------------------------------------------------------------------


async def test_rfc8693_example_request_byte_for_byte(
    server: TokenServer, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    subject = tmp_path / "subject"
    subject.write_text(RFC8693_SUBJECT_TOKEN + "\n")
    server.subject_tokens[RFC8693_SUBJECT_TOKEN] = ACCESS_TOKEN_TYPE
    config = exchange_config(
        server,
        subject,
        client_id=RFC8693_CLIENT,
        client_secret=Secret(RFC8693_SECRET),
        auth_method="client_secret_basic",
        resource=("https://backend.example.com/api",),
        subject_token_type=ACCESS_TOKEN_TYPE,
    )
    response = await fetch(session, config)
    [received] = server.requests
    assert received.body == RFC8693_BODY
    assert received.headers["Authorization"] == RFC8693_AUTHORIZATION
    assert received.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert received.outcome == "issued"
    assert response.issued_token_type == ACCESS_TOKEN_TYPE
    assert response.access_token == server.issued[-1]


async def test_rfc8693_example_response_is_used_as_a_bearer_token(
    server: TokenServer, session: aiohttp.ClientSession, subject_file: Path
) -> None:
    """§2.3's answer: a JWT access token of 60 s, issued_token_type access_token."""
    example_token = jwt.encode(
        {
            "aud": "https://backend.example.com",
            "iss": "https://as.example.com",
            "exp": 1441917593,
            "iat": 1441917533,
            "sub": "bdc@example.com",
            "scope": "api",
        },
        ec.generate_private_key(ec.SECP256R1()),
        algorithm="ES256",
        headers={"kid": "9er"},
    )
    server.response_overrides = {
        "access_token": example_token,
        "issued_token_type": ACCESS_TOKEN_TYPE,
        "token_type": "Bearer",
        "expires_in": 60,
    }
    response = await fetch(session, exchange_config(server, subject_file))
    assert (response.access_token, response.token_type) == (example_token, "Bearer")
    assert (response.expires_in, response.lifetime_source) == (60, "expires_in")


async def test_rfc7523_example_request_byte_for_byte(
    server: TokenServer,
    session: aiohttp.ClientSession,
    tmp_path: Path,
    idp_key: ec.EllipticCurvePrivateKey,
) -> None:
    """§2.1's request with §3.1's claims (made current): no client authentication."""
    now = int(time.time())
    assertion = jwt.encode(
        {**RFC7523_CLAIMS, "nbf": now - 5, "exp": now + 300},
        idp_key,
        algorithm="ES256",
        headers={"kid": "16"},
    )
    server.assertion_audience = "https://jwt-rp.example.net"
    path = tmp_path / "assertion"
    path.write_text(assertion + "\n")
    response = await fetch(session, bearer_config(server, client_id="", assertion_file=path))
    [received] = server.requests
    assert received.body == RFC7523_BODY_PREFIX + assertion.encode()
    assert "Authorization" not in received.headers
    assert received.outcome == "issued"
    assert response.access_token == server.issued[-1]


async def test_rfc7523_example_claims_as_written_are_expired(
    server: TokenServer,
    session: aiohttp.ClientSession,
    tmp_path: Path,
    idp_key: ec.EllipticCurvePrivateKey,
) -> None:
    """§3.1's claims expired in 2011: invalid_grant, reported without the assertion."""
    assertion = jwt.encode(RFC7523_CLAIMS, idp_key, algorithm="ES256")
    server.assertion_audience = "https://jwt-rp.example.net"
    path = tmp_path / "assertion"
    path.write_text(assertion)
    with pytest.raises(InvalidClient) as caught:
        await fetch(session, bearer_config(server, assertion_file=path))
    assert server.requests[0].outcome == "error:invalid_grant"
    assert "invalid_grant" in caught.value.message
    assert assertion not in caught.value.message


# -- token exchange requests ----------------------------------------------------------


async def test_exchange_without_client_authentication(
    server: TokenServer, session: aiohttp.ClientSession, subject_file: Path
) -> None:
    config = exchange_config(
        server,
        subject_file,
        audience="//iam.example.com/pools/k8s/providers/cluster-1",
        scope=("cloud-platform",),
        requested_token_type=ACCESS_TOKEN_TYPE,
    )
    response = await fetch(session, config)
    [received] = server.requests
    assert received.auth_method == "none"
    assert "Authorization" not in received.headers
    assert list(received.form) == [
        "grant_type",
        "scope",
        "audience",
        "subject_token",
        "subject_token_type",
        "requested_token_type",
    ]
    assert received.param("subject_token") == read_token(subject_file)
    assert received.param("subject_token_type") == JWT_TOKEN_TYPE
    assert response.issued_token_type == ACCESS_TOKEN_TYPE


async def test_exchange_names_its_client_when_it_has_an_id(
    server: TokenServer, session: aiohttp.ClientSession, subject_file: Path
) -> None:
    await fetch(session, exchange_config(server, subject_file, client_id="public-app"))
    assert server.requests[0].param("client_id") == "public-app"


@pytest.mark.parametrize(
    "auth",
    [
        {"auth_method": "client_secret_basic", "client_secret": Secret(SECRET)},
        {"auth_method": "client_secret_post", "client_secret": Secret(SECRET)},
    ],
    ids=["client_secret_basic", "client_secret_post"],
)
async def test_exchange_with_client_authentication(
    server: TokenServer,
    session: aiohttp.ClientSession,
    subject_file: Path,
    auth: dict[str, Any],
) -> None:
    server.allow_unauthenticated = False
    await fetch(session, exchange_config(server, subject_file, client_id=CLIENT_ID, **auth))
    [received] = server.requests
    assert (received.auth_method, received.client_id) == (auth["auth_method"], CLIENT_ID)
    assert received.outcome == "issued"


async def test_exchange_with_private_key_jwt_client_authentication(
    server: TokenServer,
    session: aiohttp.ClientSession,
    subject_file: Path,
    tmp_path: Path,
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    server.jwt_keys[CLIENT_ID] = key.public_key()
    server.allow_unauthenticated = False
    config = exchange_config(
        server,
        subject_file,
        client_id=CLIENT_ID,
        auth_method="private_key_jwt",
        private_key_file=write_pem(tmp_path / "client.pem", key),
    )
    await fetch(session, config)
    [received] = server.requests
    assert (received.auth_method, received.outcome) == ("private_key_jwt", "issued")
    assert received.param("subject_token") == read_token(subject_file)


async def test_an_unauthenticated_exchange_the_server_refuses_is_invalid_client(
    server: TokenServer, session: aiohttp.ClientSession, subject_file: Path
) -> None:
    server.allow_unauthenticated = False
    with pytest.raises(InvalidClient) as caught:
        await fetch(session, exchange_config(server, subject_file))
    assert caught.value.reason == "invalid_client"
    assert read_token(subject_file) not in caught.value.message


async def test_actor_token_goes_with_its_type(
    server: TokenServer,
    session: aiohttp.ClientSession,
    subject_file: Path,
    tmp_path: Path,
    idp_key: ec.EllipticCurvePrivateKey,
) -> None:
    actor = sa_token(idp_key, "system:serviceaccount:orders:gateway")
    server.actor_tokens[actor] = JWT_TOKEN_TYPE
    actor_file = tmp_path / "actor"
    actor_file.write_text(actor)
    config = exchange_config(
        server, subject_file, actor_token_file=actor_file, actor_token_type=JWT_TOKEN_TYPE
    )
    await fetch(session, config)
    [received] = server.requests
    assert (received.param("actor_token"), received.param("actor_token_type")) == (
        actor,
        JWT_TOKEN_TYPE,
    )
    assert received.outcome == "issued"


async def test_subject_token_file_is_read_at_every_fetch(
    server: TokenServer,
    session: aiohttp.ClientSession,
    subject_file: Path,
    idp_key: ec.EllipticCurvePrivateKey,
) -> None:
    """The kubelet replaces the projected token; the next exchange presents the new one."""
    config = exchange_config(server, subject_file)
    client = TokenClient(config, session)
    first = read_token(subject_file)
    await client.fetch(server.url)
    rotated = sa_token(idp_key, "system:serviceaccount:orders:order-service", jti="second")
    server.subject_tokens = {rotated: JWT_TOKEN_TYPE}  # the old one is no longer valid
    write_token(subject_file, rotated)
    await client.fetch(server.url)
    presented = [received.param("subject_token") for received in server.requests]
    assert presented == [first, rotated]
    assert [received.outcome for received in server.requests] == ["issued", "issued"]


async def test_a_subject_token_the_server_refuses_is_invalid_client_without_the_token(
    server: TokenServer, session: aiohttp.ClientSession, subject_file: Path
) -> None:
    token = read_token(subject_file)
    server.subject_tokens.clear()
    with pytest.raises(InvalidClient) as caught:
        await fetch(session, exchange_config(server, subject_file))
    assert server.requests[0].outcome == "error:invalid_request"
    assert "HTTP 400 invalid_request" in caught.value.message
    assert token not in caught.value.message


async def test_a_wrong_subject_token_type_is_refused_by_the_server(
    server: TokenServer, session: aiohttp.ClientSession, subject_file: Path
) -> None:
    config = exchange_config(server, subject_file, subject_token_type=ACCESS_TOKEN_TYPE)
    with pytest.raises(InvalidClient):
        await fetch(session, config)
    assert server.requests[0].outcome == "error:invalid_request"


async def test_an_audience_the_server_does_not_serve_is_invalid_target(
    server: TokenServer, session: aiohttp.ClientSession, subject_file: Path
) -> None:
    server.audiences = {"https://inventory.internal"}
    config = exchange_config(server, subject_file, audience="https://elsewhere.example")
    with pytest.raises(InvalidClient) as caught:
        await fetch(session, config)
    assert server.requests[0].outcome == "error:invalid_target"
    assert "invalid_target" in caught.value.message


async def test_subject_token_file_removed_after_load(
    server: TokenServer, session: aiohttp.ClientSession, subject_file: Path
) -> None:
    token = read_token(subject_file)
    remove(subject_file)
    with pytest.raises(InvalidClient) as caught:
        await fetch(session, exchange_config(server, subject_file))
    assert str(subject_file) in caught.value.message
    assert token not in caught.value.message
    assert server.requests == []


async def test_a_subject_token_file_holding_two_lines_is_refused(
    server: TokenServer, session: aiohttp.ClientSession, subject_file: Path
) -> None:
    write_token(subject_file, "first-token\nsecond-token\n")
    with pytest.raises(InvalidClient) as caught:
        await fetch(session, exchange_config(server, subject_file))
    assert "does not hold one token" in caught.value.message
    assert "first-token" not in caught.value.message
    assert server.requests == []


# -- what a token exchange answer must say ----------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "token_type"),
    [
        ({}, "Bearer"),
        ({"token_type": "N_A", "issued_token_type": JWT_TOKEN_TYPE}, "Bearer"),
        ({"token_type": "n_a"}, "Bearer"),
        ({"token_type": "bearer"}, "bearer"),
        ({"issued_token_type": JWT_TOKEN_TYPE}, "Bearer"),
    ],
    ids=["access-token", "jwt-n_a", "lower-case-n_a", "lower-case-bearer", "jwt-bearer"],
)
async def test_usable_exchange_answers(
    server: TokenServer,
    session: aiohttp.ClientSession,
    subject_file: Path,
    overrides: dict[str, Any],
    token_type: str,
) -> None:
    server.response_overrides = overrides
    response = await fetch(session, exchange_config(server, subject_file))
    assert response.token_type == token_type
    expected = overrides.get("issued_token_type", ACCESS_TOKEN_TYPE)
    assert response.issued_token_type == expected


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"issued_token_type": OMIT},
            "token exchange answer has no issued_token_type (RFC 8693 §2.2.1)",
        ),
        *(
            (
                {"issued_token_type": issued},
                f"issued_token_type is {issued!r}: not an access token or a JWT, "
                "so it cannot be sent as a bearer token",
            )
            for issued in (REFRESH_TOKEN_TYPE, ID_TOKEN_TYPE, SAML2_TOKEN_TYPE)
        ),
        (
            {"issued_token_type": 7},
            "issued_token_type is '7': not an access token or a JWT, "
            "so it cannot be sent as a bearer token",
        ),
        (
            {"token_type": "DPoP"},
            "token_type is 'DPoP', not Bearer or N_A (RFC 6750); set token.dpop to use DPoP tokens",
        ),
        ({"token_type": "mac"}, "token_type is 'mac', not Bearer or N_A (RFC 6750)"),
        ({"access_token": OMIT}, "token response has no access_token string"),
    ],
    ids=["no-issued-type", "refresh-token", "id-token", "saml2", "number", "dpop", "mac", "none"],
)
async def test_unusable_exchange_answers_are_invalid_response(
    server: TokenServer,
    session: aiohttp.ClientSession,
    subject_file: Path,
    overrides: dict[str, Any],
    message: str,
) -> None:
    server.response_overrides = overrides
    with pytest.raises(InvalidTokenResponse) as caught:
        await fetch(session, exchange_config(server, subject_file))
    assert caught.value.reason == "invalid_response"
    assert caught.value.message == message


async def test_n_a_is_only_for_token_exchange(
    server: TokenServer, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    server.jwt_keys[CLIENT_ID] = key.public_key()
    server.response_overrides = {"token_type": "N_A"}
    config = bearer_config(server, private_key_file=write_pem(tmp_path / "k.pem", key))
    with pytest.raises(InvalidTokenResponse) as caught:
        await fetch(session, config)
    assert caught.value.message == "token_type is 'N_A', not Bearer (RFC 6750)"


# -- every error answer, classified as for client credentials ----------------------------

ERROR_CASES = [
    ("invalid_request", 400, "invalid_request", InvalidClient),
    ("invalid_client", 401, "invalid_client", InvalidClient),
    ("invalid_grant", 400, "invalid_grant", InvalidClient),
    ("unauthorized_client", 400, "unauthorized_client", InvalidClient),
    ("unsupported_grant_type", 400, "unsupported_grant_type", InvalidClient),
    ("invalid_scope", 400, "invalid_scope", InvalidClient),
    ("invalid_target", 400, "invalid_target", InvalidClient),
    ("other-4xx-code", 400, "access_denied", TokenEndpointClientError),
    ("500", 500, "server_error", TokenEndpointServerError),
    ("503", 503, "temporarily_unavailable", TokenEndpointServerError),
    ("429", 429, "slow_down", TokenEndpointClientError),
]


@pytest.mark.parametrize("grant", ["token_exchange", "jwt_bearer"])
@pytest.mark.parametrize(
    ("name", "status", "code", "error"), ERROR_CASES, ids=[case[0] for case in ERROR_CASES]
)
async def test_error_answers_are_classified_and_never_echo_the_credential(
    server: TokenServer,
    session: aiohttp.ClientSession,
    subject_file: Path,
    tmp_path: Path,
    idp_key: ec.EllipticCurvePrivateKey,
    grant: str,
    name: str,
    status: int,
    code: str,
    error: type[TokenFetchError],
) -> None:
    """RFC 8693 §2.2.2 and RFC 6749 §5.2 errors; a server that quotes what it was sent
    in `error_description` has it redacted."""
    if grant == "token_exchange":
        config = exchange_config(server, subject_file)
        credential = read_token(subject_file)
    else:
        credential = sa_token(idp_key, "system:serviceaccount:orders:order-service")
        assertion_file = tmp_path / "assertion"
        assertion_file.write_text(credential)
        config = bearer_config(server, assertion_file=assertion_file)
    body = {"error": code, "error_description": f"refused {credential}"}
    server.fail_next(Failure(name, status, body, {"Retry-After": "3"}))
    with pytest.raises(error) as caught:
        await fetch(session, config)
    assert caught.value.reason == error.reason
    assert f"HTTP {status}" in caught.value.message
    assert code in caught.value.message
    assert credential not in caught.value.message
    if status in (429, 503):
        assert caught.value.retry_after == 3.0


@pytest.mark.parametrize(
    ("failure", "reason"),
    [
        ("bad_json", "invalid_response"),
        ("html", "invalid_response"),
        ("redirect", "invalid_response"),
        ("403", "http_4xx"),
        ("502", "http_5xx"),
        ("drop", "connect"),
    ],
)
async def test_other_failures_of_an_exchange(
    server: TokenServer,
    session: aiohttp.ClientSession,
    subject_file: Path,
    failure: str,
    reason: str,
) -> None:
    server.fail_next(failure)
    with pytest.raises(TokenFetchError) as caught:
        await fetch(session, exchange_config(server, subject_file))
    assert caught.value.reason == reason


# -- JWT bearer ---------------------------------------------------------------------------


async def test_jwt_bearer_signs_its_assertion_with_the_private_key(
    server: TokenServer, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """RFC 7523 §3: iss = sub = client_id, aud = the token endpoint, short exp, unique jti."""
    key = ec.generate_private_key(ec.SECP256R1())
    server.jwt_keys[CLIENT_ID] = key.public_key()
    config = bearer_config(
        server, private_key_file=write_pem(tmp_path / "k.pem", key), key_id="key-1"
    )
    client = TokenClient(config, session)
    await client.fetch(server.url)
    await client.fetch(server.url)
    assert [received.outcome for received in server.requests] == ["issued", "issued"]
    assertions = [received.param("assertion") for received in server.requests]
    claims = [
        jwt.decode(a or "", key.public_key(), algorithms=["ES256"], audience=server.url)
        for a in assertions
    ]
    for claim in claims:
        assert claim["iss"] == claim["sub"] == CLIENT_ID
        assert claim["exp"] - claim["iat"] == 60
    assert claims[0]["jti"] != claims[1]["jti"]
    assert jwt.get_unverified_header(assertions[0] or "")["kid"] == "key-1"
    assert all(received.auth_method == "none" for received in server.requests)
    assert all(received.param("client_id") == CLIENT_ID for received in server.requests)


async def test_jwt_bearer_with_client_secret_authentication(
    server: TokenServer,
    session: aiohttp.ClientSession,
    tmp_path: Path,
    idp_key: ec.EllipticCurvePrivateKey,
) -> None:
    server.allow_unauthenticated = False
    path = tmp_path / "assertion"
    path.write_text(sa_token(idp_key, "user-1", iss="https://jwt-idp.example.com", aud=server.url))
    config = bearer_config(
        server,
        assertion_file=path,
        auth_method="client_secret_basic",
        client_secret=Secret(SECRET),
    )
    await fetch(session, config)
    [received] = server.requests
    assert (received.auth_method, received.client_id, received.outcome) == (
        "client_secret_basic",
        CLIENT_ID,
        "issued",
    )


async def test_assertion_file_is_read_at_every_fetch(
    server: TokenServer,
    session: aiohttp.ClientSession,
    tmp_path: Path,
    idp_key: ec.EllipticCurvePrivateKey,
) -> None:
    def assertion(jti: str) -> str:
        return sa_token(
            idp_key, "user-1", iss="https://jwt-idp.example.com", aud=server.url, jti=jti
        )

    path = tmp_path / "assertion"
    path.write_text(assertion("one"))
    client = TokenClient(bearer_config(server, assertion_file=path), session)
    await client.fetch(server.url)
    # The same assertion again is a replay (jti seen): the server refuses it.
    with pytest.raises(InvalidClient):
        await client.fetch(server.url)
    path.write_text(assertion("two"))
    await client.fetch(server.url)
    outcomes = [received.outcome for received in server.requests]
    assert outcomes == ["issued", "error:invalid_grant", "issued"]
    sent = [
        jwt.decode(r.param("assertion") or "", options={"verify_signature": False})["jti"]
        for r in server.requests
    ]
    assert sent == ["one", "one", "two"]


async def test_an_assertion_for_another_audience_is_invalid_grant(
    server: TokenServer,
    session: aiohttp.ClientSession,
    tmp_path: Path,
    idp_key: ec.EllipticCurvePrivateKey,
) -> None:
    path = tmp_path / "assertion"
    path.write_text(sa_token(idp_key, "user-1", iss="https://jwt-idp.example.com"))
    with pytest.raises(InvalidClient):
        await fetch(session, bearer_config(server, assertion_file=path))
    assert server.requests[0].outcome == "error:invalid_grant"


# -- the fleet cache's name for a credential ------------------------------------------------


def test_cache_identity_of_an_exchange(tmp_path: Path, idp_key: ec.EllipticCurvePrivateKey) -> None:
    """The subject's identity, not the token, names the entry: a rotated token of the same
    service account shares it; another account, token type or requested type does not.
    No token appears in the identity."""
    keys = CacheKeys(b"k" * 32)
    subject = tmp_path / "subject"

    def identity(token: str, **changes: Any) -> list[str]:
        subject.write_text(token)
        config = TokenConfig(
            client_id="",
            token_url="https://sts.example.com/v1/token",
            grant="token_exchange",
            auth_method="none",
            subject_token_file=subject,
            **changes,
        )
        return credential_identity(config, keys)

    account = "system:serviceaccount:orders:order-service"
    first = sa_token(idp_key, account, jti="1")
    base = identity(first)
    assert "token_exchange" in base
    assert not any(first in part or part in first for part in base if len(part) > 20)
    assert identity(sa_token(idp_key, account, jti="2")) == base
    assert identity(sa_token(idp_key, "system:serviceaccount:orders:other")) != base
    assert identity(first, requested_token_type=JWT_TOKEN_TYPE) != base
    assert identity(first, subject_token_type=ACCESS_TOKEN_TYPE) != base
    assert identity("opaque-token-1") != identity("opaque-token-2")
    assert "opaque-token-1" not in "".join(identity("opaque-token-1"))


def test_cache_identity_of_jwt_bearer(tmp_path: Path) -> None:
    keys = CacheKeys(b"k" * 32)

    def identity(key: ec.EllipticCurvePrivateKey) -> list[str]:
        config = TokenConfig(
            client_id=CLIENT_ID,
            token_url="https://auth.example.com/token",
            grant="jwt_bearer",
            auth_method="none",
            private_key_file=write_pem(tmp_path / "k.pem", key),
        )
        return credential_identity(config, keys)

    key = ec.generate_private_key(ec.SECP256R1())
    first = identity(key)
    assert "jwt_bearer" in first
    assert identity(key) == first
    assert identity(ec.generate_private_key(ec.SECP256R1())) != first
    client_credentials = TokenConfig(
        client_id=CLIENT_ID, token_url="https://auth.example.com/token", auth_method="none"
    )
    assert credential_identity(client_credentials, keys)[2] == "client_credentials"


def test_client_credentials_identity_is_unchanged(tmp_path: Path) -> None:
    """Replicas that predate the grants name client-credentials entries alike."""
    keys = CacheKeys(b"k" * 32)
    config = TokenConfig(
        client_id=CLIENT_ID,
        token_url="https://auth.example.com/token",
        client_secret=Secret(SECRET),
        scope=("a", "b"),
    )
    assert credential_identity(config, keys) == [
        "v1",
        "https://auth.example.com/token",
        "client_credentials",
        CLIENT_ID,
        "client_secret_basic",
        "",
        keys.fingerprint(b"secret\0" + SECRET.encode()),
        "a b",
        "",
        "[]",
        "[]",
    ]
