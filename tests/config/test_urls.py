"""Tests for `proxy.config.urls`: upstream URLs, token endpoints and the Redis URL."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import load_config
from tests.config.documents import DELETE, ENV, TOKEN, UP, Case, assert_problem, edited, write

REDIS_SCHEME = "'{url}': URL scheme must be redis, or rediss for TLS"
REDIS_PARTS = "'{url}': only scheme, host, port and a database number (/0) are used"
REDIS_CREDENTIALS = (
    "URL must not contain credentials (user:password@); use username and password_file"
)

CASES = [
    Case(
        "token-url-with-fragment",
        {f"{TOKEN}.token_url": "https://auth.example.com/token#x"},
        f"{TOKEN}.token_url",
        "'https://auth.example.com/token#x': URL must not have a fragment",
    ),
    Case(
        "token-url-with-credentials",
        {f"{TOKEN}.token_url": "https://me:pw@auth.example.com/token"},
        f"{TOKEN}.token_url",
        "URL must not contain credentials (user:password@)",
    ),
    Case(
        "token-url-ftp",
        {f"{TOKEN}.token_url": "ftp://auth.example.com/token"},
        f"{TOKEN}.token_url",
        "'ftp://auth.example.com/token': URL scheme must be http or https",
    ),
    Case(
        "url-with-path",
        {f"{UP}.url": "https://inventory.internal/v1"},
        f"{UP}.url",
        "'https://inventory.internal/v1': only scheme, host and port are used; "
        "remove the path/query",
    ),
    Case(
        "url-with-query",
        {f"{UP}.url": "https://inventory.internal/?a=b"},
        f"{UP}.url",
        "'https://inventory.internal/?a=b': only scheme, host and port are used; "
        "remove the path/query",
    ),
    Case(
        "url-with-userinfo",
        {f"{UP}.url": "https://u@inventory.internal"},
        f"{UP}.url",
        "URL must not contain credentials (user:password@)",
    ),
    Case(
        "url-without-host",
        {f"{UP}.url": "https:///x"},
        f"{UP}.url",
        "'https:///x': URL has no host",
    ),
    Case(
        "url-bad-port",
        {f"{UP}.url": "https://inventory.internal:99999"},
        f"{UP}.url",
        "invalid URL 'https://inventory.internal:99999': Port out of range 0-65535",
    ),
    Case(
        "insecure-token-url",
        {f"{TOKEN}.token_url": "http://auth.example.com/token"},
        f"{TOKEN}.token_url",
        "'http://auth.example.com/token' sends credentials in cleartext to a non-loopback "
        "host; use https, or set allow_insecure_http: true on the upstream",
    ),
    Case(
        "insecure-issuer",
        {f"{TOKEN}.token_url": DELETE, f"{TOKEN}.issuer": "http://10.0.0.1"},
        f"{TOKEN}.issuer",
        "'http://10.0.0.1' sends credentials in cleartext to a non-loopback host; use https, "
        "or set allow_insecure_http: true on the upstream",
    ),
    Case(
        "insecure-url",
        {f"{UP}.url": "http://inventory.internal"},
        f"{UP}.url",
        "'http://inventory.internal' sends credentials in cleartext to a non-loopback host; "
        "use https, or set allow_insecure_http: true on the upstream",
    ),
    Case(
        "localhost-lookalike-is-not-loopback",
        {f"{UP}.url": "http://localhost.example.com"},
        f"{UP}.url",
        "'http://localhost.example.com' sends credentials in cleartext to a non-loopback "
        "host; use https, or set allow_insecure_http: true on the upstream",
    ),
    *(
        Case(
            f"redis-url-{index}",
            {
                "token_cache": {
                    "redis": {"url": url},
                    "encryption_key_file": "FILES/cache-key",
                }
            },
            "token_cache.redis.url",
            problem.format(url=url),
        )
        for index, (url, problem) in enumerate(
            [
                ("http://redis.internal:6379", REDIS_SCHEME),
                ("unix:///run/redis.sock", REDIS_SCHEME),
                ("redis.internal:6379", REDIS_SCHEME),
                ("redis:///0", "'{url}': URL has no host"),
                ("redis://:pw@redis.internal:6379/0", REDIS_CREDENTIALS),
                ("redis://user@redis.internal", REDIS_CREDENTIALS),
                ("redis://redis.internal/cache", REDIS_PARTS),
                ("redis://redis.internal/0/1", REDIS_PARTS),
                ("redis://redis.internal/0?protocol=3", REDIS_PARTS),
                ("redis://redis.internal#x", REDIS_PARTS),
                ("redis://redis.internal:99999", "invalid URL '{url}': Port out of range 0-65535"),
                ("redis://redis.internal:0", "'{url}': port must be from 1 to 65535"),
                (
                    "redis://redis .internal",
                    "URL must not contain whitespace or control characters",
                ),
                (
                    "redis://a..internal",
                    "invalid URL host: 'a..internal' is not a valid hostname or IP address",
                ),
                ("", "must not be empty"),
                (6379, "expected a string, got an integer"),
            ]
        )
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_each_problem_names_file_key_path_and_problem(
    case: Case, tmp_path: Path, files: Path
) -> None:
    assert_problem(case, tmp_path, files)


@pytest.mark.parametrize(
    ("edits", "where"),
    [
        ({f"{UP}.allow_insecure_http": True, f"{TOKEN}.token_url": "http://auth.internal/t"}, "a"),
        ({f"{TOKEN}.token_url": "http://127.0.0.2:8080/token"}, "127/8"),
        ({f"{TOKEN}.token_url": "http://[::1]:8080/token"}, "::1"),
        ({f"{TOKEN}.token_url": "http://LOCALHOST:8080/token"}, "localhost"),
        ({f"{UP}.url": "http://127.0.0.1:8080"}, "url on loopback"),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_cleartext_http_allowed_on_loopback_or_by_opt_in(
    edits: dict[str, object], where: str, tmp_path: Path, files: Path
) -> None:
    config = load_config(write(tmp_path, edited(edits), files), environ=ENV)
    assert config.upstreams[0].name == "inventory", where


@pytest.mark.parametrize(
    "url",
    [
        "redis://redis.internal",
        "redis://redis.internal:6379/0",
        "rediss://redis.internal:6380/15",
        "redis://10.0.0.7/",
        "rediss://[fd00::7]:6379",
        "REDISS://Redis.Internal:6379/1",
    ],
)
def test_redis_urls_that_load(url: str, tmp_path: Path, files: Path) -> None:
    document = edited(
        {"token_cache": {"redis": {"url": url}, "encryption_key_file": "FILES/cache-key"}}
    )
    config = load_config(write(tmp_path, document, files), environ=ENV)
    assert config.token_cache is not None
    assert config.token_cache.redis.url == url


def test_a_rediss_url_in_capitals_takes_a_ca_file(tmp_path: Path, files: Path) -> None:
    redis = {"url": "REDISS://redis.internal", "ca_file": "FILES/redis-ca.pem"}
    document = edited({"token_cache": {"redis": redis, "encryption_key_file": "FILES/cache-key"}})
    config = load_config(write(tmp_path, document, files), environ=ENV)
    assert config.token_cache is not None
    assert config.token_cache.redis.ca_file == files / "redis-ca.pem"
