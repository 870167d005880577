"""Token sections (`upstreams.<name>.token`): how one upstream's token is obtained.

Owns the token endpoint (`token_url` or `issuer`), the client authentication method
and the credentials each method takes (RFC 7591 §2: exactly its own), the secrets and
keys (checked at load, re-read at every fetch), the request parameters (`scope`,
`audience`, `resource`, `extra_params`), the timing (refresh margin, default lifetime,
timeouts, backoff) and whether the token goes into the fleet cache (`cache`).
"""

from __future__ import annotations

import re
import typing
import urllib.parse
from pathlib import Path

from proxy.config.keys import UnusableKey, parse_signing_key
from proxy.config.model import AuthMethod, TlsClientConfig, TokenCacheMode, TokenConfig
from proxy.config.scalars import duration, one_of
from proxy.config.source import (
    MISSING,
    KeyPath,
    Read,
    Reader,
    Section,
    key_segment,
    show,
    type_name,
    yaml_keys,
)
from proxy.config.tls import TLS_KEYS, tls_client
from proxy.config.urls import endpoint_url

__all__ = ["TOKEN_KEYS", "private_key_file", "token"]

TOKEN_KEYS = yaml_keys(TokenConfig, expand={"tls": TLS_KEYS})
_AUTH_METHODS: tuple[AuthMethod, ...] = typing.get_args(AuthMethod)
_CACHE_MODES: tuple[TokenCacheMode, ...] = typing.get_args(TokenCacheMode)
# RFC 6749 §3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E )
_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")
_PROXY_OWNED_PARAMS = ("grant_type", "client_id", "client_secret", "scope")


def token(allow_insecure_http: bool) -> Read[TokenConfig]:
    """A read of one upstream's `token` section."""

    def read(reader: Reader, path: KeyPath, value: object) -> TokenConfig:
        return _token(reader.section(path, value, TOKEN_KEYS), allow_insecure_http)

    return read


def _token(section: Section, allow_insecure_http: bool) -> TokenConfig:
    endpoint = endpoint_url(allow_insecure_http)
    token_url = section.optional("token_url", endpoint)
    issuer = section.optional("issuer", endpoint)
    if token_url is None and issuer is None:
        section.fail("token_url", "missing (set token_url or issuer)")
    if token_url is not None and issuer is not None:
        section.fail("issuer", "set either token_url or issuer, not both")
    client_id = section.required("client_id", Reader.string)
    client_secret = section.optional("client_secret", Reader.secret)
    client_secret_file = section.optional("client_secret_file", Reader.secret_file)
    key_file = section.optional("private_key_file", private_key_file)
    client_assertion_file = section.optional("client_assertion_file", Reader.secret_file)
    key_id = section.optional("key_id", Reader.string)
    tls = tls_client(section)
    default_method: AuthMethod = (
        "private_key_jwt"
        if key_file is not None or client_assertion_file is not None
        else "client_secret_basic"
    )
    auth_method = section.with_default("auth_method", one_of(_AUTH_METHODS), default_method)
    _check_auth_method(section, auth_method, tls)
    defaults = TokenConfig(client_id=client_id)
    retry_initial = section.with_default("retry_initial", duration, defaults.retry_initial)
    retry_max = section.with_default("retry_max", duration, defaults.retry_max)
    if retry_max < retry_initial:
        section.fail("retry_max", "must not be less than retry_initial")
    return TokenConfig(
        client_id=client_id,
        token_url=token_url,
        issuer=issuer,
        auth_method=auth_method,
        client_secret=client_secret,
        client_secret_file=client_secret_file,
        private_key_file=key_file,
        key_id=key_id,
        client_assertion_file=client_assertion_file,
        scope=section.with_default("scope", _scope, ()),
        audience=section.optional("audience", Reader.string),
        resource=section.with_default("resource", _resource, ()),
        extra_params=_extra_params(section),
        refresh_before_expiry=section.optional("refresh_before_expiry", _refresh_before_expiry),
        default_lifetime=section.with_default(
            "default_lifetime", duration, defaults.default_lifetime
        ),
        timeout=section.with_default("timeout", duration, defaults.timeout),
        connect_timeout=section.with_default("connect_timeout", duration, defaults.connect_timeout),
        retry_initial=retry_initial,
        retry_max=retry_max,
        tls=tls,
        cache=section.with_default("cache", one_of(_CACHE_MODES), defaults.cache),
    )


