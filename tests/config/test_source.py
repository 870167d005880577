"""Tests for `proxy.config.source`: the document, `${VAR}`, files, keys, and secrets unsaid.

Every refusal is checked for the exact file, key path and problem, because that one
line is all an operator sees when the sidecar will not start. Secrets must never be
in a message.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from proxy.config import (
    ConfigError,
    MatchConfig,
    ProxyConfig,
    RedisConfig,
    TlsClientConfig,
    TokenConfig,
    UpstreamConfig,
    load_config,
)
from proxy.config.source import yaml_keys
from proxy.config.tls import TLS_KEYS
from proxy.config.token import TOKEN_KEYS
from proxy.config.upstream import UPSTREAM_KEYS
from tests.config.documents import (
    DELETE,
    ENV,
    SECRET,
    TOKEN,
    UP,
    Case,
    assert_problem,
    base_config,
    edited,
    write,
)

MODELS = (TlsClientConfig, TokenConfig, UpstreamConfig, ProxyConfig)

CASES = [
    Case(
        "unknown-top-key", {"lissen": "127.0.0.1:1"}, "lissen", "unknown key (did you mean listen?)"
    ),
    Case(
        "unknown-token-key",
        {f"{TOKEN}.tokn_url": "https://x.example"},
        f"{TOKEN}.tokn_url",
        "unknown key (did you mean token_url?)",
    ),
    Case(
        "unknown-match-key-no-suggestion",
        {f"{UP}.match.zzz": 1},
        f"{UP}.match.zzz",
        "unknown key (expected one of: hosts, path_prefix, methods)",
    ),
    Case(
        "unknown-limits-key",
        {"limits.max_body": 10},
        "limits.max_body",
        "unknown key (did you mean max_body_size?)",
    ),
    Case(
        "mapping-expected", {f"{UP}.match": ["a"]}, f"{UP}.match", "expected a mapping, got a list"
    ),
    Case(
        "string-expected",
        {f"{TOKEN}.client_id": 123},
        f"{TOKEN}.client_id",
        "expected a string, got an integer",
    ),
    Case("empty-client-id", {f"{TOKEN}.client_id": " "}, f"{TOKEN}.client_id", "must not be empty"),
    Case(
        "unset-var",
        {f"{TOKEN}.client_id": "${NOPE}"},
        f"{TOKEN}.client_id",
        "environment variable NOPE is not set",
    ),
    Case(
        "unset-var-in-list",
        {f"{UP}.match.hosts": ["a.internal", "${HOST_B}"]},
        f"{UP}.match.hosts[1]",
        "environment variable HOST_B is not set",
    ),
    Case(
        "unset-var-in-secret",
        {f"{TOKEN}.client_secret_file": DELETE, f"{TOKEN}.client_secret": "${OTHER_SECRET}"},
        f"{TOKEN}.client_secret",
        "environment variable OTHER_SECRET is not set",
    ),
    Case(
        "malformed-var",
        {f"{TOKEN}.client_id": "${1X}"},
        f"{TOKEN}.client_id",
        "malformed ${...}: expected ${NAME} (write $${ for a literal ${)",
    ),
    Case(
        "var-expands-to-empty",
        {f"{TOKEN}.client_id": "${EMPTY}"},
        f"{TOKEN}.client_id",
        "must not be empty",
    ),
    Case(
        "missing-secret-file",
        {f"{TOKEN}.client_secret_file": "FILES/nope"},
        f"{TOKEN}.client_secret_file",
        "file does not exist",
    ),
    Case(
        "secret-file-is-dir",
        {f"{TOKEN}.client_secret_file": "FILES/subdir"},
        f"{TOKEN}.client_secret_file",
        "file is a directory",
    ),
    Case(
        "empty-secret-file",
        {f"{TOKEN}.client_secret_file": "FILES/empty"},
        f"{TOKEN}.client_secret_file",
        "file is empty",
    ),
    Case(
        "missing-ca-file-named",
        {f"{UP}.ca_file": "FILES/nope.pem"},
        f"{UP}.ca_file",
        "file 'FILES/nope.pem' does not exist",
    ),
    Case(
        "missing-assertion-file",
        {
            f"{TOKEN}.client_secret_file": DELETE,
            f"{TOKEN}.client_assertion_file": "FILES/nope.jwt",
        },
        f"{TOKEN}.client_assertion_file",
        "file does not exist",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_each_problem_names_file_key_path_and_problem(
    case: Case, tmp_path: Path, files: Path
) -> None:
    assert_problem(case, tmp_path, files)


RAW_CASES = [
    (
        "syntax-error",
        "listen: 127.0.0.1:1\nupstreams: [a, b\nlog_level: info\n",
        "invalid YAML at line 3, column 10: expected ',' or ']', but got ':'",
    ),
    (
        "tab-indentation",
        "limits:\n\tmax_headers: 5\n",
        "invalid YAML at line 2, column 1: found character '\\t' that cannot start any token",
    ),
    (
        "duplicate-key",
        "log_level: info\nlog_level: debug\n",
        "invalid YAML at line 2, column 1: duplicate key 'log_level'",
    ),
    ("list-document", "- listen\n- admin_listen\n", None),
    ("scalar-document", "hello\n", None),
    ("empty-document", "", None),
    (
        "bad-date",
        "log_level: 2024-13-45\n",
        "invalid YAML: a value could not be read (an invalid date or !!tag?)",
    ),
    (
        "python-tag",
        "listen: !!python/object/apply:os.system [echo]\n",
        "invalid YAML at line 1, column 9: could not determine a constructor for the tag "
        "'tag:yaml.org,2002:python/object/apply:os.system'",
    ),
    (
        "nul-byte",
        "listen: \x00\n",
        "invalid YAML at position 8: special characters are not allowed",
    ),
]

NON_MAPPING = {
    "list-document": "expected a mapping of settings at the top level, got a list",
    "scalar-document": "expected a mapping of settings at the top level, got a string",
    "empty-document": "expected a mapping of settings at the top level, got an empty document",
}


@pytest.mark.parametrize(
    ("text", "problem"), [c[1:] for c in RAW_CASES], ids=[c[0] for c in RAW_CASES]
)
def test_unparseable_documents(text: str, problem: str | None, tmp_path: Path) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text(text, encoding="utf-8")
    case_id = next(case[0] for case in RAW_CASES if case[1] == text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.file == str(path)
    assert caught.value.key_path == ""
    assert caught.value.problem == (problem or NON_MAPPING[case_id])
    assert str(caught.value) == f"{path}: {caught.value.problem}"


def test_missing_and_unreadable_config_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as missing:
        load_config(tmp_path / "nope.yaml")
    assert str(missing.value) == (
        f"{tmp_path}/nope.yaml: cannot read the config file: No such file or directory"
    )
    with pytest.raises(ConfigError) as directory:
        load_config(tmp_path)
    assert str(directory.value) == f"{tmp_path}: cannot read the config file: Is a directory"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read a file without permissions")
def test_unreadable_secret_file(tmp_path: Path, files: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s")
    secret.chmod(0)
    path = write(tmp_path, edited({f"{TOKEN}.client_secret_file": str(secret)}), files)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert (caught.value.key_path, caught.value.problem) == (
        f"{TOKEN}.client_secret_file",
        "cannot read file: Permission denied",
    )


def test_environment_comes_from_os_environ_by_default(
    tmp_path: Path, files: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ORDER_CLIENT_FROM_ENV", "from-env")
    path = write(tmp_path, edited({f"{TOKEN}.client_id": "${ORDER_CLIENT_FROM_ENV}"}), files)
    assert load_config(path).upstreams[0].token.client_id == "from-env"


def test_secret_file_contents_are_not_stored(tmp_path: Path, files: Path) -> None:
    config = load_config(write(tmp_path, base_config(), files), environ=ENV)
    assert SECRET not in repr(config)
    assert config.upstreams[0].token.client_secret is None


SECRET_LEAK_CASES = {
    "secret-as-secret-file-path": {f"{TOKEN}.client_secret_file": SECRET},
    "secret-as-key-file-path": {
        f"{TOKEN}.client_secret_file": DELETE,
        f"{TOKEN}.private_key_file": SECRET,
    },
    "secret-as-assertion-file-path": {
        f"{TOKEN}.client_secret_file": DELETE,
        f"{TOKEN}.client_assertion_file": SECRET,
    },
    "secret-as-client-key-file-path": {f"{UP}.client_key_file": SECRET},
    "secret-as-ca-key-file": {
        "tls_intercept": {"ca_cert_file": "FILES/ca.crt", "ca_key_file": SECRET}
    },
    "secret-in-key-file-content": {
        f"{TOKEN}.client_secret_file": DELETE,
        f"{TOKEN}.private_key_file": "FILES/secret-not-a-key.pem",
    },
    "secret-with-secret-file": {f"{TOKEN}.client_secret": "${CLIENT_SECRET}"},
    "secret-as-list": {f"{TOKEN}.client_secret_file": DELETE, f"{TOKEN}.client_secret": [SECRET]},
    "secret-with-tls-client-auth": {
        f"{TOKEN}.client_secret_file": DELETE,
        f"{TOKEN}.client_secret": SECRET,
        f"{TOKEN}.auth_method": "tls_client_auth",
    },
    "secret-as-key-id": {f"{TOKEN}.key_id": SECRET},
    "secret-in-extra-param": {f"{TOKEN}.extra_params": {"client_secret": SECRET}},
    "secret-in-extra-param-list": {f"{TOKEN}.extra_params": {"x": [SECRET]}},
}


@pytest.mark.parametrize("edits", SECRET_LEAK_CASES.values(), ids=SECRET_LEAK_CASES.keys())
def test_errors_never_show_a_secret(edits: dict[str, object], tmp_path: Path, files: Path) -> None:
    path = write(tmp_path, edited(edits), files)
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ=ENV)
    assert caught.value.file == str(path)
    assert SECRET not in str(caught.value)


@pytest.mark.parametrize(
    "line",
    [
        f'client_secret: "{SECRET}',
        f"client_secret: {SECRET}: x",
        f"client_secret: {SECRET}\n      client_secret: {SECRET}",
        f"client_secret: [{SECRET}",
    ],
    ids=["unterminated", "colon", "duplicate", "flow"],
)
def test_yaml_errors_never_show_a_secret(line: str, tmp_path: Path) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text(f"upstreams:\n  a:\n    token:\n      {line}\n      client_id: x\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problem.startswith("invalid YAML")
    assert SECRET not in str(caught.value)


def test_section_keys_come_from_the_dataclasses() -> None:
    """Every YAML key is a field (or one of the TLS fields an upstream or token is flat in)."""
    fields = {model: {field.name for field in dataclasses.fields(model)} for model in MODELS}
    assert set(TLS_KEYS) == fields[TlsClientConfig]
    assert set(TOKEN_KEYS) == fields[TokenConfig] - {"tls"} | set(TLS_KEYS)
    assert set(UPSTREAM_KEYS) == fields[UpstreamConfig] - {"name", "tls"} | set(TLS_KEYS)
    assert set(yaml_keys(ProxyConfig, skip={"source"})) == fields[ProxyConfig] - {"source"}
    # In the fields' order, with an expansion in the place of its field.
    assert yaml_keys(MatchConfig) == ("hosts", "path_prefix", "methods")
    assert yaml_keys(RedisConfig) == ("url", "username", "password_file", "ca_file")
    assert yaml_keys(TokenConfig, expand={"tls": ("x", "y")})[-4:] == ("x", "y", "cache", "dpop")


def test_an_unknown_key_lists_the_section_s_keys(tmp_path: Path, files: Path) -> None:
    document = edited({"token_cache": {"redis": {"url": "redis://r.internal", "zzz": 1}}})
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, document, files), environ=ENV)
    assert (caught.value.key_path, caught.value.problem) == (
        "token_cache.redis.zzz",
        "unknown key (expected one of: url, username, password_file, ca_file)",
    )
