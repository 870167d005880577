"""TokenClient, client assertions, discovery and TLS contexts against a real token server."""

from __future__ import annotations

import base64
import email.utils
import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from proxy.config import Secret, TlsClientConfig, TokenConfig
from proxy.errors import (
    InvalidClient,
    InvalidTokenResponse,
    TokenEndpointClientError,
    TokenEndpointServerError,
    TokenEndpointTimeout,
    TokenEndpointUnreachable,
    TokenFetchError,
)
from proxy.tls.client_context import client_ssl_context
from proxy.tokens import TokenClient, TokenResponse, discover_token_endpoint
from proxy.tokens.assertion import JWT_BEARER_ASSERTION_TYPE, sign_client_assertion
from proxy.tokens.client import parse_retry_after
from proxy.tokens.lifetime import MAX_LIFETIME, token_lifetime
from tests.support.token_server import OMIT, Failure, TokenServer

CLIENT_ID = "order-service"
SECRET = "s3cret-VALUE-9f2c"
# RFC 6749 §2.3.1: these only survive Basic auth when form-urlencoded before base64.
TRICKY_SECRET = "a:b+c%2Fd e/é€~*=&?"
TRICKY_CLIENT_ID = "svc:1 +é"


@pytest.fixture
async def server() -> AsyncIterator[TokenServer]:
    async with TokenServer(clients={CLIENT_ID: SECRET, TRICKY_CLIENT_ID: TRICKY_SECRET}) as ts:
        yield ts


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as client_session:
        yield client_session


def token_config(url: str, **overrides: Any) -> TokenConfig:
    settings: dict[str, Any] = {
        "client_id": CLIENT_ID,
        "token_url": url,
        "client_secret": Secret(SECRET),
        "timeout": 5.0,
    }
    settings.update(overrides)
    return TokenConfig(**settings)


async def fetch(session: aiohttp.ClientSession, config: TokenConfig) -> TokenResponse:
    assert config.token_url is not None
    return await TokenClient(config, session).fetch(config.token_url)


# -- client authentication ---------------------------------------------------------


async def test_basic_auth_sends_the_client_credentials_request(
    server: TokenServer, session: aiohttp.ClientSession
) -> None:
    config = token_config(
        server.url,
        scope=("read:inventory", "write:orders"),
        audience="https://inventory.internal",
        resource=("https://a.example", "https://b.example"),
        extra_params=(("tenant", "blue"),),
    )
    response = await fetch(session, config)

    assert response.access_token == server.issued[0]
    assert server.is_valid(response.access_token)
    assert response.expires_in == 3600
    assert response.token_type == "Bearer"
    assert response.scope == "read:inventory write:orders"
    received = server.requests[0]
    assert received.auth_method == "client_secret_basic"
    assert received.client_id == CLIENT_ID
    assert received.form == {
        "grant_type": ["client_credentials"],
        "scope": ["read:inventory write:orders"],
        "audience": ["https://inventory.internal"],
        "resource": ["https://a.example", "https://b.example"],
        "tenant": ["blue"],
    }
    assert received.headers["Accept"] == "application/json"
    assert received.headers["Content-Type"] == "application/x-www-form-urlencoded"


async def test_basic_auth_form_urlencodes_id_and_secret_before_base64(
    server: TokenServer, session: aiohttp.ClientSession
) -> None:
    config = token_config(
        server.url, client_id=TRICKY_CLIENT_ID, client_secret=Secret(TRICKY_SECRET)
    )
    response = await fetch(session, config)

    assert server.is_valid(response.access_token)
    received = server.requests[0]
    assert received.client_id == TRICKY_CLIENT_ID
    encoded = received.headers["Authorization"].removeprefix("Basic ")
    # Not the naive (and wrong) base64 of "id:secret" in UTF-8.
    naive = base64.b64encode(f"{TRICKY_CLIENT_ID}:{TRICKY_SECRET}".encode()).decode()
    assert encoded != naive
    assert base64.b64decode(encoded).decode("ascii").count(":") == 1


