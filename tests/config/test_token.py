"""Tests for `proxy.config.token`: token endpoints, client authentication and parameters."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import load_config
from tests.config.documents import DELETE, ENV, TOKEN, Case, assert_problem, edited, write

JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"
ACCESS_TYPE = "urn:ietf:params:oauth:token-type:access_token"
REFRESH_TYPE = "urn:ietf:params:oauth:token-type:refresh_token"
NO_SECRET: dict[str, object] = {f"{TOKEN}.client_secret_file": DELETE}
# The smallest valid token exchange and JWT bearer edits of the base config.
EXCHANGE: dict[str, object] = {
    **NO_SECRET,
    f"{TOKEN}.grant": "token_exchange",
    f"{TOKEN}.subject_token_file": "FILES/assertion.jwt",
}
JWT_BEARER: dict[str, object] = {
    **NO_SECRET,
    f"{TOKEN}.grant": "jwt_bearer",
    f"{TOKEN}.assertion_file": "FILES/assertion.jwt",
}

CASES = [
    Case("missing-client-id", {f"{TOKEN}.client_id": DELETE}, f"{TOKEN}.client_id", "missing"),
    Case(
        "scope-as-mapping",
        {f"{TOKEN}.scope": {"a": 1}},
        f"{TOKEN}.scope",
        "expected a string or a list of strings, got a mapping",
    ),
    Case(
        "extra-param-nested",
        {f"{TOKEN}.extra_params": {"x": [1]}},
        f"{TOKEN}.extra_params.x",
        "expected a string, number or boolean, got a list",
    ),
    Case(
        "retry-max-below-initial",
        {f"{TOKEN}.retry_initial": "10s", f"{TOKEN}.retry_max": "5s"},
        f"{TOKEN}.retry_max",
        "must not be less than retry_initial",
    ),
    Case(
        "auth-method-typo",
        {f"{TOKEN}.auth_method": "client_secret_basci"},
        f"{TOKEN}.auth_method",
        "'client_secret_basci': must be one of client_secret_basic, client_secret_post, "
        "private_key_jwt, tls_client_auth, none (did you mean client_secret_basic?)",
    ),
    Case(
        "both-token-url-and-issuer",
        {f"{TOKEN}.issuer": "https://auth.example.com"},
        f"{TOKEN}.issuer",
        "set either token_url or issuer, not both",
    ),
    Case(
        "neither-token-url-nor-issuer",
        {f"{TOKEN}.token_url": DELETE},
        f"{TOKEN}.token_url",
        "missing (set token_url or issuer)",
    ),
    Case(
        "basic-without-secret",
        {f"{TOKEN}.client_secret_file": DELETE},
        f"{TOKEN}.client_secret",
        "missing (auth_method client_secret_basic needs client_secret or client_secret_file)",
    ),
    Case(
        "post-with-both-secrets",
        {
            f"{TOKEN}.auth_method": "client_secret_post",
            f"{TOKEN}.client_secret": "${CLIENT_SECRET}",
        },
        f"{TOKEN}.client_secret_file",
        "set either client_secret or client_secret_file, not both",
    ),
    Case(
        "basic-with-private-key",
        {
            f"{TOKEN}.auth_method": "client_secret_basic",
            f"{TOKEN}.private_key_file": "FILES/rsa.pem",
        },
        f"{TOKEN}.private_key_file",
        "not used with auth_method client_secret_basic",
    ),
    Case(
        "private-key-default-method-with-secret",
        {f"{TOKEN}.private_key_file": "FILES/rsa.pem"},
        f"{TOKEN}.client_secret_file",
        "not used with auth_method private_key_jwt",
    ),
    Case(
        "jwt-with-key-and-assertion",
        {
            f"{TOKEN}.client_secret_file": DELETE,
            f"{TOKEN}.private_key_file": "FILES/rsa.pem",
            f"{TOKEN}.client_assertion_file": "FILES/assertion.jwt",
        },
        f"{TOKEN}.client_assertion_file",
        "set either private_key_file or client_assertion_file, not both",
    ),
    Case(
        "jwt-without-key",
        {f"{TOKEN}.client_secret_file": DELETE, f"{TOKEN}.auth_method": "private_key_jwt"},
        f"{TOKEN}.private_key_file",
        "missing (auth_method private_key_jwt needs private_key_file or client_assertion_file)",
    ),
    Case(
        "key-id-with-assertion",
        {
            f"{TOKEN}.client_secret_file": DELETE,
            f"{TOKEN}.client_assertion_file": "FILES/assertion.jwt",
            f"{TOKEN}.key_id": "k1",
        },
        f"{TOKEN}.key_id",
        "only used with private_key_file",
    ),
    Case(
        "tls-client-auth-without-cert",
        {f"{TOKEN}.client_secret_file": DELETE, f"{TOKEN}.auth_method": "tls_client_auth"},
        f"{TOKEN}.client_cert_file",
        "missing (auth_method tls_client_auth needs it)",
    ),
    Case(
        "tls-client-auth-without-key",
        {
            f"{TOKEN}.client_secret_file": DELETE,
            f"{TOKEN}.auth_method": "tls_client_auth",
            f"{TOKEN}.client_cert_file": "FILES/client.crt",
        },
        f"{TOKEN}.client_key_file",
        "missing (auth_method tls_client_auth needs it)",
    ),
    Case(
        "tls-client-auth-with-secret",
        {
            f"{TOKEN}.auth_method": "tls_client_auth",
            f"{TOKEN}.client_cert_file": "FILES/client.crt",
            f"{TOKEN}.client_key_file": "FILES/client.key",
        },
        f"{TOKEN}.client_secret_file",
        "not used with auth_method tls_client_auth",
    ),
    Case(
        "extra-params-override-grant-type",
        {f"{TOKEN}.extra_params": {"grant_type": "password"}},
        f"{TOKEN}.extra_params.grant_type",
        "grant_type is set by the proxy and cannot be overridden",
    ),
    Case(
        "extra-params-override-assertion-type",
        {f"{TOKEN}.extra_params": {"client_assertion_type": "x"}},
        f"{TOKEN}.extra_params.client_assertion_type",
        "client_assertion_type is set by the proxy and cannot be overridden",
    ),
    Case(
        "extra-params-override-scope",
        {f"{TOKEN}.extra_params": {"scope": "x"}},
        f"{TOKEN}.extra_params.scope",
        "scope is set by the proxy and cannot be overridden",
    ),
    Case(
        "extra-params-duplicate-audience",
        {f"{TOKEN}.audience": "https://a.example", f"{TOKEN}.extra_params": {"audience": "b"}},
        f"{TOKEN}.extra_params.audience",
        "conflicts with token.audience",
    ),
    Case(
        "scope-with-quote",
        {f"{TOKEN}.scope": ['read"all']},
        f"{TOKEN}.scope",
        "scope 'read\"all' has characters RFC 6749 §3.3 does not allow",
    ),
    Case(
        "scope-list-item-not-string",
        {f"{TOKEN}.scope": ["read", 5]},
        f"{TOKEN}.scope[1]",
        "expected a string, got an integer",
    ),
    Case(
        "relative-resource",
        {f"{TOKEN}.resource": "inventory"},
        f"{TOKEN}.resource",
        "'inventory' must be an absolute URI without a fragment",
    ),
    Case(
        "cache-mode-unknown",
        {f"{TOKEN}.cache": "fleet"},
        f"{TOKEN}.cache",
        "'fleet': must be one of shared, local",
    ),
    Case(
        "cache-mode-typo",
        {f"{TOKEN}.cache": "locl"},
        f"{TOKEN}.cache",
        "'locl': must be one of shared, local (did you mean local?)",
    ),
    Case(
        "cache-mode-as-bool",
        {f"{TOKEN}.cache": False},
        f"{TOKEN}.cache",
        "expected a string, got a boolean",
    ),
    *(
        Case(f"grant-{case.id}", case.edits, case.key_path, case.problem)
        for case in (
            Case(
                "typo",
                {f"{TOKEN}.grant": "token-exchange"},
                f"{TOKEN}.grant",
                "'token-exchange': must be one of client_credentials, token_exchange, "
                "jwt_bearer (did you mean token_exchange?)",
            ),
            Case(
                "exchange-without-subject-token",
                {**NO_SECRET, f"{TOKEN}.grant": "token_exchange"},
                f"{TOKEN}.subject_token_file",
                "missing (grant token_exchange needs it)",
            ),
            Case(
                "exchange-subject-token-file-missing",
                {**EXCHANGE, f"{TOKEN}.subject_token_file": "FILES/no-such-token"},
                f"{TOKEN}.subject_token_file",
                "file 'FILES/no-such-token' does not exist",
            ),
            Case(
                "exchange-subject-token-file-empty",
                {**EXCHANGE, f"{TOKEN}.subject_token_file": "FILES/empty"},
                f"{TOKEN}.subject_token_file",
                "file is empty",
            ),
            Case(
                "exchange-actor-file-without-type",
                {**EXCHANGE, f"{TOKEN}.actor_token_file": "FILES/assertion.jwt"},
                f"{TOKEN}.actor_token_type",
                "missing (set both actor_token_file and it, or neither)",
            ),
            Case(
                "exchange-actor-type-without-file",
                {**EXCHANGE, f"{TOKEN}.actor_token_type": JWT_TYPE},
                f"{TOKEN}.actor_token_file",
                "missing (set both actor_token_type and it, or neither)",
            ),
            Case(
                "exchange-subject-token-type-not-a-uri",
                {**EXCHANGE, f"{TOKEN}.subject_token_type": "jwt"},
                f"{TOKEN}.subject_token_type",
                f"'jwt' is not a token type URI (e.g. {JWT_TYPE}, RFC 8693 §3)",
            ),
            Case(
                "exchange-requests-a-refresh-token",
                {**EXCHANGE, f"{TOKEN}.requested_token_type": REFRESH_TYPE},
                f"{TOKEN}.requested_token_type",
                f"'{REFRESH_TYPE}' cannot be sent as a bearer token: request "
                f"{ACCESS_TYPE} or {JWT_TYPE}",
            ),
            Case(
                "exchange-requested-type-not-a-string",
                {**EXCHANGE, f"{TOKEN}.requested_token_type": 3},
                f"{TOKEN}.requested_token_type",
                "expected a string, got an integer",
            ),
            Case(
                "exchange-with-assertion-file",
                {**EXCHANGE, f"{TOKEN}.assertion_file": "FILES/assertion.jwt"},
                f"{TOKEN}.assertion_file",
                "not used with grant token_exchange",
            ),
            Case(
                "exchange-none-with-secret",
                {
                    **EXCHANGE,
                    f"{TOKEN}.client_secret_file": "FILES/client-secret",
                    f"{TOKEN}.auth_method": "none",
                },
                f"{TOKEN}.client_secret_file",
                "not used with auth_method none",
            ),
            Case(
                "exchange-basic-without-client-id",
                {
                    **EXCHANGE,
                    f"{TOKEN}.client_secret_file": "FILES/client-secret",
                    f"{TOKEN}.client_id": DELETE,
                },
                f"{TOKEN}.client_id",
                "missing",
            ),
            Case(
                "exchange-overrides-subject-token",
                {**EXCHANGE, f"{TOKEN}.extra_params": {"subject_token": "x"}},
                f"{TOKEN}.extra_params.subject_token",
                "subject_token is set by the proxy and cannot be overridden",
            ),
            Case(
                "subject-token-with-client-credentials",
                {f"{TOKEN}.subject_token_file": "FILES/assertion.jwt"},
                f"{TOKEN}.subject_token_file",
                "not used with grant client_credentials",
            ),
            Case(
                "requested-type-with-client-credentials",
                {f"{TOKEN}.requested_token_type": ACCESS_TYPE},
                f"{TOKEN}.requested_token_type",
                "not used with grant client_credentials",
            ),
            Case(
                "none-with-client-credentials",
                {**NO_SECRET, f"{TOKEN}.auth_method": "none"},
                f"{TOKEN}.auth_method",
                "none is only allowed with grant token_exchange or jwt_bearer: the client "
                "credentials grant is the client's authentication",
            ),
            Case(
                "jwt-bearer-without-assertion",
                {**NO_SECRET, f"{TOKEN}.grant": "jwt_bearer"},
                f"{TOKEN}.assertion_file",
                "missing (grant jwt_bearer needs assertion_file or private_key_file)",
            ),
            Case(
                "jwt-bearer-with-assertion-and-key",
                {**JWT_BEARER, f"{TOKEN}.private_key_file": "FILES/rsa.pem"},
                f"{TOKEN}.assertion_file",
                "set either assertion_file or private_key_file, not both",
            ),
            Case(
                "jwt-bearer-with-private-key-jwt",
                {**JWT_BEARER, f"{TOKEN}.auth_method": "private_key_jwt"},
                f"{TOKEN}.auth_method",
                "private_key_jwt is not used with grant jwt_bearer: private_key_file signs "
                "the grant's assertion; authenticate the client with a secret, a certificate "
                "or none",
            ),
            Case(
                "jwt-bearer-with-client-assertion-file",
                {
                    **NO_SECRET,
                    f"{TOKEN}.grant": "jwt_bearer",
                    f"{TOKEN}.client_assertion_file": "FILES/assertion.jwt",
                },
                f"{TOKEN}.client_assertion_file",
                "not used with grant jwt_bearer (its assertion is assertion_file)",
            ),
            Case(
                "jwt-bearer-without-client-id",
                {**JWT_BEARER, f"{TOKEN}.client_id": DELETE},
                f"{TOKEN}.client_id",
                "missing",
            ),
            Case(
                "jwt-bearer-key-id-without-key",
                {**JWT_BEARER, f"{TOKEN}.key_id": "k1"},
                f"{TOKEN}.key_id",
                "only used with private_key_file",
            ),
            Case(
                "jwt-bearer-weak-key",
                {
                    **NO_SECRET,
                    f"{TOKEN}.grant": "jwt_bearer",
                    f"{TOKEN}.private_key_file": "FILES/rsa1024.pem",
                },
                f"{TOKEN}.private_key_file",
                "RSA key is 1024 bits; RS256 needs at least 2048",
            ),
            Case(
                "jwt-bearer-with-subject-token",
                {**JWT_BEARER, f"{TOKEN}.subject_token_file": "FILES/assertion.jwt"},
                f"{TOKEN}.subject_token_file",
                "not used with grant jwt_bearer",
            ),
            Case(
                "jwt-bearer-empty-assertion",
                {**JWT_BEARER, f"{TOKEN}.assertion_file": "FILES/empty"},
                f"{TOKEN}.assertion_file",
                "file is empty",
            ),
            Case(
                "jwt-bearer-overrides-assertion",
                {**JWT_BEARER, f"{TOKEN}.extra_params": {"assertion": "x"}},
                f"{TOKEN}.extra_params.assertion",
                "assertion is set by the proxy and cannot be overridden",
            ),
            Case(
                "assertion-file-with-client-credentials",
                {f"{TOKEN}.assertion_file": "FILES/assertion.jwt"},
                f"{TOKEN}.assertion_file",
                "not used with grant client_credentials",
            ),
        )
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_each_problem_names_file_key_path_and_problem(
    case: Case, tmp_path: Path, files: Path
) -> None:
    assert_problem(case, tmp_path, files)


@pytest.mark.parametrize(
    ("edits", "mode"),
    [
        ({}, "shared"),
        ({f"{TOKEN}.cache": "local"}, "local"),
        ({f"{TOKEN}.cache": "shared"}, "shared"),
    ],
    ids=["default", "local", "shared"],
)
def test_cache_mode(edits: dict[str, object], mode: str, tmp_path: Path, files: Path) -> None:
    config = load_config(write(tmp_path, edited(edits), files), environ=ENV)
    assert config.upstreams[0].token.cache == mode


def test_cache_local_needs_no_token_cache_section(tmp_path: Path, files: Path) -> None:
    """`cache: local` without `token_cache` changes nothing: the token is local anyway."""
    config = load_config(write(tmp_path, edited({f"{TOKEN}.cache": "local"}), files), environ=ENV)
    assert config.token_cache is None


def test_token_exchange_defaults(tmp_path: Path, files: Path) -> None:
    """No client credential: auth_method none, and the subject token is a JWT."""
    edits = {**EXCHANGE, f"{TOKEN}.client_id": DELETE}
    token = load_config(write(tmp_path, edited(edits), files), environ=ENV).upstreams[0].token
    assert (token.grant, token.auth_method, token.client_id) == ("token_exchange", "none", "")
    assert token.subject_token_file == files / "assertion.jwt"
    assert token.subject_token_type == JWT_TYPE
    assert (token.actor_token_file, token.actor_token_type) == (None, None)
    assert token.requested_token_type is None


def test_token_exchange_with_actor_and_client_secret(tmp_path: Path, files: Path) -> None:
    edits = {
        **EXCHANGE,
        f"{TOKEN}.client_secret_file": "FILES/client-secret",
        f"{TOKEN}.subject_token_type": ACCESS_TYPE,
        f"{TOKEN}.actor_token_file": "FILES/assertion.jwt",
        f"{TOKEN}.actor_token_type": JWT_TYPE,
        f"{TOKEN}.requested_token_type": ACCESS_TYPE,
        f"{TOKEN}.audience": "//iam.example.com/pools/k8s",
    }
    token = load_config(write(tmp_path, edited(edits), files), environ=ENV).upstreams[0].token
    assert (token.auth_method, token.client_id) == ("client_secret_basic", "order-service")
    assert (token.subject_token_type, token.actor_token_type) == (ACCESS_TYPE, JWT_TYPE)
    assert token.requested_token_type == ACCESS_TYPE


@pytest.mark.parametrize(
    ("edits", "auth_method"),
    [
        (JWT_BEARER, "none"),
        (
            {**JWT_BEARER, f"{TOKEN}.client_secret_file": "FILES/client-secret"},
            "client_secret_basic",
        ),
        (
            {
                **NO_SECRET,
                f"{TOKEN}.grant": "jwt_bearer",
                f"{TOKEN}.private_key_file": "FILES/ec.pem",
                f"{TOKEN}.key_id": "k1",
            },
            "none",
        ),
    ],
    ids=["assertion-file", "assertion-file-and-secret", "signed-with-key"],
)
def test_jwt_bearer_configs(
    edits: dict[str, object], auth_method: str, tmp_path: Path, files: Path
) -> None:
    token = load_config(write(tmp_path, edited(edits), files), environ=ENV).upstreams[0].token
    assert (token.grant, token.auth_method) == ("jwt_bearer", auth_method)
    assert (token.assertion_file is None) == (token.private_key_file is not None)


def test_client_credentials_is_the_default_grant(tmp_path: Path, files: Path) -> None:
    token = load_config(write(tmp_path, edited({}), files), environ=ENV).upstreams[0].token
    assert token.grant == "client_credentials"
