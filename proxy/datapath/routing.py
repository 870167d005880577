"""Which upstream a request belongs to: request-target parsing and host matching.

The rules that keep a token on the hosts it was meant for live here:

* A host matches only exactly (case-insensitive, one trailing dot ignored), and only
  on the port it names, or on the scheme's default port when it names none.
* Anything that is not a plain DNS name or IP literal (userinfo, percent-encoding,
  non-ASCII, empty labels) is refused as a bad request rather than guessed at.
* An optional `path_prefix` matches on a segment boundary; of nested prefixes on one
  host, the longest wins. Optional `methods` tell upstreams of one host and path apart.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Final

from proxy.config import UpstreamConfig
from proxy.datapath.speedups import slash_after_authority
from proxy.errors import BadRequest

DEFAULT_PORTS: Final = {"http": 80, "https": 443}
_WEBSOCKET_SCHEMES: Final = {"ws": "http", "wss": "https"}
_DEFAULT_PORT_NUMBERS: Final = frozenset(DEFAULT_PORTS.values())

# RFC 3986 reg-name restricted to what DNS allows: letters, digits, '-', '_' and dots.
_HOSTNAME: Final = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,62})(\.[a-z0-9_]([a-z0-9_-]{0,62}))*$")


class Target:
    """Where a client asked to go: scheme, normalised host, port and the raw path+query.

    A plain class, not a dataclass, for the speed of its construction (see RequestHead).
    """

    __slots__ = ("host", "path", "port", "scheme")

    def __init__(self, scheme: str, host: str, port: int, path: bytes) -> None:
        self.scheme = scheme
        self.host = host
        self.port = port
        self.path = path  # byte for byte as received (never re-encoded), at least b"/"

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"


def normalise_host(raw: str) -> str:
    """Lower-case `raw` (a host without port), drop one trailing dot; BadRequest if not a host."""
    if raw.startswith("[") and raw.endswith("]"):
        if "%" in raw:
            # ipaddress takes `fe80::1%eth0`; a zone identifier (RFC 6874) names an
            # interface of the client's host and has no place in a request to a proxy.
            raise BadRequest(f"IPv6 zone identifiers are not allowed: {raw!r}")
        try:
            return str(ipaddress.IPv6Address(raw[1:-1]))
        except ValueError:
            raise BadRequest(f"invalid IPv6 literal {raw!r}") from None
    host = raw.lower()
    if host.endswith("."):
        host = host[:-1]
    if not host.isascii() or not _HOSTNAME.match(host):
        raise BadRequest(f"invalid host {raw!r}")
    return host


def split_authority(authority: str, default_port: int | None) -> tuple[str, int]:
    """`host[:port]` → (normalised host, port); BadRequest on anything else."""
    if "@" in authority:
        raise BadRequest("userinfo is not allowed in the request target")
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise BadRequest("unterminated IPv6 literal")
        host_part, rest = authority[: end + 1], authority[end + 1 :]
        if rest and not rest.startswith(":"):
            raise BadRequest(f"invalid authority {authority!r}")
        port_part = rest[1:] if rest else None
    else:
        host_part, sep, port_part_raw = authority.partition(":")
        port_part = port_part_raw if sep else None
    if port_part is None:
        if default_port is None:
            raise BadRequest(f"a port is required in {authority!r}")
        port = default_port
    else:
        if not port_part.isdigit() or len(port_part) > 5 or not 0 < int(port_part) < 65536:
            raise BadRequest(f"invalid port in {authority!r}")
        port = int(port_part)
    if not host_part:
        raise BadRequest("empty host")
    return normalise_host(host_part), port


# Scheme and authority of recent absolute-form targets -> (scheme, host, port). A
# forward proxy sees the same few origins again and again; parsing one is far dearer
# than looking it up. Only what parsed cleanly is kept, and the cache is emptied when
# it fills (a client cycling through hosts gains nothing, and costs one parse each).
_PARSED_ORIGINS: Final[dict[bytes, tuple[str, str, int]]] = {}
_PARSED_ORIGINS_MAX: Final = 1024


def parse_absolute_target(target: bytes) -> Target:
    """Parse an absolute-form request target (RFC 9112 §3.2.2), keeping the path's bytes."""
    # Nearly always the authority ends at a '/': if what precedes it is a known origin,
    # it holds no '?' or '#' either (no cached origin does), so that is where it ends.
    cut = slash_after_authority(target)
    parsed = _PARSED_ORIGINS.get(target[:cut]) if cut >= 0 else None
    if parsed is None:
        start = target.find(b"://") + 3
        cut = len(target)
        if start >= 3:
            for delimiter in (b"/", b"?", b"#"):
                index = target.find(delimiter, start)
                if 0 <= index < cut:
                    cut = index
        origin = target[:cut]
        parsed = _PARSED_ORIGINS.get(origin)
        if parsed is None:
            parsed = _parse_origin(origin)
            if len(_PARSED_ORIGINS) >= _PARSED_ORIGINS_MAX:
                _PARSED_ORIGINS.clear()
            _PARSED_ORIGINS[origin] = parsed
    path = target[cut:]
    if not path.isascii():
        raise BadRequest("request target is not ASCII")
    if path.partition(b"#")[1]:  # (not find(): that parses its arguments, at twice the cost)
        raise BadRequest("a fragment is not allowed in the request target")
    if not path.startswith(b"/"):
        path = b"/" + path
    scheme, host, port = parsed
    return Target(scheme, host, port, path)