async def test_client_secret_post_puts_credentials_in_the_body(
    server: TokenServer, session: aiohttp.ClientSession
) -> None:
    config = token_config(
        server.url,
        client_id=TRICKY_CLIENT_ID,
        client_secret=Secret(TRICKY_SECRET),
        auth_method="client_secret_post",
    )
    response = await fetch(session, config)

    assert server.is_valid(response.access_token)
    received = server.requests[0]
    assert received.auth_method == "client_secret_post"
    assert received.form["client_secret"] == [TRICKY_SECRET]
    assert "Authorization" not in received.headers


async def test_wrong_secret_is_invalid_client(
    server: TokenServer, session: aiohttp.ClientSession
) -> None:
    with pytest.raises(InvalidClient) as caught:
        await fetch(session, token_config(server.url, client_secret=Secret("wrong-secret")))
    assert caught.value.reason == "invalid_client"
    assert "401 invalid_client" in caught.value.message
    assert "wrong-secret" not in caught.value.message


async def test_secret_file_is_read_again_at_every_fetch(
    server: TokenServer, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    secret_file = tmp_path / "client-secret"
    secret_file.write_text("first-secret\n")
    server.clients[CLIENT_ID] = "first-secret"
    config = token_config(server.url, client_secret=None, client_secret_file=secret_file)
    client = TokenClient(config, session)
    assert server.is_valid((await client.fetch(server.url)).access_token)

    secret_file.write_text("second-secret\r\n")  # rotated, e.g. by the kubelet
    server.clients[CLIENT_ID] = "second-secret"
    assert server.is_valid((await client.fetch(server.url)).access_token)
    assert [r.outcome for r in server.requests] == ["issued", "issued"]


async def test_unreadable_secret_file_fails_without_a_request(
    server: TokenServer, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    missing = tmp_path / "nope" / "client-secret"
    config = token_config(server.url, client_secret=None, client_secret_file=missing)
    with pytest.raises(InvalidClient, match="client secret file unreadable") as caught:
        await fetch(session, config)
    assert str(missing) in caught.value.message
    assert server.requests == []


def _rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return _rsa_key()


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return _ec_key()


def _write_pem(path: Path, key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


@pytest.mark.parametrize(("key_kind", "algorithm"), [("rsa", "RS256"), ("ec", "ES256")])
async def test_private_key_jwt_signs_a_fresh_assertion_per_request(
    server: TokenServer,
    session: aiohttp.ClientSession,
    tmp_path: Path,
    rsa_key: rsa.RSAPrivateKey,
    ec_key: ec.EllipticCurvePrivateKey,
    key_kind: str,
    algorithm: str,
) -> None:
    key = rsa_key if key_kind == "rsa" else ec_key
    server.jwt_keys[CLIENT_ID] = key.public_key()
    config = token_config(
        server.url,
        client_secret=None,
        auth_method="private_key_jwt",
        private_key_file=_write_pem(tmp_path / "key.pem", key),
        key_id="key-2024",
    )
    client = TokenClient(config, session)
    before = int(time.time())
    first = await client.fetch(server.url)
    second = await client.fetch(server.url)  # the server refuses a reused jti

    assert server.is_valid(first.access_token)
    assert server.is_valid(second.access_token)
    assertions = [r.form["client_assertion"][0] for r in server.requests]
    assert assertions[0] != assertions[1]
    for received, assertion in zip(server.requests, assertions, strict=True):
        assert received.auth_method == "private_key_jwt"
        assert received.form["client_id"] == [CLIENT_ID]
        assert received.form["client_assertion_type"] == [JWT_BEARER_ASSERTION_TYPE]
        header = jwt.get_unverified_header(assertion)
        assert header["alg"] == algorithm
        assert header["kid"] == "key-2024"
        claims = jwt.decode(
            assertion, key.public_key(), algorithms=[algorithm], audience=server.url
        )
        assert claims["iss"] == claims["sub"] == CLIENT_ID
        assert claims["exp"] - claims["iat"] == 60
        assert claims["iat"] >= before


async def test_private_key_jwt_with_the_wrong_key_is_invalid_client(
    server: TokenServer, session: aiohttp.ClientSession, tmp_path: Path, ec_key: Any
) -> None:
    server.jwt_keys[CLIENT_ID] = _ec_key().public_key()
    config = token_config(
        server.url,
        client_secret=None,
        auth_method="private_key_jwt",
        private_key_file=_write_pem(tmp_path / "key.pem", ec_key),
    )
    with pytest.raises(InvalidClient, match="invalid_client"):
        await fetch(session, config)


async def test_unreadable_private_key_is_a_clear_invalid_client(
    server: TokenServer, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    garbage = tmp_path / "key.pem"
    garbage.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    config = token_config(
        server.url, client_secret=None, auth_method="private_key_jwt", private_key_file=garbage
    )
    with pytest.raises(InvalidClient, match="not a readable private key"):
        await fetch(session, config)
    assert server.requests == []


async def test_client_assertion_file_is_read_again_at_every_fetch(
    server: TokenServer, session: aiohttp.ClientSession, tmp_path: Path, ec_key: Any
) -> None:
    server.jwt_keys[CLIENT_ID] = ec_key.public_key()
    assertion_file = tmp_path / "token"

    def mint() -> str:
        return sign_client_assertion(
            client_id=CLIENT_ID, audience=server.url, key=ec_key, algorithm="ES256"
        )

    config = token_config(
        server.url,
        client_secret=None,
        auth_method="private_key_jwt",
        client_assertion_file=assertion_file,
    )
    client = TokenClient(config, session)
    first_assertion, second_assertion = mint(), mint()
    assertion_file.write_text(first_assertion + "\n")
    assert server.is_valid((await client.fetch(server.url)).access_token)
    assertion_file.write_text(second_assertion + "\n")  # rotated by the kubelet
    # A stale read would resend the first assertion, whose jti the server refuses now.
    assert server.is_valid((await client.fetch(server.url)).access_token)
    sent = [r.form["client_assertion"][0] for r in server.requests]
    assert sent == [first_assertion, second_assertion]


# -- TLS ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_files(ca: trustme.CA, tmp_path: Path) -> TlsClientConfig:
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    client_cert = ca.issue_cert("order-service.clients.example", common_name=CLIENT_ID)
    cert_file, key_file = tmp_path / "client.pem", tmp_path / "client.key"
    client_cert.cert_chain_pems[0].write_to_path(str(cert_file))
    client_cert.private_key_pem.write_to_path(str(key_file))
    return TlsClientConfig(ca_file=ca_file, client_cert_file=cert_file, client_key_file=key_file)


def _server_context(ca: trustme.CA, *, host: str = "127.0.0.1") -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(host).configure_cert(context)
    ca.configure_trust(context)
    context.verify_mode = ssl.CERT_OPTIONAL
    return context


async def test_tls_client_auth_presents_the_client_certificate(
    ca: trustme.CA, tls_files: TlsClientConfig
) -> None:
    async with (
        TokenServer(ssl_context=_server_context(ca), tls_clients={CLIENT_ID: CLIENT_ID}) as ts,
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=client_ssl_context(tls_files)),
            cookie_jar=aiohttp.DummyCookieJar(),
        ) as tls_session,
    ):
        config = token_config(
            ts.url, client_secret=None, auth_method="tls_client_auth", tls=tls_files
        )
        response = await fetch(tls_session, config)
    assert ts.is_valid(response.access_token)
    assert ts.requests[0].auth_method == "tls_client_auth"
    assert ts.requests[0].form["client_id"] == [CLIENT_ID]


async def test_a_server_certificate_from_another_ca_is_unreachable(
    tls_files: TlsClientConfig,
) -> None:
    other_ca = trustme.CA()
    async with (
        TokenServer(ssl_context=_server_context(other_ca)) as ts,
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=client_ssl_context(tls_files))
        ) as tls_session,
    ):
        with pytest.raises(TokenEndpointUnreachable, match="not trusted") as caught:
            await fetch(tls_session, token_config(ts.url))
    assert caught.value.reason == "connect"
    assert ts.requests == []


