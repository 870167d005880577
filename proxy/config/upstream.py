"""Upstream sections (`upstreams.<name>`): which requests an upstream takes and what they get.

Owns the upstream names (they become metric labels), `match` (exact hosts, a path
prefix, methods), where matched requests go (`url`, a reverse-proxy `listen` port, the
TLS of that connection, its timeouts and HTTP version: `http2`), and the injection
settings (`header`, `overwrite`, `required`, `purge_on_status`). The `token` section
is read by `proxy.config.token`; checks across upstreams (overlapping hosts, shared ports) are in
`proxy.config.checks`."""

from __future__ import annotations

import re
import typing

from proxy.config.model import HostMatch, Http2Mode, MatchConfig, TokenConfig, UpstreamConfig
from proxy.config.scalars import address, boolean, duration, integer, one_of, split_host_port
from proxy.config.source import (
    KeyPath,
    Reader,
    Section,
    key_segment,
    show,
    type_name,
    yaml_keys,
)
from proxy.config.tls import TLS_KEYS, tls_client
from proxy.config.token import token
from proxy.config.urls import target_url

__all__ = ["UPSTREAM_KEYS", "upstreams"]

# `name` is the upstream's key in `upstreams`, not a key of its own section.
UPSTREAM_KEYS = yaml_keys(UpstreamConfig, skip={"name"}, expand={"tls": TLS_KEYS})
_MATCH_KEYS = yaml_keys(MatchConfig)
_HTTP2_MODES: tuple[Http2Mode, ...] = typing.get_args(Http2Mode)
_UPSTREAM_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_RESERVED_UPSTREAM_NAMES = ("unmatched",)
# RFC 9110 §5.6.2 token characters.
_HTTP_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Headers the proxy owns on the wire: framing, routing and hop-by-hop (RFC 9110 §7.6.1).
_FORBIDDEN_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "upgrade",
    }
)


def upstreams(top: Section) -> tuple[UpstreamConfig, ...]:
    """The `upstreams` mapping of the top-level section, in the order written."""
    if top.get("upstreams") is None:
        return ()  # `upstreams:` with nothing under it
    value = top.mapping("upstreams", "upstream names to upstreams")
    if value is None:
        return ()
    reader = top.reader
    path = top.key_path("upstreams")
    result = []
    for name, body in value.items():
        if not isinstance(name, str):
            reader.fail(
                (*path, key_segment(name)),
                f"upstream names must be strings, got {type_name(name)} (quote it)",
            )
        upstream_path = (*path, key_segment(name))
        if not _UPSTREAM_NAME.fullmatch(name):
            reader.fail(
                upstream_path,
                "invalid upstream name: use letters, digits, '_', '.' and '-' only "
                "(it becomes a metric label)",
            )
        if name in _RESERVED_UPSTREAM_NAMES:
            reader.fail(upstream_path, f"{name!r} is reserved (the label of unmatched requests)")
        result.append(_upstream(reader.section(upstream_path, body, UPSTREAM_KEYS), name))
    return tuple(result)


def _upstream(section: Section, name: str) -> UpstreamConfig:
    defaults = UpstreamConfig(
        name=name, match=MatchConfig(hosts=()), token=TokenConfig(client_id="")
    )
    allow_insecure_http = section.with_default(
        "allow_insecure_http", boolean, defaults.allow_insecure_http
    )
    url = section.optional("url", target_url(allow_insecure_http))
    listen = section.optional("listen", address)
    if listen is not None and url is None:
        section.fail(
            "listen", "a reverse-proxy listen port needs url (where its requests are sent)"
        )
    token_config = section.required("token", token(allow_insecure_http))
    header = section.with_default("header", _header_name, defaults.header)
    if token_config.dpop is not None and header.lower() != "authorization":
        # RFC 9449 §7.1: a DPoP-bound token travels in Authorization, scheme DPoP.
        section.fail("header", "must be Authorization with token.dpop (RFC 9449 §7.1)")
    return UpstreamConfig(
        name=name,
        match=section.required("match", _match),
        token=token_config,
        url=url,
        listen=listen,
        header=header,
        overwrite=section.with_default("overwrite", boolean, defaults.overwrite),
        required=section.with_default("required", boolean, defaults.required),
        tls=tls_client(section),
        connect_timeout=section.with_default("connect_timeout", duration, defaults.connect_timeout),
        timeout=section.with_default("timeout", duration, defaults.timeout),
        allow_insecure_http=allow_insecure_http,
        purge_on_status=section.with_default(
            "purge_on_status", _purge_statuses, defaults.purge_on_status
        ),
        http2=section.with_default("http2", _http2_mode, defaults.http2),
    )


