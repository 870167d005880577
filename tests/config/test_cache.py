"""Tests for `proxy.config.cache`: the `token_cache` section of the fleet token cache.

Redis is reached without a password in any URL, the encryption key file must hold at
least 32 bytes (a trailing newline does not count), and neither the key nor the Redis
password ever reaches a message or the config's repr.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from proxy.config import ConfigError, RedisConfig, TokenCacheConfig, load_config
from proxy.config.cache import encryption_key_material
from tests.config.documents import (
    CACHE_KEY,
    DELETE,
    ENV,
    SECRET,
    Case,
    assert_problem,
    base_config,
    write,
)

CACHE = "token_cache"
REDIS = "token_cache.redis"
GOOD_CACHE = {
    "redis": {"url": "redis://redis.internal:6379/0"},
    "encryption_key_file": "FILES/cache-key",
}


def cache(**changes: object) -> dict[str, object]:
    """`{"token_cache": ...}` edits: GOOD_CACHE with `changes` (`redis` merged, DELETE drops)."""
    section: dict[str, Any] = copy.deepcopy(GOOD_CACHE)
    for key, value in changes.items():
        if key == "redis" and isinstance(value, dict):
            section["redis"].update(value)
        else:
            section[key] = value
    section["redis"] = (
        {k: v for k, v in section["redis"].items() if v is not DELETE}
        if isinstance(section["redis"], dict)
        else section["redis"]
    )
    return {CACHE: {key: value for key, value in section.items() if value is not DELETE}}


CASES = [
    Case("cache-null", {CACHE: None}, CACHE, "expected a mapping, got null"),
    Case("cache-as-list", {CACHE: ["redis"]}, CACHE, "expected a mapping, got a list"),
    Case(
        "cache-unknown-key",
        cache(key_prefx="tp"),
        f"{CACHE}.key_prefx",
        "unknown key (did you mean key_prefix?)",
    ),
    Case("cache-without-redis", cache(redis=DELETE), REDIS, "missing"),
    Case(
        "redis-as-string",
        cache(redis="redis://r.internal"),
        REDIS,
        "expected a mapping, got a string",
    ),
    Case("redis-without-url", cache(redis={"url": DELETE}), f"{REDIS}.url", "missing"),
    Case(
        "redis-username-empty",
        cache(redis={"username": ""}),
        f"{REDIS}.username",
        "must not be empty",
    ),
    Case(
        "redis-password-file-missing",
        cache(redis={"password_file": "FILES/nope"}),
        f"{REDIS}.password_file",
        "file does not exist",
    ),
    Case(
        "redis-password-file-empty",
        cache(redis={"password_file": "FILES/empty"}),
        f"{REDIS}.password_file",
        "file is empty",
    ),
    Case(
        "redis-ca-file-missing",
        cache(redis={"url": "rediss://r.internal", "ca_file": "FILES/nope.pem"}),
        f"{REDIS}.ca_file",
        "file 'FILES/nope.pem' does not exist",
    ),
    Case(
        "redis-ca-file-without-tls",
        cache(redis={"ca_file": "FILES/redis-ca.pem"}),
        f"{REDIS}.ca_file",
        "only used with a rediss:// url (Redis over TLS)",
    ),
    Case(
        "encryption-key-file-missing-key",
        cache(encryption_key_file=DELETE),
        f"{CACHE}.encryption_key_file",
        "missing",
    ),
    Case(
        "encryption-key-file-does-not-exist",
        cache(encryption_key_file="FILES/nope"),
        f"{CACHE}.encryption_key_file",
        "file does not exist",
    ),
    Case(
        "encryption-key-file-is-dir",
        cache(encryption_key_file="FILES/subdir"),
        f"{CACHE}.encryption_key_file",
        "file is a directory",
    ),
    Case(
        "encryption-key-file-short",
        cache(encryption_key_file="FILES/short-key"),
        f"{CACHE}.encryption_key_file",
        "the key is shorter than 32 bytes (make one with: openssl rand -base64 32)",
    ),
    Case(
        "encryption-key-file-empty",
        cache(encryption_key_file="FILES/empty"),
        f"{CACHE}.encryption_key_file",
        "the key is shorter than 32 bytes (make one with: openssl rand -base64 32)",
    ),
    Case("key-prefix-empty", cache(key_prefix=""), f"{CACHE}.key_prefix", "must not be empty"),
    Case(
        "key-prefix-with-space",
        cache(key_prefix="token proxy"),
        f"{CACHE}.key_prefix",
        "must not contain whitespace or control characters",
    ),
    Case(
        "key-prefix-with-newline",
        cache(key_prefix="tp\n"),
        f"{CACHE}.key_prefix",
        "must not contain whitespace or control characters",
    ),
    Case(
        "key-prefix-as-int",
        cache(key_prefix=7),
        f"{CACHE}.key_prefix",
        "expected a string, got an integer",
    ),
    Case(
        "lock-timeout-zero",
        cache(lock_timeout="0s"),
        f"{CACHE}.lock_timeout",
        "must be greater than 0",
    ),
    Case(
        "lock-timeout-not-a-duration",
        cache(lock_timeout="soon"),
        f"{CACHE}.lock_timeout",
        "invalid duration 'soon': use e.g. 250ms, 90s, 5m, 1h, 1h30m or seconds",
    ),
    Case(
        "lock-timeout-negative",
        cache(lock_timeout=-1),
        f"{CACHE}.lock_timeout",
        "duration must not be negative",
    ),
]


@pytest.fixture(scope="module")
def key_files(files: Path) -> Path:
    """Encryption key files around the 32-byte minimum, beside the other files."""
    for name, data in {
        "short-key": b"k" * 31 + b"\n",
        "key-32": b"k" * 32,
        "key-32-crlf": b"k" * 32 + b"\r\n",
        "key-31-two-newlines": b"k" * 31 + b"\n\n",
        "key-31-crlf-lf": b"k" * 30 + b"\r\n\n",
    }.items():
        (files / name).write_bytes(data)
    return files


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_each_problem_names_file_key_path_and_problem(
    case: Case, tmp_path: Path, key_files: Path
) -> None:
    assert_problem(case, tmp_path, key_files)


CONTRACT_EXAMPLE = """
token_cache:                       # optional; absent = every process on its own
  redis:
    url: rediss://redis.token-proxy.svc:6379/0    # rediss:// for TLS
    username: token-proxy                          # optional
    password_file: FILES/redis-password            # optional
    ca_file: FILES/redis-ca.pem                    # optional, for rediss://
  encryption_key_file: FILES/cache-key             # required
  key_prefix: token-proxy                          # optional
  lock_timeout: 10s                                # optional
