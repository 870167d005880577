"""Tests for `proxy.config.upstream`: names, `match`, `url`/`listen` and injection settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.config.documents import DELETE, SECOND_UPSTREAM, UP, Case, assert_problem

CASES = [
    Case("missing-match", {f"{UP}.match": DELETE}, f"{UP}.match", "missing"),
    Case("missing-hosts", {f"{UP}.match.hosts": DELETE}, f"{UP}.match.hosts", "missing"),
    Case("missing-token", {f"{UP}.token": DELETE}, f"{UP}.token", "missing"),
    Case(
        "hosts-as-string",
        {f"{UP}.match.hosts": "inventory.internal"},
        f"{UP}.match.hosts",
        "expected a list of hosts, got a string (write [host] for one host)",
    ),
    Case(
        "hosts-empty",
        {f"{UP}.match.hosts": []},
        f"{UP}.match.hosts",
        "must list at least one host",
    ),
    Case(
        "upstreams-as-list",
        {"upstreams": ["inventory"]},
        "upstreams",
        "expected a mapping of upstream names to upstreams, got a list",
    ),
    Case(
        "prefix-without-slash",
        {f"{UP}.match.path_prefix": "api"},
        f"{UP}.match.path_prefix",
        "'api' must start with '/'",
    ),
    Case(
        "prefix-with-dotdot",
        {f"{UP}.match.path_prefix": "/api/../admin"},
        f"{UP}.match.path_prefix",
        "'/api/../admin' must not contain '.' or '..' segments",
    ),
    Case(
        "prefix-with-query",
        {f"{UP}.match.path_prefix": "/api?x=1"},
        f"{UP}.match.path_prefix",
        "'/api?x=1' must be a plain path without query or fragment",
    ),
    Case(
        "listen-without-url",
        {f"{UP}.listen": "127.0.0.1:18081"},
        f"{UP}.listen",
        "a reverse-proxy listen port needs url (where its requests are sent)",
    ),
    *(
        Case(f"header-{header}", {f"{UP}.header": header}, f"{UP}.header", problem)
        for header, problem in [
            ("Host", "Host is managed by the proxy and cannot carry the token"),
            ("content-length", "content-length is managed by the proxy and cannot carry the token"),
            (
                "Transfer-Encoding",
                "Transfer-Encoding is managed by the proxy and cannot carry the token",
            ),
            ("Connection", "Connection is managed by the proxy and cannot carry the token"),
            ("Upgrade", "Upgrade is managed by the proxy and cannot carry the token"),
            ("X Token", "'X Token' is not a valid HTTP header name"),
            ("X-Token:", "'X-Token:' is not a valid HTTP header name"),
        ]
    ),
    Case(
        "bad-upstream-name",
        {"upstreams.bad name!": SECOND_UPSTREAM},
        "upstreams.bad name!",
        "invalid upstream name: use letters, digits, '_', '.' and '-' only "
        "(it becomes a metric label)",
    ),
    Case(
        "reserved-upstream-name",
        {"upstreams.unmatched": SECOND_UPSTREAM},
        "upstreams.unmatched",
        "'unmatched' is reserved (the label of unmatched requests)",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_each_problem_names_file_key_path_and_problem(
    case: Case, tmp_path: Path, files: Path
) -> None:
    assert_problem(case, tmp_path, files)
