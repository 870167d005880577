"""Tests for `proxy.config.checks`: overlapping host matches and competing listeners."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from proxy.config import load_config
from tests.config.documents import ENV, UP, Case, assert_problem, edited, second, write

CASES = [
    Case(
        "same-host-twice-in-one-upstream",
        {f"{UP}.match.hosts": ["inventory.internal", "Inventory.Internal."]},
        f"{UP}.match.hosts[1]",
        "inventory.internal is listed twice",
    ),
    Case(
        "default-port-overlaps-443-in-one-upstream",
        {f"{UP}.match.hosts": ["inventory.internal", "inventory.internal:443"]},
        f"{UP}.match.hosts[1]",
        "inventory.internal:443 overlaps inventory.internal (hosts[0]): a host without a "
        "port matches ports 80 and 443",
    ),
    Case(
        "same-host-in-two-upstreams",
        {"upstreams.billing": second(match={"hosts": ["inventory.internal"]})},
        "upstreams.billing.match.hosts[0]",
        "inventory.internal of upstream billing overlaps inventory.internal of upstream "
        "inventory: a request would match both",
    ),
    Case(
        "default-port-overlaps-80-across-upstreams",
        {"upstreams.billing": second(match={"hosts": ["x.internal", "inventory.internal:80"]})},
        "upstreams.billing.match.hosts[1]",
        "inventory.internal:80 of upstream billing overlaps inventory.internal of upstream "
        "inventory: a request would match both",
    ),
    Case(
        "ipv6-spellings-overlap",
        {
            f"{UP}.match.hosts": ["[::1]:8080"],
            "upstreams.billing": second(match={"hosts": ["[0:0::1]:8080"]}),
        },
        "upstreams.billing.match.hosts[0]",
        "[::1]:8080 of upstream billing overlaps [::1]:8080 of upstream inventory: "
        "a request would match both",
    ),
    Case(
        "identical-path-prefixes",
        {
            f"{UP}.match.path_prefix": "/api",
            "upstreams.billing": second(
                match={"hosts": ["inventory.internal"], "path_prefix": "/api/"}
            ),
        },
        "upstreams.billing.match.hosts[0]",
        "inventory.internal of upstream billing overlaps inventory.internal of upstream "
        "inventory, path prefix /api: a request would match both",
    ),
    Case(
        "identical-prefixes-with-shared-methods",
        {
            f"{UP}.match.path_prefix": "/api",
            f"{UP}.match.methods": ["GET", "HEAD"],
            "upstreams.billing": second(
                match={
                    "hosts": ["inventory.internal"],
                    "path_prefix": "/api",
                    "methods": ["post", "head"],
                }
            ),
        },
        "upstreams.billing.match.hosts[0]",
        "inventory.internal of upstream billing overlaps inventory.internal of upstream "
        "inventory, path prefix /api, methods HEAD: a request would match both",
    ),
    Case(
        "methods-beside-every-method",
        {
            "upstreams.billing": second(
                match={"hosts": ["inventory.internal"], "methods": ["DELETE"]}
            ),
        },
        "upstreams.billing.match.hosts[0]",
        "inventory.internal of upstream billing overlaps inventory.internal of upstream "
        "inventory, methods DELETE: a request would match both",
    ),
    Case(
        "admin-conflicts-with-listen",
        {"listen": "0.0.0.0:9000", "admin_listen": "127.0.0.1:9000"},
        "admin_listen",
        "127.0.0.1:9000 conflicts with listen 0.0.0.0:9000",
    ),
    Case(
        "upstream-listen-equals-listen",
        {f"{UP}.url": "https://inventory.internal", f"{UP}.listen": "127.0.0.1:15080"},
        f"{UP}.listen",
        "127.0.0.1:15080 conflicts with listen 127.0.0.1:15080",
    ),
    Case(
        "upstream-listen-vs-wildcard-admin",
        {f"{UP}.url": "https://inventory.internal", f"{UP}.listen": "127.0.0.1:15090"},
        f"{UP}.listen",
        "127.0.0.1:15090 conflicts with admin_listen 0.0.0.0:15090",
    ),
    Case(
        "two-upstream-listens",
        {
            f"{UP}.url": "https://inventory.internal",
            f"{UP}.listen": "[::]:18081",
            "upstreams.billing": second(url="https://billing.internal", listen="[::1]:18081"),
        },
        "upstreams.billing.listen",
        "[::1]:18081 conflicts with upstreams.inventory.listen [::]:18081",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_each_problem_names_file_key_path_and_problem(
    case: Case, tmp_path: Path, files: Path
) -> None:
    assert_problem(case, tmp_path, files)


@pytest.mark.parametrize(
    ("first", "second_match"),
    [
        ({"hosts": ["inventory.internal:8443"]}, {"hosts": ["inventory.internal"]}),
        ({"hosts": ["inventory.internal:80"]}, {"hosts": ["inventory.internal:443"]}),
        (
            {"hosts": ["inventory.internal"], "path_prefix": "/api"},
            {"hosts": ["inventory.internal"], "path_prefix": "/apiary"},
        ),
        (
            {"hosts": ["inventory.internal"], "path_prefix": "/api/v1"},
            {"hosts": ["inventory.internal"], "path_prefix": "/api/v2"},
        ),
        ({"hosts": ["inventory.internal"]}, {"hosts": ["inventory.internal.example"]}),
        (
            {"hosts": ["inventory.internal"], "path_prefix": "/api"},
            {"hosts": ["inventory.internal"], "path_prefix": "/api/admin"},
        ),
        ({"hosts": ["inventory.internal"]}, {"hosts": ["inventory.internal"], "path_prefix": "/b"}),
        (
            {"hosts": ["inventory.internal"], "path_prefix": "/api"},
            {"hosts": ["inventory.internal:443"], "path_prefix": "/api/admin"},
        ),
        (
            {"hosts": ["inventory.internal"], "methods": ["GET", "HEAD"]},
            {"hosts": ["inventory.internal"], "methods": ["POST", "PUT", "PATCH", "DELETE"]},
        ),
    ],
    ids=[
        "other-port",
        "80-vs-443",
        "prefix-not-on-segment",
        "sibling-prefixes",
        "other-host",
        "nested-prefixes",
        "prefix-below-no-prefix",
        "nested-prefixes-across-default-port",
        "disjoint-methods",
    ],
)
def test_matches_that_do_not_overlap_are_accepted(
    first: dict[str, Any], second_match: dict[str, Any], tmp_path: Path, files: Path
) -> None:
    document = edited({f"{UP}.match": first, "upstreams.billing": second(match=second_match)})
    config = load_config(write(tmp_path, document, files), environ=ENV)
    assert [upstream.name for upstream in config.upstreams] == ["inventory", "billing"]


@pytest.mark.parametrize(
    ("first", "second_listen"),
    [("127.0.0.1:18081", "127.0.0.2:18081"), ("127.0.0.1:0", "127.0.0.1:0")],
    ids=["different-hosts", "ephemeral-ports"],
)
def test_listen_ports_that_do_not_conflict(
    first: str, second_listen: str, tmp_path: Path, files: Path
) -> None:
    document = edited(
        {
            f"{UP}.url": "https://inventory.internal",
            f"{UP}.listen": first,
            "upstreams.billing": second(url="https://billing.internal", listen=second_listen),
        }
    )
    config = load_config(write(tmp_path, document, files), environ=ENV)
    assert config.upstream("billing").listen is not None