token_endpoint_concurrency: 4
upstreams:
  inventory:
    match: {hosts: [inventory.internal]}
    token:
      token_url: https://auth.example.com/oauth/token
      client_id: order-service
      client_secret_file: FILES/client-secret
  payments:
    match: {hosts: [payments.internal]}
    token:
      token_url: https://auth.example.com/oauth/token
      client_id: order-service
      client_secret_file: FILES/client-secret
      cache: local
"""


def test_the_contract_example_loads(tmp_path: Path, files: Path) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text(CONTRACT_EXAMPLE.replace("FILES/", f"{files}/"))
    config = load_config(path, environ={})
    assert config.token_cache == TokenCacheConfig(
        redis=RedisConfig(
            url="rediss://redis.token-proxy.svc:6379/0",
            username="token-proxy",
            password_file=files / "redis-password",
            ca_file=files / "redis-ca.pem",
        ),
        encryption_key_file=files / "cache-key",
        key_prefix="token-proxy",
        lock_timeout=10.0,
    )
    assert config.token_endpoint_concurrency == 4
    assert [upstream.token.cache for upstream in config.upstreams] == ["shared", "local"]


def test_defaults_relative_paths_and_variables(
    tmp_path: Path, files: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "cache-key").write_bytes(CACHE_KEY)
    monkeypatch.setenv("REDIS_HOST", "valkey.internal")
    document = {
        "token_cache": {
            "redis": {"url": "redis://${REDIS_HOST}"},
            "encryption_key_file": "secrets/cache-key",
        }
    }
    config = load_config(write(tmp_path, document, files))
    assert config.token_cache == TokenCacheConfig(
        redis=RedisConfig(url="redis://valkey.internal"),
        encryption_key_file=tmp_path / "secrets" / "cache-key",
    )
    assert (config.token_cache.key_prefix, config.token_cache.lock_timeout) == ("token-proxy", 10.0)
    assert load_config(write(tmp_path, base_config(), files)).token_cache is None


@pytest.mark.parametrize("name", ["key-32", "key-32-crlf", "key-31-two-newlines", "cache-key"])
def test_a_key_of_32_bytes_after_one_trailing_newline_is_enough(
    name: str, tmp_path: Path, key_files: Path
) -> None:
    config = load_config(write(tmp_path, cache(encryption_key_file=f"FILES/{name}"), key_files))
    assert config.token_cache is not None
    assert config.token_cache.encryption_key_file == key_files / name


def test_only_one_trailing_newline_is_stripped(tmp_path: Path, key_files: Path) -> None:
    # 30 bytes, "\r\n", "\n": one newline off leaves 32 bytes, of which "\r\n" is content.
    config = load_config(
        write(tmp_path, cache(encryption_key_file="FILES/key-31-crlf-lf"), key_files)
    )
    assert config.token_cache is not None
    assert encryption_key_material(b"k" * 30 + b"\r\n\n") == b"k" * 30 + b"\r\n"


@pytest.mark.parametrize(
    ("data", "material"),
    [
        (b"k" * 32 + b"\n", b"k" * 32),
        (b"k" * 32 + b"\r\n", b"k" * 32),
        (b"k" * 32, b"k" * 32),
        (b"k" * 32 + b"\n\n", b"k" * 32 + b"\n"),
        (b" k \n", b" k "),
        (b"", b""),
    ],
    ids=["newline", "crlf", "none", "two-newlines", "spaces-kept", "empty"],
)
def test_encryption_key_material(data: bytes, material: bytes) -> None:
    assert encryption_key_material(data) == material


def test_cache_secrets_never_reach_a_message_or_the_config(tmp_path: Path, files: Path) -> None:
    document = cache(redis={"password_file": "FILES/redis-password", "username": "tp"})
    config = load_config(write(tmp_path, document, files), environ=ENV)
    password = (files / "redis-password").read_text().strip()
    for text in (repr(config), str(config)):
        assert password not in text
        assert CACHE_KEY.decode().strip() not in text
    # A secret written where a file name belongs is not echoed.
    for edits in (
        cache(redis={"password_file": SECRET}),
        cache(encryption_key_file=SECRET),
        cache(redis={"url": f"redis://:{SECRET}@redis.internal:6379"}),
        cache(redis={"url": f"redis://user:{SECRET}@redis.internal:99999"}),
    ):
        with pytest.raises(ConfigError) as caught:
            load_config(write(tmp_path, edits, files), environ=ENV)
        assert SECRET not in str(caught.value)
