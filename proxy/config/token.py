"""Token sections (`upstreams.<name>.token`): how one upstream's token is obtained.

Owns the token endpoint (`token_url` or `issuer`), the grant (`grant`: client
credentials, RFC 8693 token exchange, RFC 7523 JWT bearer) and the inputs each grant
takes (exactly its own), the client authentication method and the credentials each
method takes (RFC 7591 §2: exactly its own), the secrets, tokens and keys (checked at
load, re-read at every fetch), the request parameters (`scope`, `audience`,
`resource`, `extra_params`), the timing (refresh margin, default lifetime, timeouts,
backoff) and whether the token goes into the fleet cache (`cache`).
"""

from __future__ import annotations

import re
import typing
import urllib.parse
from pathlib import Path

from proxy.config.keys import UnusableKey, parse_dpop_key, parse_signing_key
from proxy.config.model import (
    TOKEN_TYPE_ACCESS_TOKEN,
    TOKEN_TYPE_JWT,
    AuthMethod,
    DpopAlgorithm,
    DpopConfig,
    GrantName,
    TlsClientConfig,
    TokenCacheMode,
    TokenConfig,
)
from proxy.config.scalars import duration, one_of
from proxy.config.source import (
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
_GRANTS: tuple[GrantName, ...] = typing.get_args(GrantName)
_DPOP_KEYS = yaml_keys(DpopConfig)
_DPOP_ALGORITHMS: tuple[DpopAlgorithm, ...] = typing.get_args(DpopAlgorithm)
# The keys of each grant beyond client credentials; every other grant refuses them.
_GRANT_KEYS: dict[GrantName, tuple[str, ...]] = {
    "client_credentials": (),
    "token_exchange": (
        "subject_token_file",
        "subject_token_type",
        "actor_token_file",
        "actor_token_type",
        "requested_token_type",
    ),
    "jwt_bearer": ("assertion_file",),
}
# Only these are sent as bearer tokens (RFC 8693 §3), so only these may be requested.
_INJECTABLE_TOKEN_TYPES = (TOKEN_TYPE_ACCESS_TOKEN, TOKEN_TYPE_JWT)
# RFC 6749 §3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E )
_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")
_PROXY_OWNED_PARAMS = (
    "grant_type",
    "client_id",
    "client_secret",
    "scope",
    # RFC 8693 §2.1 and RFC 7523 §2.1: the grants' own parameters.
    "subject_token",
    "subject_token_type",
    "actor_token",
    "actor_token_type",
    "requested_token_type",
    "assertion",
)


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
    default_grant: GrantName = "client_credentials"
    grant = section.with_default("grant", one_of(_GRANTS), default_grant)
    client_secret = section.optional("client_secret", Reader.secret)
    client_secret_file = section.optional("client_secret_file", Reader.secret_file)
    key_file = section.optional("private_key_file", private_key_file)
    client_assertion_file = section.optional("client_assertion_file", Reader.secret_file)
    key_id = section.optional("key_id", Reader.string)
    tls = tls_client(section)
    auth_method = section.with_default(
        "auth_method", one_of(_AUTH_METHODS), _default_auth_method(section, grant)
    )
    if grant == "token_exchange" and auth_method == "none":
        # RFC 8693 §2.1: whether an unidentified client may exchange is the server's call.
        client_id = section.with_default("client_id", Reader.string, "")
    else:
        client_id = section.required("client_id", Reader.string)
    _check_grant(section, grant, auth_method)
    _check_auth_method(section, auth_method, tls, grant)
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
        grant=grant,
        subject_token_file=section.optional("subject_token_file", Reader.secret_file),
        subject_token_type=section.with_default(
            "subject_token_type", _token_type, defaults.subject_token_type
        ),
        actor_token_file=section.optional("actor_token_file", Reader.secret_file),
        actor_token_type=section.optional("actor_token_type", _token_type),
        requested_token_type=section.optional("requested_token_type", _requested_token_type),
        assertion_file=section.optional("assertion_file", Reader.secret_file),
        dpop=section.optional("dpop", _dpop),
    )


def _default_auth_method(section: Section, grant: GrantName) -> AuthMethod:
    """The method the credentials present imply; `none` for a grant that needs none."""
    if grant == "client_credentials":
        if "private_key_file" in section or "client_assertion_file" in section:
            return "private_key_jwt"
        return "client_secret_basic"
    if "client_secret" in section or "client_secret_file" in section:
        return "client_secret_basic"
    # jwt_bearer's private_key_file signs the grant's assertion, not a client assertion.
    if grant == "token_exchange" and (
        "client_assertion_file" in section or "private_key_file" in section
    ):
        return "private_key_jwt"
    return "none"


