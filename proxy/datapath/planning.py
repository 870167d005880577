"""Where a request goes: the planners of each kind of port.

A planner turns a request head into a `Plan`: the matched upstream's `Route` (or none),
the origin to connect to, the Host to send and the path, byte for byte. Every rule
that decides whether and where a token may travel is applied here, before anything is
sent: the forward port takes absolute-form targets only, a reverse port sends
everything to its upstream's `url`, an intercepted tunnel's requests must name the
tunnel's host, a token never goes over plain http to a non-loopback host without
`allow_insecure_http`, and an `https://` request is never downgraded.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable

from proxy.config import TlsClientConfig
from proxy.datapath.messages import RequestHead
from proxy.datapath.routing import DEFAULT_PORTS, Target, parse_absolute_target, split_authority
from proxy.datapath.runtime import Route, RuntimeHolder
from proxy.datapath.upstream_connection import Origin
from proxy.errors import BadRequest, HostNotAllowed, ProxyError
from proxy.hosts import LINK_LOCAL_SETTING, is_link_local_target, is_loopback_host
from proxy.ops.metrics import UNMATCHED

_default_tls: ssl.SSLContext | None = None


def _passthrough_tls() -> ssl.SSLContext:
    global _default_tls
    if _default_tls is None:
        from proxy.tls.client_context import client_ssl_context

        # The system's trust store and no client certificate: what any other host gets.
        _default_tls = client_ssl_context(TlsClientConfig())
    return _default_tls


class Plan:
    """Where one request goes and what it carries."""

    __slots__ = ("guard_peer", "host", "label", "origin", "path", "route", "via")

    def __init__(
        self,
        route: Route | None,
        origin: Origin,
        host: bytes,
        path: bytes,
        via: bool,
        guard_peer: bool = False,
    ) -> None:
        self.route = route
        self.origin = origin
        self.host = host
        self.path = path
        self.label = route.name if route is not None else UNMATCHED
        self.via = via  # add Via to the request and its response (RFC 9110 §7.6.3)
        # Refuse the connection if the peer's address is link-local or metadata (a
        # passthrough target named by a DNS name: only its address tells).
        self.guard_peer = guard_peer


Planner = Callable[[RequestHead], Plan]


class Planners:
    """Plans requests against the current runtime (router and routes)."""

    def __init__(self, holder: RuntimeHolder) -> None:
        self._holder = holder

    def plan_forward(self, head: RequestHead) -> Plan:
        if not head.target or head.target.startswith(b"/") or head.target == b"*":
            raise BadRequest(
                "origin-form request on the forward-proxy port: send absolute-form "
                "(http://host/path), as HTTP_PROXY clients do"
            )
        check_host_fields(head)
        return self.plan_target(parse_absolute_target(head.target), head.method)

    def plan_reverse(self, upstream_name: str, head: RequestHead) -> Plan:
        runtime = self._holder.current
        route = runtime.routes.get(upstream_name)
        if route is None:
            raise HostNotAllowed("this upstream is no longer configured", upstream=upstream_name)
        if route.origin is None or route.host_header is None:
            raise BadRequest("this upstream has no url to send to", upstream=upstream_name)
        try:
            check_host_fields(head)
            path = head.target
            if not path.startswith(b"/") and not (head.method == "OPTIONS" and path == b"*"):
                path = parse_absolute_target(path).path
        except ProxyError as error:
            error.upstream = upstream_name
            raise
        return Plan(route, route.origin, route.host_header, path, runtime.via)

    def plan_tunnelled(self, scheme: str, host: str, port: int, head: RequestHead) -> Plan:
        """A request from inside a CONNECT tunnel: decrypted (`https`), or plain HTTP the
        client sent through it (`http`). Its destination is the tunnel's."""
        check_host_fields(head)
        if not head.target.startswith(b"/"):
            target = parse_absolute_target(head.target)
            if (target.host, target.port) != (host, port):
                raise BadRequest("request target does not match the CONNECT authority")
            path = target.path
        else:
            path = head.target
            (authority,) = head.hosts or (b"",)
            try:
                named = split_authority(authority.decode("ascii"), DEFAULT_PORTS[scheme])
            except UnicodeDecodeError:
                raise BadRequest("Host header is not ASCII") from None
            if named != (host, port):
                # Host confusion: the token would be chosen for one host and sent to another.
                raise BadRequest("Host header does not match the CONNECT authority")
        return self.plan_target(Target(scheme, host, port, path), head.method)

    def plan_target(self, target: Target, method: str) -> Plan:
        runtime = self._holder.current
        upstream = runtime.router.match(
            target.scheme, target.host, target.port, target.path, method
        )
        route = runtime.route_for(upstream)
        if route is None:
            if runtime.config.unknown_hosts == "deny":
                raise HostNotAllowed(
                    f"{target.host} matches no configured upstream (unknown_hosts: deny)"
                )
            guard = not runtime.allow_link_local
            if guard and is_link_local_target(target.host):
                raise link_local_refusal(target.host)
            return Plan(
                None,
                _origin_of(target),
                target.authority.encode("ascii"),
                target.path,
                runtime.via,
                guard,
            )
        if route.origin is not None and route.host_header is not None:
            if target.scheme == "https" and route.origin.scheme != "https":
                raise BadRequest(
                    "an https:// request would be sent over plain http with a token",
                    upstream=route.name,
                )
            return Plan(route, route.origin, route.host_header, target.path, runtime.via)
        if (
            target.scheme == "http"
            and not route.config.allow_insecure_http
            and not is_loopback_host(target.host)
        ):
            # RFC 6750 §5.3: a bearer token only travels over TLS, unless the operator
            # says the network below is trusted (a service mesh with mTLS, say).
            raise HostNotAllowed(
                f"the token of upstream '{route.name}' would travel in cleartext to "
                f"{target.host}; set its url to https://{target.authority}, or set "
                "allow_insecure_http: true if the network is trusted",
                upstream=route.name,
            )
        origin = origin_for(route, target)
        return Plan(route, origin, target.authority.encode("ascii"), target.path, runtime.via)


def check_host_fields(head: RequestHead) -> None:
    hosts = head.hosts
    if len(hosts) > 1:
        raise BadRequest("more than one Host header")  # RFC 9112 §3.2
    if not hosts and head.version == "1.1":
        raise BadRequest("missing Host header")


def link_local_refusal(target: str) -> HostNotAllowed:
    """The answer for a passthrough target that is, or resolved to, a link-local or
    cloud-metadata address."""
    return HostNotAllowed(
        f"{target} is a link-local or cloud metadata address, which requests no upstream "
        f"matches may not reach (set {LINK_LOCAL_SETTING}: true to allow it)"
    )


def origin_for(route: Route, target: Target) -> Origin:
    """Where `route` sends a request for `target`: its `url`'s origin, or else the target
    itself over the upstream's own TLS settings."""
    if route.origin is not None:
        return route.origin
    return _origin_of(target, route)


def _origin_of(target: Target, route: Route | None = None) -> Origin:
    tls: ssl.SSLContext | None = None
    if target.scheme == "https":
        if route is not None:
            from proxy.tls.client_context import client_ssl_context

            tls = client_ssl_context(route.config.tls)
        else:
            tls = _passthrough_tls()
    return Origin(target.scheme, target.host, target.port, tls)