async def test_a_certificate_for_another_host_is_refused(
    ca: trustme.CA, tls_files: TlsClientConfig
) -> None:
    async with (
        TokenServer(ssl_context=_server_context(ca, host="auth.example.com")) as ts,
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=client_ssl_context(tls_files))
        ) as tls_session,
    ):
        with pytest.raises(TokenEndpointUnreachable):
            await fetch(tls_session, token_config(ts.url))
    assert ts.requests == []


def test_ssl_contexts_verify_and_are_cached(tls_files: TlsClientConfig) -> None:
    context = client_ssl_context(tls_files)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    assert client_ssl_context(TlsClientConfig(**vars(tls_files))) is context
    assert client_ssl_context(TlsClientConfig()) is not context
    # ca_file replaces the system store: only our CA is trusted.
    assert len(context.get_ca_certs()) == 1


# -- failure classification -------------------------------------------------------


@pytest.mark.parametrize(
    ("failure", "error_class", "reason"),
    [
        ("500", TokenEndpointServerError, "http_5xx"),
        ("502", TokenEndpointServerError, "http_5xx"),
        ("503", TokenEndpointServerError, "http_5xx"),
        ("429", TokenEndpointClientError, "http_4xx"),
        ("403", TokenEndpointClientError, "http_4xx"),
        ("404", TokenEndpointClientError, "http_4xx"),
        ("invalid_client", InvalidClient, "invalid_client"),
        ("invalid_scope", InvalidClient, "invalid_client"),
        ("unauthorized_client", InvalidClient, "invalid_client"),
        ("invalid_grant", InvalidClient, "invalid_client"),
        ("bad_json", InvalidTokenResponse, "invalid_response"),
        ("not_object", InvalidTokenResponse, "invalid_response"),
        ("no_token", InvalidTokenResponse, "invalid_response"),
        ("empty_token", InvalidTokenResponse, "invalid_response"),
        ("bad_type", InvalidTokenResponse, "invalid_response"),
        ("bad_chars", InvalidTokenResponse, "invalid_response"),
        ("non_ascii_token", InvalidTokenResponse, "invalid_response"),
        ("html", InvalidTokenResponse, "invalid_response"),
        ("redirect", InvalidTokenResponse, "invalid_response"),
        ("huge", InvalidTokenResponse, "invalid_response"),
        ("drop", TokenEndpointUnreachable, "connect"),
    ],
)
async def test_failures_are_classified(
    server: TokenServer,
    session: aiohttp.ClientSession,
    failure: str,
    error_class: type[TokenFetchError],
    reason: str,
) -> None:
    server.fail_next(failure)
    with pytest.raises(TokenFetchError) as caught:
        await fetch(session, token_config(server.url))
    assert type(caught.value) is error_class
    assert caught.value.reason == reason
    assert SECRET not in caught.value.message
    assert "tok-" not in caught.value.message  # no (fake) token in any message
    assert len(server.requests) == 1  # and no redirect followed