def _http2_mode(reader: Reader, path: KeyPath, value: object) -> Http2Mode:
    if value is False:
        return "off"  # YAML 1.1 reads an unquoted `off` as false
    return one_of(_HTTP2_MODES)(reader, path, value)


def _match(reader: Reader, path: KeyPath, value: object) -> MatchConfig:
    section = reader.section(path, value, _MATCH_KEYS)
    return MatchConfig(
        hosts=section.required("hosts", _host_matches),
        path_prefix=section.optional("path_prefix", _path_prefix),
        methods=section.with_default("methods", _methods, ()),
    )


def _methods(reader: Reader, path: KeyPath, value: object) -> tuple[str, ...]:
    methods: list[str] = []
    for item_path, item in reader.items(
        path,
        value,
        what="HTTP methods",
        example="[GET] for one method",
        empty="must list at least one method (leave it out for every method)",
    ):
        text = reader.string(item_path, item)
        if not _HTTP_TOKEN.fullmatch(text):
            reader.fail(item_path, f"{show(text)} is not an HTTP method")
        method = text.upper()
        if method == "CONNECT":
            reader.fail(item_path, "CONNECT is not routed by method (a tunnel names only a host)")
        if method in methods:
            reader.fail(item_path, f"{method} is listed twice")
        methods.append(method)
    return tuple(methods)


def _purge_statuses(reader: Reader, path: KeyPath, value: object) -> tuple[int, ...]:
    statuses: list[int] = []
    for item_path, item in reader.items(
        path,
        value,
        what="HTTP status codes",
        example="[401] for one status",
        empty="must list at least one status (the default is [401])",
    ):
        status = integer(reader, item_path, item, minimum=400, maximum=599)
        if status in statuses:
            reader.fail(item_path, f"{status} is listed twice")
        statuses.append(status)
    return tuple(statuses)


def _host_matches(reader: Reader, path: KeyPath, value: object) -> tuple[HostMatch, ...]:
    hosts = []
    for item_path, item in reader.items(
        path,
        value,
        what="hosts",
        example="[host] for one host",
        empty="must list at least one host",
    ):
        text = reader.string(item_path, item)
        try:
            host, port = split_host_port(text, port_required=False)
        except ValueError as error:
            reader.fail(item_path, f"{error} (expected host, host:port or [v6]:port)")
        if port == 0:
            reader.fail(item_path, f"{show(text)}: port must be from 1 to 65535")
        hosts.append(HostMatch(host, port))
    return tuple(hosts)


def _path_prefix(reader: Reader, path: KeyPath, value: object) -> str | None:
    text = reader.string(path, value)
    if not text.startswith("/"):
        reader.fail(path, f"{show(text)} must start with '/'")
    if any(char in text for char in "?#") or any(
        not char.isprintable() or char.isspace() for char in text
    ):
        reader.fail(path, f"{show(text)} must be a plain path without query or fragment")
    if any(segment in (".", "..") for segment in text.split("/")):
        reader.fail(path, f"{show(text)} must not contain '.' or '..' segments")
    prefix = text.rstrip("/")
    return prefix or None


def _header_name(reader: Reader, path: KeyPath, value: object) -> str:
    text = reader.string(path, value)
    if not _HTTP_TOKEN.fullmatch(text):
        reader.fail(path, f"{show(text)} is not a valid HTTP header name")
    if text.lower() in _FORBIDDEN_HEADERS:
        reader.fail(path, f"{text} is managed by the proxy and cannot carry the token")
    return text