def _check_grant(section: Section, grant: GrantName, method: AuthMethod) -> None:
    """Each grant takes exactly its own inputs (RFC 8693 §2.1, RFC 7523 §2.1)."""
    for other, keys in _GRANT_KEYS.items():
        if other != grant:
            for key in keys:
                if key in section:
                    section.fail(key, f"not used with grant {grant}")
    if grant == "client_credentials":
        if method == "none":
            section.fail(
                "auth_method",
                "none is only allowed with grant token_exchange or jwt_bearer: the client "
                "credentials grant is the client's authentication",
            )
    elif grant == "token_exchange":
        if "subject_token_file" not in section:
            section.fail("subject_token_file", "missing (grant token_exchange needs it)")
        if "actor_token_file" in section and "actor_token_type" not in section:
            section.fail(
                "actor_token_type", "missing (set both actor_token_file and it, or neither)"
            )
        if "actor_token_type" in section and "actor_token_file" not in section:
            section.fail(
                "actor_token_file", "missing (set both actor_token_type and it, or neither)"
            )
    else:  # jwt_bearer
        if "client_assertion_file" in section:
            section.fail(
                "client_assertion_file",
                "not used with grant jwt_bearer (its assertion is assertion_file)",
            )
        if method == "private_key_jwt":
            section.fail(
                "auth_method",
                "private_key_jwt is not used with grant jwt_bearer: private_key_file signs the "
                "grant's assertion; authenticate the client with a secret, a certificate or none",
            )
        if "assertion_file" in section and "private_key_file" in section:
            section.fail(
                "assertion_file", "set either assertion_file or private_key_file, not both"
            )
        if "assertion_file" not in section and "private_key_file" not in section:
            section.fail(
                "assertion_file",
                "missing (grant jwt_bearer needs assertion_file or private_key_file)",
            )
        if "key_id" in section and "private_key_file" not in section:
            section.fail("key_id", "only used with private_key_file")


def _token_type(reader: Reader, path: KeyPath, value: object) -> str:
    """An RFC 8693 §3 token type identifier: an absolute URI."""
    text = reader.string(path, value).strip()
    try:
        scheme = urllib.parse.urlsplit(text).scheme
    except ValueError:
        scheme = ""
    if not scheme or any(not "\x21" <= char <= "\x7e" for char in text):
        reader.fail(
            path,
            f"{show(text)} is not a token type URI (e.g. {TOKEN_TYPE_JWT}, RFC 8693 §3)",
        )
    return text


def _requested_token_type(reader: Reader, path: KeyPath, value: object) -> str:
    text = _token_type(reader, path, value)
    if text not in _INJECTABLE_TOKEN_TYPES:
        reader.fail(
            path,
            f"{show(text)} cannot be sent as a bearer token: request "
            f"{' or '.join(_INJECTABLE_TOKEN_TYPES)}",
        )
    return text


def _check_auth_method(
    section: Section, method: AuthMethod, tls: TlsClientConfig, grant: GrantName
) -> None:
    """Each client authentication method takes exactly its own credentials (RFC 7591 §2).

    With grant jwt_bearer, `private_key_file` and `key_id` belong to the grant.
    """
    grant_owned = ("private_key_file", "key_id") if grant == "jwt_bearer" else ()

    def present(key: str) -> bool:
        return key in section and key not in grant_owned

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
    else:  # none, or tls_client_auth (RFC 8705 §2.1): the client certificate is the credential
        for key in (
            "client_secret",
            "client_secret_file",
            "private_key_file",
            "client_assertion_file",
            "key_id",
        ):
            not_used_with(key)
    if method == "tls_client_auth":
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


def _dpop(reader: Reader, path: KeyPath, value: object) -> DpopConfig:
    """The `dpop` section: the proof key's algorithm, and its file if not generated."""
    if value is None:
        reader.fail(
            path,
            "expected a mapping, got null (write dpop: {} for a key generated at start-up, "
            "or remove the key)",
        )
    section = reader.section(path, value, _DPOP_KEYS)
    defaults = DpopConfig()
    alg = section.with_default("alg", one_of(_DPOP_ALGORITHMS), defaults.alg)
    key_file = section.optional("key_file", Reader.file)
    if key_file is not None:
        try:
            parse_dpop_key(reader.read_file(section.key_path("key_file"), key_file), alg)
        except UnusableKey as error:
            section.fail("key_file", str(error))
    return DpopConfig(key_file=key_file, alg=alg)


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
    value = section.mapping("extra_params", "parameter names to values")
    if value is None:
        return ()
    reader = section.reader
    path = section.key_path("extra_params")
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