@pytest.mark.parametrize("failure", ["503", "429"])
async def test_retry_after_seconds_is_carried(
    server: TokenServer, session: aiohttp.ClientSession, failure: str
) -> None:
    server.fail_next(failure)
    with pytest.raises(TokenFetchError) as caught:
        await fetch(session, token_config(server.url))
    assert caught.value.retry_after == 1.0


async def test_retry_after_http_date_is_carried(
    server: TokenServer, session: aiohttp.ClientSession
) -> None:
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    server.fail_next(Failure(status=503, body=b"busy", headers={"Retry-After": when}))
    with pytest.raises(TokenEndpointServerError) as caught:
        await fetch(session, token_config(server.url))
    assert caught.value.retry_after is not None
    assert 27 <= caught.value.retry_after <= 31


@pytest.mark.parametrize(
    ("value", "expected"),
    [("120", 120.0), ("  7 ", 7.0), ("soon", None), ("", None), (None, None), ("-3", None)],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value) == expected


async def test_timeout_is_classified(server: TokenServer, session: aiohttp.ClientSession) -> None:
    server.fail_next("hang")
    started = time.monotonic()
    with pytest.raises(TokenEndpointTimeout) as caught:
        await fetch(session, token_config(server.url, timeout=0.3))
    assert caught.value.reason == "timeout"
    assert time.monotonic() - started < 3