def _parse_origin(origin: bytes) -> tuple[str, str, int]:
    """`scheme://authority` of an absolute-form target -> (scheme, normalised host, port)."""
    try:
        text = origin.decode("ascii")
    except UnicodeDecodeError:
        raise BadRequest("request target is not ASCII") from None
    scheme, sep, authority = text.partition("://")
    scheme = scheme.lower()
    # RFC 6455 §3: ws:// and wss:// name the same resources as http:// and https://
    # (aiohttp sends `GET ws://host/path` with its Upgrade to a proxy).
    scheme = _WEBSOCKET_SCHEMES.get(scheme, scheme)
    if not sep or scheme not in DEFAULT_PORTS:
        raise BadRequest("the forward-proxy port takes absolute-form http:// targets")
    host, port = split_authority(authority, DEFAULT_PORTS[scheme])
    return scheme, host, port


def has_dot_segment(path: bytes) -> bool:
    """Whether the path (query excluded) has a `.` or `..` segment, plain or percent-encoded."""
    raw = path.split(b"?", 1)[0].lower().replace(b"%2e", b".")
    return any(segment in (b".", b"..") for segment in raw.split(b"/"))


def path_matches(prefix: str | None, path: bytes) -> bool:
    """Segment-boundary prefix match of the path (query excluded)."""
    if prefix is None:
        return True
    raw = path.split(b"?", 1)[0]
    encoded = prefix.encode("ascii")
    return raw == encoded or raw.startswith(encoded + b"/")


class _Candidates:
    """The upstreams one request's host and port may go to, longest path prefix first
    (upstreams without a prefix last; config order among equal prefixes)."""

    __slots__ = ("by_path", "upstreams")

    def __init__(self) -> None:
        self.upstreams: list[UpstreamConfig] = []
        self.by_path = False  # some of them are routed by path_prefix

    def add(self, upstream: UpstreamConfig) -> None:
        if upstream in self.upstreams:
            return
        self.upstreams.append(upstream)
        self.upstreams.sort(key=_prefix_length, reverse=True)  # stable: config order kept
        self.by_path = self.by_path or bool(upstream.match.path_prefix)


def _prefix_length(upstream: UpstreamConfig) -> int:
    prefix = upstream.match.path_prefix
    return len(prefix) if prefix is not None else 0


class Router:
    """Maps (scheme, host, port, path, method) to the upstream that matches it, if any."""

    def __init__(self, upstreams: tuple[UpstreamConfig, ...]) -> None:
        self.upstreams = upstreams
        # Host -> port -> the upstreams whose entry names that port (None: no port). What
        # CONNECT claims, which names no scheme.
        self._table: dict[str, dict[int | None, _Candidates]] = {}
        # Host -> scheme -> the upstreams for the scheme's default port: the entries that
        # name that port and those that name none, merged, so that the longest prefix
        # wins across both.
        self._defaults: dict[str, dict[str, _Candidates]] = {}
        for upstream in upstreams:
            for entry in upstream.match.hosts:
                ports = self._table.setdefault(entry.host, {})
                ports.setdefault(entry.port, _Candidates()).add(upstream)
                defaults = self._defaults.setdefault(entry.host, {})
                for scheme, default_port in DEFAULT_PORTS.items():
                    if entry.port is None or entry.port == default_port:
                        defaults.setdefault(scheme, _Candidates()).add(upstream)

    def match(
        self, scheme: str, host: str, port: int, path: bytes, method: str
    ) -> UpstreamConfig | None:
        if port == DEFAULT_PORTS.get(scheme):
            defaults = self._defaults.get(host)
            if defaults is None:
                return None
            candidates = defaults.get(scheme)
        else:
            ports = self._table.get(host)
            if ports is None:
                return None
            candidates = ports.get(port)
        if candidates is None:
            return None
        if candidates.by_path and has_dot_segment(path):
            # `/a/../b` matches prefix /a, but the origin resolves it to /b (RFC 3986
            # §5.2.4): the token of /a's upstream would reach the path of another.
            raise BadRequest("dot-segments in the path of a host routed by path_prefix")
        for upstream in candidates.upstreams:
            match = upstream.match
            if path_matches(match.path_prefix, path) and (
                not match.methods or method in match.methods
            ):
                return upstream
        return None

    def claimants(self, host: str, port: int) -> list[UpstreamConfig]:
        """The upstreams that match this host and port on some path and method, in either
        scheme.

        A CONNECT tunnel names no scheme: what it carries may be TLS or plain HTTP. So a
        host entry without a port is claimed on both default ports here (80 as much as
        443); otherwise a tunnel to port 80 would carry requests to a configured host
        without its token. Methods play no part: the tunnel carries any.
        """
        ports = self._table.get(host)
        if ports is None:
            return []
        claimed: list[UpstreamConfig] = []
        for key in (port, None) if port in _DEFAULT_PORT_NUMBERS else (port,):
            candidates = ports.get(key)
            if candidates is not None:
                claimed.extend(u for u in candidates.upstreams if u not in claimed)
        return claimed
