"""Tests for `proxy.config.upstream`: names, `match`, `url`/`listen` and injection settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import load_config
from tests.config.documents import (
    DELETE,
    ENV,
    SECOND_UPSTREAM,
    UP,
    Case,
    assert_problem,
    edited,
    write,
)

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
        "purge-on-a-success-status",
        {f"{UP}.purge_on_status": [401, 200]},
        f"{UP}.purge_on_status[1]",
        "must be from 400 to 599",
    ),
    Case(
        "purge-on-status-not-a-list",
        {f"{UP}.purge_on_status": 403},
        f"{UP}.purge_on_status",
        "expected a list of HTTP status codes, got an integer (write [401] for one status)",
    ),
    Case(
        "purge-on-status-empty",
        {f"{UP}.purge_on_status": []},
        f"{UP}.purge_on_status",
        "must list at least one status (the default is [401])",
    ),
    Case(
        "purge-on-status-not-an-integer",
        {f"{UP}.purge_on_status": ["403"]},
        f"{UP}.purge_on_status[0]",
        "expected an integer, got a string",
    ),
    Case(
        "purge-on-status-twice",
        {f"{UP}.purge_on_status": [401, 403, 401]},
        f"{UP}.purge_on_status[2]",
        "401 is listed twice",
    ),
    Case(
        "method-not-a-token",
        {f"{UP}.match.methods": ["GET", "GET /"]},
        f"{UP}.match.methods[1]",
        "'GET /' is not an HTTP method",
    ),
    Case(
        "methods-empty",
        {f"{UP}.match.methods": []},
        f"{UP}.match.methods",
        "must list at least one method (leave it out for every method)",
    ),
    Case(
        "methods-not-a-list",
        {f"{UP}.match.methods": "GET"},
        f"{UP}.match.methods",
        "expected a list of HTTP methods, got a string (write [GET] for one method)",
    ),
    Case(
        "method-twice",
        {f"{UP}.match.methods": ["GET", "get"]},
        f"{UP}.match.methods[1]",
        "GET is listed twice",
    ),
    Case(
        "method-connect",
        {f"{UP}.match.methods": ["CONNECT"]},
        f"{UP}.match.methods[0]",
        "CONNECT is not routed by method (a tunnel names only a host)",
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
    Case(
        "http2-unknown-mode",
        {f"{UP}.http2": "on"},
        f"{UP}.http2",
        "'on': must be one of auto, off, required",
    ),
    Case(
        # What YAML makes of an unquoted `on`: no mode of that name.
        "http2-true",
        {f"{UP}.http2": True},
        f"{UP}.http2",
        "expected a string, got a boolean",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_each_problem_names_file_key_path_and_problem(
    case: Case, tmp_path: Path, files: Path
) -> None:
    assert_problem(case, tmp_path, files)


def test_methods_are_upper_cased_and_purge_statuses_kept(tmp_path: Path, files: Path) -> None:
    document = edited({f"{UP}.match.methods": ["get", "Head"], f"{UP}.purge_on_status": [401, 403]})
    (upstream,) = load_config(write(tmp_path, document, files), environ=ENV).upstreams
    assert upstream.match.methods == ("GET", "HEAD")
    assert upstream.purge_on_status == (401, 403)


def test_defaults_are_every_method_and_a_purge_on_401(tmp_path: Path, files: Path) -> None:
    (upstream,) = load_config(write(tmp_path, edited({}), files), environ=ENV).upstreams
    assert upstream.match.methods == ()
    assert upstream.purge_on_status == (401,)


def test_an_unquoted_off_is_off(tmp_path: Path, files: Path) -> None:
    path = write(tmp_path, edited({}), files)
    text = path.read_text()
    assert "    match:" in text
    path.write_text(text.replace("    match:", "    http2: off\n    match:", 1))
    assert load_config(path, environ=ENV).upstreams[0].http2 == "off"


def test_http2_is_auto_unless_set(tmp_path: Path, files: Path) -> None:
    (upstream,) = load_config(write(tmp_path, edited({}), files), environ=ENV).upstreams
    assert upstream.http2 == "auto"


@pytest.mark.parametrize("mode", ["auto", "off", "required"])
def test_http2_takes_each_mode(mode: str, tmp_path: Path, files: Path) -> None:
    document = edited({f"{UP}.http2": mode})
    (upstream,) = load_config(write(tmp_path, document, files), environ=ENV).upstreams
    assert upstream.http2 == mode