async def test_connection_refused_is_unreachable(session: aiohttp.ClientSession) -> None:
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]
    # Nothing listens on `port` any more.
    with pytest.raises(TokenEndpointUnreachable, match="cannot connect") as caught:
        await fetch(session, token_config(f"http://127.0.0.1:{port}/oauth/token"))
    assert caught.value.reason == "connect"


async def test_error_description_is_sanitised_and_redacted(
    server: TokenServer, session: aiohttp.ClientSession
) -> None:
    description = "bad\r\nX-Injected: 1 secret was " + SECRET + " " + "z" * 1000
    server.fail_next(
        Failure(status=400, body={"error": "invalid_grant", "error_description": description})
    )
    with pytest.raises(InvalidClient) as caught:
        await fetch(session, token_config(server.url))
    message = caught.value.message
    assert "invalid_grant" in message
    assert "bad??X-Injected" in message
    assert SECRET not in message
    assert "\n" not in message
    assert len(message) < 300


async def test_token_response_repr_hides_the_token(
    server: TokenServer, session: aiohttp.ClientSession
) -> None:
    response = await fetch(session, token_config(server.url))
    assert response.access_token not in repr(response)
    assert response.access_token not in str(response)


# -- expires_in --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expires_in", "expected", "source"),
    [
        (120, 120.0, "expires_in"),
        (120.5, 120.5, "expires_in"),
        ("90", 90.0, "expires_in"),
        (" 45 ", 45.0, "expires_in"),
        (OMIT, 77.0, "default"),
        (None, 77.0, "default"),
        (0, 77.0, "default"),
        (-30, 77.0, "default"),
        ("soon", 77.0, "default"),
        (True, 77.0, "default"),
        ({"seconds": 5}, 77.0, "default"),
        (10**9, MAX_LIFETIME, "expires_in"),
        (float("inf"), MAX_LIFETIME, "expires_in"),
    ],
)
async def test_odd_expires_in_values(
    server: TokenServer,
    session: aiohttp.ClientSession,
    expires_in: Any,
    expected: float,
    source: str,
) -> None:
    server.response_overrides["expires_in"] = expires_in
    response = await fetch(session, token_config(server.url, default_lifetime=77.0))
    assert response.expires_in == expected
    assert response.lifetime_source == source
    assert server.is_valid(response.access_token)


@pytest.mark.parametrize(
    ("expires_in", "jwt_lifetime", "low", "high", "source"),
    [
        (3600, 100, 98, 100, "jwt_exp"),  # the JWT exp is earlier: it wins
        (50, 1000, 50, 50, "expires_in"),  # expires_in is earlier: it wins
        (OMIT, 500, 498, 500, "jwt_exp"),  # no expires_in: the JWT exp
        (0, 1000, 77, 77, "jwt_exp"),  # zero: like missing, but at most default_lifetime
        (0, 30, 28, 30, "jwt_exp"),
    ],
)
async def test_jwt_access_token_exp_bounds_the_lifetime(
    session: aiohttp.ClientSession,
    expires_in: Any,
    jwt_lifetime: float,
    low: float,
    high: float,
    source: str,
) -> None:
    async with TokenServer(
        clients={CLIENT_ID: SECRET}, token_format="jwt", jwt_lifetime=jwt_lifetime
    ) as ts:
        ts.response_overrides["expires_in"] = expires_in
        response = await fetch(session, token_config(ts.url, default_lifetime=77.0))
    assert low <= response.expires_in <= high
    assert response.lifetime_source == source


