"""Tests for `proxy.config.scalars`: durations, sizes, hosts, addresses, booleans, integers."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config import parse_duration
from tests.config.documents import TOKEN, UP, Case, assert_problem

CASES = [
    Case(
        "bool-expected",
        {f"{UP}.overwrite": "yes"},
        f"{UP}.overwrite",
        "expected a boolean (true or false), got a string",
    ),
    Case(
        "int-expected",
        {"limits.max_headers": "many"},
        "limits.max_headers",
        "expected an integer, got a string",
    ),
    Case(
        "listen-as-int",
        {"listen": 8080},
        "listen",
        "expected a string, got an integer",
    ),
    Case(
        "null-timeout",
        {f"{UP}.timeout": None},
        f"{UP}.timeout",
        "expected a duration like 90s, 5m or 1h, got null",
    ),
    Case(
        "bad-duration-unit",
        {f"{TOKEN}.timeout": "5x"},
        f"{TOKEN}.timeout",
        "invalid duration '5x': use e.g. 250ms, 90s, 5m, 1h, 1h30m or seconds",
    ),
    Case(
        "bad-duration-spaces",
        {f"{TOKEN}.timeout": "1h 30m"},
        f"{TOKEN}.timeout",
        "invalid duration '1h 30m': use e.g. 250ms, 90s, 5m, 1h, 1h30m or seconds",
    ),
    Case(
        "negative-duration", {f"{UP}.timeout": -5}, f"{UP}.timeout", "duration must not be negative"
    ),
    Case("zero-duration", {f"{UP}.timeout": "0s"}, f"{UP}.timeout", "must be greater than 0"),
    Case(
        "infinite-duration",
        {f"{UP}.timeout": float("inf")},
        f"{UP}.timeout",
        "duration must be finite",
    ),
    Case(
        "bool-as-duration",
        {f"{TOKEN}.refresh_before_expiry": True},
        f"{TOKEN}.refresh_before_expiry",
        "expected a duration, got a boolean",
    ),
    Case(
        "bool-as-int",
        {"limits.max_connections": True},
        "limits.max_connections",
        "expected an integer, got a boolean",
    ),
    Case(
        "bool-as-size",
        {"limits.max_body_size": False},
        "limits.max_body_size",
        "expected a size in bytes, got a boolean",
    ),
    Case(
        "bool-as-port",
        {"connect_ports": [443, True]},
        "connect_ports[1]",
        "expected an integer, got a boolean",
    ),
    Case(
        "bad-size",
        {"limits.max_body_size": "10 parsecs"},
        "limits.max_body_size",
        "invalid size '10 parsecs': use e.g. 65536, 512KiB, 10MiB or 1GB",
    ),
    Case(
        "zero-size",
        {"limits.max_header_size": 0},
        "limits.max_header_size",
        "must be greater than 0",
    ),
    Case(
        "port-out-of-range",
        {"connect_ports": [70000]},
        "connect_ports[0]",
        "must be from 1 to 65535",
    ),
    Case(
        "listen-without-port",
        {"listen": "localhost"},
        "listen",
        "'localhost': missing the port (expected host:port or [v6]:port)",
    ),
    Case(
        "listen-port-out-of-range",
        {"admin_listen": "[::1]:70000"},
        "admin_listen",
        "'[::1]:70000': port must be a number from 0 to 65535 (expected host:port or [v6]:port)",
    ),
    *(
        Case(
            f"bad-host-{index}",
            {f"{UP}.match.hosts": ["ok.internal", host]},
            f"{UP}.match.hosts[1]",
            problem,
        )
        for index, (host, problem) in enumerate(
            [
                ("", "must not be empty"),
                (
                    "a b",
                    "must not contain whitespace or control characters "
                    "(expected host, host:port or [v6]:port)",
                ),
                ("a/b", "'a/b' contains '/' (expected host, host:port or [v6]:port)"),
                ("me@a", "'me@a' contains '@' (expected host, host:port or [v6]:port)"),
                ("a?b", "'a?b' contains '?' (expected host, host:port or [v6]:port)"),
                ("a#b", "'a#b' contains '#' (expected host, host:port or [v6]:port)"),
                (
                    "[fe80::1%eth0]:80",
                    "'[fe80::1%eth0]:80' contains '%' (expected host, host:port or [v6]:port)",
                ),
                (
                    "::1",
                    "'::1': write IPv6 literals in brackets, e.g. [::1]:8080 "
                    "(expected host, host:port or [v6]:port)",
                ),
                ("[::1", "'[::1': missing ']' (expected host, host:port or [v6]:port)"),
                (
                    "[zz]:80",
                    "'[zz]:80': not a valid IPv6 address in brackets "
                    "(expected host, host:port or [v6]:port)",
                ),
                (
                    "a:99999",
                    "'a:99999': port must be a number from 0 to 65535 "
                    "(expected host, host:port or [v6]:port)",
                ),
                (
                    "a:-1",
                    "'a:-1': port must be a number from 0 to 65535 "
                    "(expected host, host:port or [v6]:port)",
                ),
                ("a:0", "'a:0': port must be from 1 to 65535"),
                (
                    "-a.internal",
                    "'-a.internal' is not a valid hostname or IP address "
                    "(expected host, host:port or [v6]:port)",
                ),
                (
                    "a..internal",
                    "'a..internal' is not a valid hostname or IP address "
                    "(expected host, host:port or [v6]:port)",
                ),
                (
                    "*.internal",
                    "'*.internal' is not a valid hostname or IP address "
                    "(expected host, host:port or [v6]:port)",
                ),
                (
                    "münchen.de",
                    "host must be ASCII (use the xn-- form of international names) "
                    "(expected host, host:port or [v6]:port)",
                ),
                (
                    "10.0.0.999",
                    "'10.0.0.999' is not a valid IPv4 address "
                    "(expected host, host:port or [v6]:port)",
                ),
                (7, "expected a string, got an integer"),
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
    ("text", "seconds"),
    [
        ("90s", 90.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("250ms", 0.25),
        ("1h30m", 5400.0),
        ("1m30s500ms", 90.5),
        ("1.5h", 5400.0),
        ("45", 45.0),
        (" 2s ", 2.0),
        (7, 7.0),
        (0.5, 0.5),
        (0, 0.0),
    ],
)
def test_parse_duration(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "value", [True, False, None, "", "s", "-5s", "5 s", "1d", "5sec", "1h-30m", "nan", [5], -1]
)
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - messages are covered by the table above
        parse_duration(value)


@settings(max_examples=200, deadline=None)
@given(
    hours=st.integers(0, 1000),
    minutes=st.integers(0, 59),
    seconds=st.integers(0, 59),
    millis=st.integers(0, 999),
)
def test_parse_duration_round_trips(hours: int, minutes: int, seconds: int, millis: int) -> None:
    parts = [(hours, "h"), (minutes, "m"), (seconds, "s"), (millis, "ms")]
    text = "".join(f"{amount}{unit}" for amount, unit in parts if amount) or "0s"
    expected = hours * 3600 + minutes * 60 + seconds + millis / 1000
    assert parse_duration(text) == pytest.approx(expected, abs=1e-9)
    assert parse_duration(expected) == expected
    assert parse_duration(f"{expected}s") == pytest.approx(expected, abs=1e-9)
