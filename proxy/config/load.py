"""Loading the configuration: `load_config()` and the top-level section.

One pass over the document with a key path at every step, so that each problem
becomes one `ConfigError` line naming the file, the key path and what is wrong. The
sections have their own modules: `upstream` (and its `token`), `tls`, `cache`; the
values they are made of are in `scalars`, `urls` and `keys`; `source` reads the YAML
and the files it names; `checks` holds the rules across sections. This module reads
the top-level keys (listeners, limits, logging) and puts the pieces together.
"""

from __future__ import annotations

import os
import typing
from collections.abc import Mapping
from pathlib import Path

from proxy.config.cache import token_cache
from proxy.config.checks import addresses_conflict, check_host_overlaps, check_listen_conflicts
from proxy.config.model import (
    MIN_SECRET_LENGTH,
    LimitsConfig,
    LogFormat,
    ProxyConfig,
    UnknownHosts,
)
from proxy.config.scalars import (
    address,
    boolean,
    count,
    duration,
    integer,
    one_of,
    parse_duration,
    size,
)
from proxy.config.source import KeyPath, Reader, read_document, type_name, yaml_keys
from proxy.config.tls import tls_intercept
from proxy.config.upstream import upstreams

__all__ = ["load_config", "parse_duration", "short_secret_warnings"]

# `source` is the file the config came from, not a key in it.
_TOP_KEYS = yaml_keys(ProxyConfig, skip={"source"})
_LIMIT_KEYS = yaml_keys(LimitsConfig)
_UNKNOWN_HOSTS: tuple[UnknownHosts, ...] = typing.get_args(UnknownHosts)
_LOG_FORMATS: tuple[LogFormat, ...] = typing.get_args(LogFormat)
_LOG_LEVELS = ("debug", "info", "warning", "error")


def load_config(path: str | Path, environ: Mapping[str, str] | None = None) -> ProxyConfig:
    """Read, expand `${VAR}`s in, and validate the YAML file at `path`.

    `${VAR}` comes from `environ` (default: `os.environ`). Relative file paths in the
    config are resolved against the config file's directory. Any problem raises
    `ConfigError`; no message contains a secret.
    """
    document = read_document(path)
    reader = Reader(str(path), Path(path).parent, os.environ if environ is None else environ)
    return _proxy(reader, document)


def _proxy(reader: Reader, document: object) -> ProxyConfig:
    if not isinstance(document, dict):
        what = "an empty document" if document is None else type_name(document)
        reader.fail((), f"expected a mapping of settings at the top level, got {what}")
    top = reader.section((), document, _TOP_KEYS)
    defaults = ProxyConfig(upstreams=())
    listen = top.with_default("listen", address, defaults.listen)
    admin_listen = top.with_default("admin_listen", address, defaults.admin_listen)
    if addresses_conflict(listen, admin_listen):
        top.fail("admin_listen", f"{admin_listen} conflicts with listen {listen}")
    unknown_hosts = top.with_default(
        "unknown_hosts", one_of(_UNKNOWN_HOSTS), defaults.unknown_hosts
    )
    upstream_configs = upstreams(top)
    check_listen_conflicts(reader, listen, admin_listen, upstream_configs)
    check_host_overlaps(reader, upstream_configs)
    return ProxyConfig(
        upstreams=upstream_configs,
        listen=listen,
        admin_listen=admin_listen,
        unknown_hosts=unknown_hosts,
        tls_intercept=top.optional("tls_intercept", tls_intercept),
        connect_ports=top.with_default("connect_ports", _connect_ports, defaults.connect_ports),
        limits=top.with_default("limits", _limits, defaults.limits),
        log_level=top.with_default("log_level", one_of(_LOG_LEVELS), defaults.log_level),
        log_format=top.with_default("log_format", one_of(_LOG_FORMATS), defaults.log_format),
        access_log=top.with_default("access_log", boolean, defaults.access_log),
        via=top.with_default("via", boolean, defaults.via),
        allow_link_local_targets=top.with_default(
            "allow_link_local_targets", boolean, defaults.allow_link_local_targets
        ),
        shutdown_grace_period=top.with_default(
            "shutdown_grace_period", duration, defaults.shutdown_grace_period
        ),
        token_cache=top.optional("token_cache", token_cache),
        token_endpoint_concurrency=top.with_default(
            "token_endpoint_concurrency", count, defaults.token_endpoint_concurrency
        ),
        source=reader.config_file,
    )


def _connect_ports(reader: Reader, path: KeyPath, value: object) -> tuple[int, ...]:
    if not isinstance(value, list):
        reader.fail(path, f"expected a list of port numbers, got {type_name(value)}")
    ports = [
        integer(reader, (*path, f"[{index}]"), item, minimum=1, maximum=65535)
        for index, item in enumerate(value)
    ]
    return tuple(dict.fromkeys(ports))


def _limits(reader: Reader, path: KeyPath, value: object) -> LimitsConfig:
    section = reader.section(path, value, _LIMIT_KEYS)
    defaults = LimitsConfig()

    def optional_size(reader: Reader, path: KeyPath, value: object) -> int | None:
        return None if value is None else size(reader, path, value)

    return LimitsConfig(
        max_request_line=section.with_default("max_request_line", size, defaults.max_request_line),
        max_header_size=section.with_default("max_header_size", size, defaults.max_header_size),
        max_headers=section.with_default("max_headers", count, defaults.max_headers),
        max_body_size=section.with_default("max_body_size", optional_size, defaults.max_body_size),
        header_timeout=section.with_default("header_timeout", duration, defaults.header_timeout),
        idle_timeout=section.with_default("idle_timeout", duration, defaults.idle_timeout),
        tunnel_idle_timeout=section.with_default(
            "tunnel_idle_timeout", duration, defaults.tunnel_idle_timeout
        ),
        max_connections=section.with_default("max_connections", count, defaults.max_connections),
        admin_max_connections=section.with_default(
            "admin_max_connections", count, defaults.admin_max_connections
        ),
    )


def short_secret_warnings(config: ProxyConfig) -> list[str]:
    """One line per upstream whose client secret is shorter than `MIN_SECRET_LENGTH`.

    Not errors: the authorization server decides what it accepts. The lines name the
    key, never the secret or its length. A secret file is read as a fetch reads it.
    """
    warnings = []
    for upstream in config.upstreams:
        token = upstream.token
        if token.auth_method not in ("client_secret_basic", "client_secret_post"):
            continue
        if token.client_secret_file is not None:
            key = "client_secret_file"
            try:
                secret = token.client_secret_file.read_text(encoding="utf-8").rstrip("\r\n")
            except (OSError, UnicodeDecodeError):
                continue  # the fetch reports it
        elif token.client_secret is not None:
            key, secret = "client_secret", token.client_secret.reveal()
        else:
            continue
        if len(secret) < MIN_SECRET_LENGTH:
            warnings.append(
                f"{config.source}: upstreams.{upstream.name}.token.{key}: the client secret is "
                f"shorter than {MIN_SECRET_LENGTH} characters, which is easy to guess"
            )
    return warnings
