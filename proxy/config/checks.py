"""Cross-checks: rules between settings that each passed on their own.

One request must never be claimed by two upstreams (a host written twice, `host`
beside `host:443`, one path prefix twice, unless their methods tell them apart; nested
prefixes are fine: the longest wins), and no two listeners may share a port (the
proxy port, the admin port and the upstreams' reverse-proxy ports). Each problem is
reported at the later of the two settings, naming the earlier one.
"""

from __future__ import annotations

from collections.abc import Sequence

from proxy.config.model import Address, HostMatch, UpstreamConfig
from proxy.config.scalars import is_wildcard
from proxy.config.source import Reader

__all__ = ["addresses_conflict", "check_host_overlaps", "check_listen_conflicts"]


def addresses_conflict(a: Address, b: Address) -> bool:
    """Whether two listeners would compete for one port (port 0 is never a conflict)."""
    if a.port == 0 or b.port == 0 or a.port != b.port:
        return False
    return a.host == b.host or is_wildcard(a.host) or is_wildcard(b.host)


def check_listen_conflicts(
    reader: Reader, listen: Address, admin_listen: Address, upstreams: Sequence[UpstreamConfig]
) -> None:
    taken: list[tuple[str, Address]] = [("listen", listen), ("admin_listen", admin_listen)]
    for upstream in upstreams:
        if upstream.listen is None:
            continue
        for owner, address in taken:
            if addresses_conflict(upstream.listen, address):
                reader.fail(
                    ("upstreams", upstream.name, "listen"),
                    f"{upstream.listen} conflicts with {owner} {address}",
                )
        taken.append((f"upstreams.{upstream.name}.listen", upstream.listen))


def check_host_overlaps(reader: Reader, upstreams: Sequence[UpstreamConfig]) -> None:
    seen: dict[str, list[tuple[UpstreamConfig, int, HostMatch]]] = {}
    for upstream in upstreams:
        prefix = upstream.match.path_prefix
        methods = upstream.match.methods
        for index, host in enumerate(upstream.match.hosts):
            for other, other_index, other_host in seen.get(host.host, []):
                other_prefix = other.match.path_prefix
                other_methods = other.match.methods
                if not (
                    _ports_overlap(host.port, other_host.port)
                    and prefix == other_prefix
                    and _methods_overlap(methods, other_methods)
                ):
                    continue
                path = ("upstreams", upstream.name, "match", "hosts", f"[{index}]")
                this, that = _format_host_match(host), _format_host_match(other_host)
                if other is upstream:
                    problem = (
                        f"{this} is listed twice"
                        if host == other_host
                        else f"{this} overlaps {that} (hosts[{other_index}]): "
                        "a host without a port matches ports 80 and 443"
                    )
                else:
                    details = ""
                    if prefix is not None:
                        details += f", path prefix {prefix}"
                    shared = _shared_methods(methods, other_methods)
                    if shared:
                        details += f", methods {', '.join(shared)}"
                    problem = (
                        f"{this} of upstream {upstream.name} overlaps {that} of upstream "
                        f"{other.name}{details}: a request would match both"
                    )
                reader.fail(path, problem)
            seen.setdefault(host.host, []).append((upstream, index, host))


def _format_host_match(host: HostMatch) -> str:
    name = f"[{host.host}]" if ":" in host.host else host.host
    return name if host.port is None else f"{name}:{host.port}"


def _ports_overlap(a: int | None, b: int | None) -> bool:
    # None is "the scheme's default port": 80 for http://, 443 for https://, and both
    # for CONNECT, which names no scheme.
    if a == b:
        return True
    if a is None:
        return b in (80, 443)
    if b is None:
        return a in (80, 443)
    return False


def _methods_overlap(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    # No methods: every method.
    return not a or not b or any(method in b for method in a)


def _shared_methods(a: tuple[str, ...], b: tuple[str, ...]) -> tuple[str, ...]:
    if not a:
        return b
    return a if not b else tuple(method for method in a if method in b)