def _check_auth_method(section: Section, method: AuthMethod, tls: TlsClientConfig) -> None:
    """Each client authentication method takes exactly its own credentials (RFC 7591 §2)."""

    def present(key: str) -> bool:
        return key in section

    def not_used_with(key: str) -> None:
        if present(key):
            section.fail(key, f"not used with auth_method {method}")

    if method in ("client_secret_basic", "client_secret_post"):
        if present("client_secret") and present("client_secret_file"):
            section.fail(
                "client_secret_file", "set either client_secret or client_secret_file, not both"
            )
        if not present("client_secret") and not present("client_secret_file"):
            section.fail(
                "client_secret",
                f"missing (auth_method {method} needs client_secret or client_secret_file)",
            )
        for key in ("private_key_file", "client_assertion_file", "key_id"):
            not_used_with(key)
    elif method == "private_key_jwt":
        for key in ("client_secret", "client_secret_file"):
            not_used_with(key)
        if present("private_key_file") and present("client_assertion_file"):
            section.fail(
                "client_assertion_file",
                "set either private_key_file or client_assertion_file, not both",
            )
        if not present("private_key_file") and not present("client_assertion_file"):
            section.fail(
                "private_key_file",
                "missing (auth_method private_key_jwt needs private_key_file or "
                "client_assertion_file)",
            )
        if present("key_id") and not present("private_key_file"):
            section.fail("key_id", "only used with private_key_file")
    else:  # tls_client_auth (RFC 8705 §2.1): the client certificate is the credential
        for key in (
            "client_secret",
            "client_secret_file",
            "private_key_file",
            "client_assertion_file",
            "key_id",
        ):
            not_used_with(key)
        for key, file_path in (
            ("client_cert_file", tls.client_cert_file),
            ("client_key_file", tls.client_key_file),
        ):
            if file_path is None:
                section.fail(key, "missing (auth_method tls_client_auth needs it)")


def private_key_file(reader: Reader, path: KeyPath, value: object) -> Path:
    """A key file the signer can use (`proxy.config.keys`): checked now, re-read at use."""
    file_path = reader.file(path, value)
    try:
        parse_signing_key(reader.read_file(path, file_path))
    except UnusableKey as error:
        reader.fail(path, str(error))
    return file_path


def _refresh_before_expiry(reader: Reader, path: KeyPath, value: object) -> float | None:
    return None if value is None else duration(reader, path, value, allow_zero=True)


def _scope(reader: Reader, path: KeyPath, value: object) -> tuple[str, ...]:
    scopes = reader.string_list(path, value, split=True)
    for scope in scopes:
        if not _SCOPE_TOKEN.fullmatch(scope):
            reader.fail(path, f"scope {show(scope)} has characters RFC 6749 §3.3 does not allow")
    return scopes


def _resource(reader: Reader, path: KeyPath, value: object) -> tuple[str, ...]:
    resources = reader.string_list(path, value, split=False)
    for resource in resources:
        # RFC 8707 §2: an absolute URI without a fragment.
        try:
            scheme = urllib.parse.urlsplit(resource).scheme
        except ValueError:
            scheme = ""
        if not scheme or "#" in resource:
            reader.fail(path, f"{show(resource)} must be an absolute URI without a fragment")
    return resources


def _extra_params(section: Section) -> tuple[tuple[str, str], ...]:
    value = section.get("extra_params")
    if value is MISSING:
        return ()
    reader = section.reader
    path = section.key_path("extra_params")
    if not isinstance(value, dict):
        reader.fail(
            path, f"expected a mapping of parameter names to values, got {type_name(value)}"
        )
    params = []
    for name, param in value.items():
        param_path = (*path, key_segment(name))
        if not isinstance(name, str) or not name:
            reader.fail(param_path, "parameter names must be non-empty strings")
        if name in _PROXY_OWNED_PARAMS or name.startswith("client_assertion"):
            reader.fail(param_path, f"{name} is set by the proxy and cannot be overridden")
        if name in ("audience", "resource") and name in section:
            reader.fail(param_path, f"conflicts with token.{name}")
        if isinstance(param, bool):
            text = "true" if param else "false"
        elif isinstance(param, int | float):
            text = str(param)
        elif isinstance(param, str):
            text = reader.expand(param_path, param)
        else:
            reader.fail(
                param_path,
                f"expected a string, number or boolean, got {type_name(param)}",
            )
        params.append((name, text))
    return tuple(params)
