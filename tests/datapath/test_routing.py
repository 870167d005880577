"""Host matching: a token only goes where its upstream's hosts say."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.config import HostMatch, MatchConfig, TokenConfig, UpstreamConfig
from proxy.datapath import routing
from proxy.datapath.routing import Router, parse_absolute_target, path_matches, split_authority
from proxy.errors import BadRequest
from proxy.hosts import is_loopback_host


def upstream(name: str, *hosts: HostMatch, prefix: str | None = None) -> UpstreamConfig:
    return UpstreamConfig(
        name=name,
        match=MatchConfig(hosts, prefix),
        token=TokenConfig(client_id="c", token_url="http://127.0.0.1/t"),
    )


ROUTER = Router(
    (
        upstream(
            "inventory", HostMatch("inventory.internal"), HostMatch("inventory.internal", 8443)
        ),
        upstream("billing", HostMatch("billing.internal"), prefix="/api"),
    )
)


def route(target: bytes) -> str | None:
    parsed = parse_absolute_target(target)
    match = ROUTER.match(parsed.scheme, parsed.host, parsed.port, parsed.path, "GET")
    return match.name if match else None


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (b"http://inventory.internal/x", "inventory"),
        (b"http://INVENTORY.Internal/x", "inventory"),
        (b"http://inventory.internal./x", "inventory"),
        (b"http://inventory.internal:80/x", "inventory"),
        (b"http://inventory.internal:8443/x", "inventory"),
        (b"http://inventory.internal", "inventory"),
        (b"http://inventory.internal:8080/x", None),
        (b"http://inventory.internal.evil.com/x", None),
        (b"http://xinventory.internal/x", None),
        (b"http://inventory.internalx/x", None),
        (b"http://evil.com/inventory.internal", None),
        (b"http://evil.com/?inventory.internal", None),
        (b"http://billing.internal/api", "billing"),
        (b"http://billing.internal/api/v1?x=1", "billing"),
        (b"http://billing.internal/api?x=1", "billing"),
        (b"http://billing.internal/apiary", None),
        (b"http://billing.internal/", None),
        (b"http://billing.internal/API", None),
    ],
)
def test_matching(target: bytes, expected: str | None) -> None:
    assert route(target) == expected


@pytest.mark.parametrize(
    "target",
    [
        b"http://inventory.internal@evil.com/x",
        b"http://evil.com@inventory.internal/x",
        b"http://user:pw@inventory.internal/x",
        b"http://inventory%2einternal/x",
        b"http://inventory.internal%00/x",
        b"http://inventory\xef\xbc\x8einternal/x",
        b"http://inventory.internal:0/x",
        b"http://inventory.internal:65536/x",
        b"http://inventory.internal:80a/x",
        b"http://inventory.internal:/x",
        b"http:///x",
        b"http://[::1/x",
        b"http://[zz::1]/x",
        b"ftp://inventory.internal/x",
        b"http://inventory..internal/x",
        b"http://inventory.internal/x#frag",
        b"http://inventory.internal/x#",
        b"/x",
    ],
)
def test_bad_targets_are_refused(target: bytes) -> None:
    with pytest.raises(BadRequest):
        parse_absolute_target(target)


def test_path_is_kept_byte_for_byte() -> None:
    assert parse_absolute_target(b"http://h/a%2Fb/../c?q=%20&r=/").path == b"/a%2Fb/../c?q=%20&r=/"
    assert parse_absolute_target(b"http://h?q=1").path == b"/?q=1"


def test_ipv6_literals() -> None:
    assert split_authority("[::1]:8080", None) == ("::1", 8080)
    assert split_authority("[0:0::1]", 80) == ("::1", 80)


@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789.-:@%/[]_ ", max_size=40))
def test_only_exact_configured_hosts_ever_match(authority: str) -> None:
    """Whatever the authority, a match means it normalises to a configured host and port."""
    try:
        parsed = parse_absolute_target(b"http://" + authority.encode() + b"/")
    except BadRequest:
        return
    name = ROUTER.match(parsed.scheme, parsed.host, parsed.port, parsed.path, "GET")
    if name is not None:
        assert (parsed.host, parsed.port) in {
            ("inventory.internal", 80),
            ("inventory.internal", 8443),
        }


@given(st.binary(max_size=30))
def test_path_prefix_is_segment_bounded(suffix: bytes) -> None:
    path = b"/api" + suffix
    if path_matches("/api", path):
        rest = path.split(b"?", 1)[0][4:]
        assert rest == b"" or rest.startswith(b"/")


def test_parsed_origins_are_reused_and_bounded() -> None:
    first = parse_absolute_target(b"http://Inventory.Internal:8443/a")
    again = parse_absolute_target(b"http://Inventory.Internal:8443/b?c")
    assert (again.scheme, again.host, again.port, again.path) == (
        first.scheme,
        first.host,
        first.port,
        b"/b?c",
    )
    assert (first.host, first.port) == ("inventory.internal", 8443)
    for n in range(3 * routing._PARSED_ORIGINS_MAX):
        assert parse_absolute_target(b"http://h%d.example/x" % n).host == f"h{n}.example"
    assert len(routing._PARSED_ORIGINS) <= routing._PARSED_ORIGINS_MAX
    # What failed to parse is not remembered: it fails again.
    for _ in range(2):
        with pytest.raises(BadRequest):
            parse_absolute_target(b"http://user@inventory.internal/x")


TRICKY_TARGETS = [
    b"http://h/x",
    b"HTTP://H/x",
    b"http://h",
    b"http://h?q=/x",
    b"http://h#f/x",
    b"http://h:80/x",
    b"http:/h/x",
    b"http//h/x",
    b"h/x",
    b"http://",
]


def parsed_or_refused(target: bytes) -> tuple[object, ...]:
    try:
        parsed = parse_absolute_target(target)
    except BadRequest as error:
        return ("refused", str(error))
    return (parsed.scheme, parsed.host, parsed.port, parsed.path)


@pytest.mark.parametrize("target", TRICKY_TARGETS)
def test_a_cached_origin_never_changes_where_a_target_is_cut(target: bytes) -> None:
    routing._PARSED_ORIGINS.clear()
    cold = parsed_or_refused(target)
    for warm_up in TRICKY_TARGETS:
        parsed_or_refused(warm_up)
    assert parsed_or_refused(target) == cold


def test_a_query_before_any_slash_is_part_of_the_path_with_the_origin_cached() -> None:
    parse_absolute_target(b"http://h/")
    assert parsed_or_refused(b"http://h?q=/x") == ("http", "h", 80, b"/?q=/x")


SCHEMES = ("http", "https")


@pytest.mark.parametrize(
    "entry",
    [HostMatch("vm.internal"), HostMatch("vm.internal", 80), HostMatch("vm.internal", 443)],
)
@pytest.mark.parametrize("prefix", [None, "/api"])
def test_connect_claims_exactly_the_ports_that_absolute_form_matches(
    entry: HostMatch, prefix: str | None
) -> None:
    router = Router((upstream("vm", entry, prefix=prefix),))
    path = (prefix or "/").encode()
    for port in (80, 443, 8080, 8443):
        matched = any(router.match(scheme, "vm.internal", port, path, "GET") for scheme in SCHEMES)
        assert bool(router.claimants("vm.internal", port)) == matched, port
    claimed = {port for port in (80, 443, 8080) if router.claimants("vm.internal", port)}
    # A host without a port claims both default ports.
    assert claimed == ({80, 443} if entry.port is None else {entry.port})


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True),
        ("LOCALHOST.", True),
        ("127.0.0.1", True),
        ("127.255.0.9", True),
        ("::1", True),
        ("[::1]", True),
        ("127.evil.example", False),
        ("127.0.0.1.evil.example", False),
        ("localhost.evil.example", False),
        ("128.0.0.1", False),
        ("::2", False),
        ("", False),
    ],
)
def test_loopback_is_an_ip_literal_or_localhost(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


def methods_upstream(name: str, prefix: str | None, *methods: str) -> UpstreamConfig:
    return UpstreamConfig(
        name=name,
        match=MatchConfig((HostMatch("api.internal"),), prefix, methods),
        token=TokenConfig(client_id="c", token_url="http://127.0.0.1/t"),
    )


NESTED = Router(
    (
        methods_upstream("root", None),
        methods_upstream("api", "/api"),
        methods_upstream("admin-read", "/api/admin", "GET", "HEAD"),
        methods_upstream("admin-write", "/api/admin"),
        methods_upstream("deep", "/api/admin/keys"),
    )
)


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("GET", b"/", "root"),
        ("GET", b"/apiary", "root"),
        ("GET", b"/api", "api"),
        ("POST", b"/api/stock?x=/api/admin", "api"),
        ("GET", b"/api/admin", "admin-read"),
        ("HEAD", b"/api/admin/users", "admin-read"),
        ("POST", b"/api/admin/users", "admin-write"),
        ("get", b"/api/admin/users", "admin-write"),  # methods are case-sensitive
        ("GET", b"/api/administrator", "api"),
        ("GET", b"/api/admin/keys/1", "deep"),
        ("DELETE", b"/api/admin/keys", "deep"),
    ],
)
def test_the_longest_prefix_then_the_method_decides(
    method: str, path: bytes, expected: str
) -> None:
    for scheme in SCHEMES:
        matched = NESTED.match(scheme, "api.internal", routing.DEFAULT_PORTS[scheme], path, method)
        assert matched is not None, (scheme, method, path)
        assert matched.name == expected, (scheme, method, path)


def test_upstreams_with_methods_only_match_those_methods() -> None:
    router = Router((methods_upstream("reader", None, "GET", "HEAD"),))
    assert router.match("https", "api.internal", 443, b"/x", "GET") is not None
    assert router.match("https", "api.internal", 443, b"/x", "POST") is None
    # A tunnel carries any method: it is claimed all the same.
    assert [u.name for u in router.claimants("api.internal", 443)] == ["reader"]


def test_nested_prefixes_across_a_default_port_entry() -> None:
    outer = UpstreamConfig(
        name="outer",
        match=MatchConfig((HostMatch("api.internal", 443),), "/api"),
        token=TokenConfig(client_id="c", token_url="http://127.0.0.1/t"),
    )
    inner = UpstreamConfig(
        name="inner",
        match=MatchConfig((HostMatch("api.internal"),), "/api/admin"),
        token=TokenConfig(client_id="c", token_url="http://127.0.0.1/t"),
    )
    router = Router((outer, inner))

    def name(scheme: str, port: int, path: bytes) -> str | None:
        matched = router.match(scheme, "api.internal", port, path, "GET")
        return matched.name if matched is not None else None

    assert name("https", 443, b"/api/admin/x") == "inner"
    assert name("https", 443, b"/api/x") == "outer"
    assert name("http", 80, b"/api/admin/x") == "inner"
    assert name("http", 80, b"/api/x") is None
    assert name("http", 443, b"/api/admin/x") == "outer"  # `inner` takes 443 for https only
    assert name("http", 443, b"/api/x") == "outer"
    assert [u.name for u in router.claimants("api.internal", 443)] == ["outer", "inner"]
    assert [u.name for u in router.claimants("api.internal", 80)] == ["inner"]
