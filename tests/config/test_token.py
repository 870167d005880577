"""Tests for `proxy.config.token`: token endpoints, client authentication and parameters."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import load_config
from tests.config.documents import DELETE, ENV, TOKEN, Case, assert_problem, edited, write

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
        "private_key_jwt, tls_client_auth (did you mean client_secret_basic?)",
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