async def test_an_already_expired_jwt_is_refused(session: aiohttp.ClientSession) -> None:
    async with TokenServer(clients={CLIENT_ID: SECRET}, token_format="jwt", jwt_lifetime=-60) as ts:
        with pytest.raises(InvalidTokenResponse, match="already expired"):
            await fetch(session, token_config(ts.url))


def _jwt(**claims: float) -> str:
    return jwt.encode({"sub": CLIENT_ID, **claims}, "k" * 32, algorithm="HS256")


@pytest.mark.parametrize("expires_in", [20, None], ids=["expires_in", "no_expires_in"])
@pytest.mark.parametrize("step", [0.0, 3600.0, -3600.0], ids=["none", "plus_1h", "minus_1h"])
def test_a_jwt_lifetime_does_not_depend_on_the_wall_clock(
    expires_in: int | None, step: float
) -> None:
    issued = int(time.time())
    token = _jwt(iat=issued, exp=issued + 20)
    lifetime, source = token_lifetime(
        expires_in, token, default_lifetime=77.0, now=time.time() + step
    )
    assert lifetime == 20
    assert source == ("expires_in" if expires_in else "jwt_exp")


def test_a_shorter_jwt_exp_minus_iat_bounds_expires_in() -> None:
    issued = int(time.time()) + 7200  # a clock far off makes no difference
    token = _jwt(iat=issued, exp=issued + 30)
    assert token_lifetime(3600, token, default_lifetime=77.0) == (30, "jwt_exp")


def test_a_jwt_with_only_exp_expired_by_the_wall_clock_gets_the_default_lifetime() -> None:
    # Nothing tells whether the token or the local clock is wrong: refusing it would retry
    # in a loop that a wrong clock never ends; the upstream's 401 replaces a bad token.
    token = _jwt(exp=int(time.time()) + 20)
    assert token_lifetime(None, token, default_lifetime=77.0, now=time.time() + 3600) == (
        77.0,
        "default",
    )
    assert token_lifetime(None, token, default_lifetime=77.0)[1] == "jwt_exp"


async def test_a_wall_clock_that_disagrees_with_iat_is_logged_once_per_change(
    session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="token_proxy")
    offset = [0.0]
    async with TokenServer(clients={CLIENT_ID: SECRET}, token_format="jwt", expires_in=60) as ts:
        config = token_config(ts.url)
        client = TokenClient(
            config, session, upstream="inventory", wall_clock=lambda: time.time() + offset[0]
        )

        def logged() -> list[tuple[int, bool]]:
            return [
                (r.levelno, r.__dict__["disagrees"])
                for r in caplog.records
                if getattr(r, "event", None) == "clock_disagreement"
            ]

        await client.fetch(ts.url)
        assert logged() == []
        offset[0] = 3600.0
        for _ in range(3):
            response = await client.fetch(ts.url)
            assert response.expires_in == 60
        assert logged() == [(logging.WARNING, True)]
        offset[0] = 0.0
        await client.fetch(ts.url)
        await client.fetch(ts.url)
        assert logged() == [(logging.WARNING, True), (logging.INFO, False)]
    assert SECRET not in caplog.text
    for token in ts.issued:
        assert token not in caplog.text


async def test_a_short_client_secret_is_warned_about_once_per_change(
    server: TokenServer,
    session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    caplog.set_level(logging.WARNING, logger="token_proxy")
    secret_file = tmp_path / "secret"
    secret_file.write_text("proxy\n")
    server.clients[CLIENT_ID] = "proxy"
    config = token_config(server.url, client_secret=None, client_secret_file=secret_file)
    client = TokenClient(config, session, upstream="inventory")

    def warnings() -> int:
        return sum(getattr(r, "event", None) == "short_client_secret" for r in caplog.records)

    await client.fetch(server.url)
    await client.fetch(server.url)
    assert warnings() == 1
    secret_file.write_text(SECRET + "\n")  # rotated to a proper one
    server.clients[CLIENT_ID] = SECRET
    await client.fetch(server.url)
    secret_file.write_text("proxy\n")
    server.clients[CLIENT_ID] = "proxy"
    await client.fetch(server.url)
    assert warnings() == 2
    assert "proxy" not in " ".join(r.getMessage() for r in caplog.records)


async def test_missing_token_type_is_bearer_with_a_warning(
    server: TokenServer, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    server.response_overrides["token_type"] = OMIT
    with caplog.at_level(logging.WARNING, logger="token_proxy"):
        response = await fetch(session, token_config(server.url))
    assert response.token_type == "Bearer"
    assert any("no token_type" in record.getMessage() for record in caplog.records)
    assert response.access_token not in caplog.text


async def test_token_type_is_case_insensitive(
    server: TokenServer, session: aiohttp.ClientSession
) -> None:
    server.response_overrides["token_type"] = "bearer"
    response = await fetch(session, token_config(server.url))
    assert server.is_valid(response.access_token)


async def test_unknown_fields_are_ignored(
    server: TokenServer, session: aiohttp.ClientSession
) -> None:
    server.response_overrides.update({"refresh_token": "rt-1", "id_token": None, "x": [1]})
    response = await fetch(session, token_config(server.url))
    assert server.is_valid(response.access_token)


# -- discovery -----------------------------------------------------------------------


async def test_discovery_reads_openid_configuration(
    server: TokenServer, session: aiohttp.ClientSession
) -> None:
    server.discovery = {"oidc"}
    url = await discover_token_endpoint(session, server.issuer, allow_insecure_http=False)
    assert url == server.url
    assert server.discovery_requests == ["/.well-known/openid-configuration"]


async def test_discovery_falls_back_to_rfc8414_with_the_path_after_the_well_known_part(
    session: aiohttp.ClientSession,
) -> None:
    async with TokenServer(issuer_path="/tenants/blue") as ts:
        ts.discovery = {"oauth"}
        url = await discover_token_endpoint(session, ts.issuer, allow_insecure_http=False)
    assert url == ts.url
    assert ts.discovery_requests == ["/.well-known/oauth-authorization-server/tenants/blue"]


async def test_discovery_refuses_metadata_of_another_issuer(
    server: TokenServer, session: aiohttp.ClientSession
) -> None:
    server.metadata_overrides["issuer"] = "https://evil.example"
    with pytest.raises(InvalidTokenResponse, match="not the configured issuer"):
        await discover_token_endpoint(session, server.issuer, allow_insecure_http=False)


async def test_discovery_refuses_a_plain_http_token_endpoint_elsewhere(
    server: TokenServer, session: aiohttp.ClientSession
) -> None:
    server.metadata_overrides["token_endpoint"] = "http://auth.example.com/token"
    with pytest.raises(InvalidTokenResponse, match="plain http"):
        await discover_token_endpoint(session, server.issuer, allow_insecure_http=False)
    url = await discover_token_endpoint(session, server.issuer, allow_insecure_http=True)
    assert url == "http://auth.example.com/token"


async def test_discovery_without_any_metadata_fails_as_4xx(
    server: TokenServer, session: aiohttp.ClientSession
) -> None:
    server.discovery = set()
    with pytest.raises(TokenEndpointClientError, match="404"):
        await discover_token_endpoint(session, server.issuer, allow_insecure_http=False)
    assert server.discovery_requests == []


async def test_discovery_classifies_server_errors(
    server: TokenServer, session: aiohttp.ClientSession
) -> None:
    server.discovery_failure = "503"
    with pytest.raises(TokenEndpointServerError) as caught:
        await discover_token_endpoint(session, server.issuer, allow_insecure_http=False)
    assert caught.value.retry_after == 1.0
