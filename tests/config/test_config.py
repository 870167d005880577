"""Tests for `proxy.config`: what loads, what is refused, and how the refusal reads.

Every refusal is checked for the exact file, key path and problem, because that one
line is all an operator sees when the sidecar will not start. Secrets must never be
in a message or in `repr(config)`.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config import (
    Address,
    ConfigError,
    HostMatch,
    LimitsConfig,
    MatchConfig,
    ProxyConfig,
    Secret,
    TargetUrl,
    TlsClientConfig,
    TlsInterceptConfig,
    TokenConfig,
    UpstreamConfig,
    load_config,
    parse_duration,
)

SECRET = "hunter2-Sup3r-Secret-Value"
ENV = {"CLIENT_SECRET": SECRET, "ORDER_CLIENT": "order-service", "EMPTY": ""}
DELETE = object()


def _pem(key: Any, password: bytes | None = None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.NoEncryption()
        if password is None
        else serialization.BestAvailableEncryption(password)
    )
    data: bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    return data


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory of the files configs refer to; `FILES/x` in a config names `files/x`."""
    directory = tmp_path_factory.mktemp("files")
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    contents = {
        "client-secret": SECRET.encode() + b"\n",
        "assertion.jwt": b"eyJhbGciOiJSUzI1NiJ9.e30.c2ln",
        "empty": b"  \n",
        "rsa.pem": _pem(rsa_key),
        "ec.pem": _pem(ec.generate_private_key(ec.SECP256R1())),
        "ec384.pem": _pem(ec.generate_private_key(ec.SECP384R1())),
        "rsa1024.pem": _pem(rsa.generate_private_key(public_exponent=65537, key_size=1024)),
        "ed25519.pem": _pem(ed25519.Ed25519PrivateKey.generate()),
        "encrypted.pem": _pem(rsa_key, password=b"pw"),
        # A "key" file that holds the secret: its content must never reach a message.
        "secret-not-a-key.pem": SECRET.encode(),
        "client.crt": b"-----BEGIN CERTIFICATE-----\n",
        "client.key": b"-----BEGIN PRIVATE KEY-----\n",
        "ca.crt": b"-----BEGIN CERTIFICATE-----\n",
        "ca.key": b"-----BEGIN PRIVATE KEY-----\n",
        "inventory-ca.pem": b"-----BEGIN CERTIFICATE-----\n",
    }
    for name, data in contents.items():
        (directory / name).write_bytes(data)
    (directory / "subdir").mkdir()
    return directory


def base_config() -> dict[str, Any]:
    """The smallest valid config with one upstream; cases edit a copy of it."""
    return {
        "upstreams": {
            "inventory": {
                "match": {"hosts": ["inventory.internal"]},
                "token": {
                    "token_url": "https://auth.example.com/oauth/token",
                    "client_id": "order-service",
                    "client_secret_file": "FILES/client-secret",
                },
            }
        }
    }


def _resolve_files(value: Any, files: Path) -> Any:
    if isinstance(value, str):
        return value.replace("FILES/", f"{files}/")
    if isinstance(value, list):
        return [_resolve_files(item, files) for item in value]
    if isinstance(value, dict):
        return {key: _resolve_files(item, files) for key, item in value.items()}
    return value


def edited(edits: dict[str, object]) -> dict[str, Any]:
    """`base_config()` with `dotted.path: value` edits applied (`DELETE` removes a key)."""
    document = base_config()
    for dotted, value in edits.items():
        *parents, last = dotted.split(".")
        node = document
        for part in parents:
            node = node.setdefault(part, {})
        if value is DELETE:
            del node[last]
        else:
            node[last] = copy.deepcopy(value)
    return document


def write(directory: Path, document: object, files: Path, name: str = "proxy.yaml") -> Path:
    path = directory / name
    text = yaml.safe_dump(_resolve_files(document, files), sort_keys=False)
    path.write_text(text, encoding="utf-8")
    return path


UP = "upstreams.inventory"
TOKEN = "upstreams.inventory.token"
SECOND_UPSTREAM = {
    "match": {"hosts": ["billing.internal"]},
    "token": {
        "token_url": "https://auth.example.com/oauth/token",
        "client_id": "order-service",
        "client_secret": "${CLIENT_SECRET}",
    },
}


def second(**changes: object) -> dict[str, Any]:
    upstream = copy.deepcopy(SECOND_UPSTREAM)
    upstream.update(changes)
    return upstream


@dataclass(frozen=True)
class Case:
    id: str
    edits: dict[str, object]
    key_path: str
    problem: str


CASES = [
    # -- unknown keys, with and without a suggestion --
    Case(
        "unknown-top-key", {"lissen": "127.0.0.1:1"}, "lissen", "unknown key (did you mean listen?)"
    ),
    Case(
        "unknown-token-key",
        {f"{TOKEN}.tokn_url": "https://x.example"},
        f"{TOKEN}.tokn_url",
        "unknown key (did you mean token_url?)",
    ),
    Case(
        "unknown-match-key-no-suggestion",
        {f"{UP}.match.zzz": 1},
        f"{UP}.match.zzz",
        "unknown key (expected one of: hosts, path_prefix)",
    ),
    Case(
        "unknown-limits-key",
        {"limits.max_body": 10},
        "limits.max_body",
        "unknown key (did you mean max_body_size?)",
    ),
    # -- missing fields --
    Case("missing-client-id", {f"{TOKEN}.client_id": DELETE}, f"{TOKEN}.client_id", "missing"),
    Case("missing-match", {f"{UP}.match": DELETE}, f"{UP}.match", "missing"),
    Case("missing-hosts", {f"{UP}.match.hosts": DELETE}, f"{UP}.match.hosts", "missing"),
    Case("missing-token", {f"{UP}.token": DELETE}, f"{UP}.token", "missing"),
    Case("empty-client-id", {f"{TOKEN}.client_id": " "}, f"{TOKEN}.client_id", "must not be empty"),
    # -- wrong types --
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
        "string-expected",
        {f"{TOKEN}.client_id": 123},
        f"{TOKEN}.client_id",
        "expected a string, got an integer",
    ),
    Case(
        "mapping-expected", {f"{UP}.match": ["a"]}, f"{UP}.match", "expected a mapping, got a list"
    ),
    Case(
        "hosts-as-string",
        {f"{UP}.match.hosts": "inventory.internal"},
        f"{UP}.match.hosts",
        "expected a list of hosts, got a string (write [host] for one host)",
    ),
    Case(
        "hosts-empty",
        {f"{UP}.match.hosts": []},
        f"{UP}.match.hosts",
        "must list at least one host",
    ),
    Case(
        "upstreams-as-list",
        {"upstreams": ["inventory"]},
        "upstreams",
        "expected a mapping of upstream names to upstreams, got a list",
    ),
    Case(
        "listen-as-int",
        {"listen": 8080},
        "listen",
        "expected a string, got an integer",
    ),
    Case(
        "scope-as-mapping",
        {f"{TOKEN}.scope": {"a": 1}},
        f"{TOKEN}.scope",
        "expected a string or a list of strings, got a mapping",
    ),
    Case(
        "extra-param-nested",
        {f"{TOKEN}.extra_params": {"x": [1]}},
        f"{TOKEN}.extra_params.x",
        "expected a string, number or boolean, got a list",
    ),
    Case(
        "null-timeout",
        {f"{UP}.timeout": None},
        f"{UP}.timeout",
        "expected a duration like 90s, 5m or 1h, got null",
    ),
    # -- durations and sizes --
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
        "zero-grace",
        {"shutdown_grace_period": 0},
        "shutdown_grace_period",
        "must be greater than 0",
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
        "retry-max-below-initial",
        {f"{TOKEN}.retry_initial": "10s", f"{TOKEN}.retry_max": "5s"},
        f"{TOKEN}.retry_max",
        "must not be less than retry_initial",
    ),
    # -- enums --
    Case(
        "bad-unknown-hosts",
        {"unknown_hosts": "reject"},
        "unknown_hosts",
        "'reject': must be one of passthrough, deny",
    ),
    Case(
        "log-level-typo",
        {"log_level": "warn"},
        "log_level",
        "'warn': must be one of debug, info, warning, error (did you mean warning?)",
    ),
    Case(
        "auth-method-typo",
        {f"{TOKEN}.auth_method": "client_secret_basci"},
        f"{TOKEN}.auth_method",
        "'client_secret_basci': must be one of client_secret_basic, client_secret_post, "
        "private_key_jwt, tls_client_auth (did you mean client_secret_basic?)",
    ),
    # -- ${VAR} expansion --
    Case(
        "unset-var",
        {f"{TOKEN}.client_id": "${NOPE}"},
        f"{TOKEN}.client_id",
        "environment variable NOPE is not set",
    ),
    Case(
        "unset-var-in-list",
        {f"{UP}.match.hosts": ["a.internal", "${HOST_B}"]},
        f"{UP}.match.hosts[1]",
        "environment variable HOST_B is not set",
    ),
    Case(
        "unset-var-in-secret",
        {f"{TOKEN}.client_secret_file": DELETE, f"{TOKEN}.client_secret": "${OTHER_SECRET}"},
        f"{TOKEN}.client_secret",
        "environment variable OTHER_SECRET is not set",
    ),
    Case(
        "malformed-var",
        {f"{TOKEN}.client_id": "${1X}"},
        f"{TOKEN}.client_id",
        "malformed ${...}: expected ${NAME} (write $${ for a literal ${)",
    ),
    Case(
        "var-expands-to-empty",
        {f"{TOKEN}.client_id": "${EMPTY}"},
        f"{TOKEN}.client_id",
        "must not be empty",
    ),
    # -- files --
    Case(
        "missing-secret-file",
        {f"{TOKEN}.client_secret_file": "FILES/nope"},
        f"{TOKEN}.client_secret_file",
        "file does not exist",
    ),
    Case(
        "secret-file-is-dir",
        {f"{TOKEN}.client_secret_file": "FILES/subdir"},
        f"{TOKEN}.client_secret_file",
        "file is a directory",
    ),
    Case(
        "empty-secret-file",
        {f"{TOKEN}.client_secret_file": "FILES/empty"},
        f"{TOKEN}.client_secret_file",
        "file is empty",
    ),
    Case(
        "missing-ca-file-named",
        {f"{UP}.ca_file": "FILES/nope.pem"},
        f"{UP}.ca_file",
        "file 'FILES/nope.pem' does not exist",
    ),
    Case(
        "missing-assertion-file",
        {
            f"{TOKEN}.client_secret_file": DELETE,
            f"{TOKEN}.client_assertion_file": "FILES/nope.jwt",
        },
        f"{TOKEN}.client_assertion_file",
        "file does not exist",
    ),
    Case(
        "client-key-without-cert",
        {f"{UP}.client_key_file": "FILES/client.key"},
        f"{UP}.client_cert_file",
        "missing (client_key_file needs it)",
    ),
    Case(
        "intercept-cert-without-key",
        {"tls_intercept": {"ca_cert_file": "FILES/ca.crt"}},
        "tls_intercept.ca_key_file",
        "missing (give both ca_cert_file and ca_key_file, or neither to generate a CA)",
    ),
    Case(
        "intercept-output-dir-missing",
        {"tls_intercept": {"write_ca_cert_to": "FILES/no-such-dir/ca.crt"}},
        "tls_intercept.write_ca_cert_to",
        "directory 'FILES/no-such-dir' does not exist",
    ),
    Case(
        "intercept-null",
        {"tls_intercept": None},
        "tls_intercept",
        "expected a mapping, got null (write tls_intercept: {} to intercept with a generated "
        "CA, or remove the key)",
    ),
    # -- token endpoint --
    Case(
        "both-token-url-and-issuer",
        {f"{TOKEN}.issuer": "https://auth.example.com"},
        f"{TOKEN}.issuer",
        "set either token_url or issuer, not both",
    ),
    Case(
        "neither-token-url-nor-issuer",
        {f"{TOKEN}.token_url": DELETE},
        f"{TOKEN}.token_url",
        "missing (set token_url or issuer)",
    ),
    Case(
        "token-url-with-fragment",
        {f"{TOKEN}.token_url": "https://auth.example.com/token#x"},
        f"{TOKEN}.token_url",
        "'https://auth.example.com/token#x': URL must not have a fragment",
    ),
    Case(
        "token-url-with-credentials",
        {f"{TOKEN}.token_url": "https://me:pw@auth.example.com/token"},
        f"{TOKEN}.token_url",
        "URL must not contain credentials (user:password@)",
    ),
    Case(
        "token-url-ftp",
        {f"{TOKEN}.token_url": "ftp://auth.example.com/token"},
        f"{TOKEN}.token_url",
        "'ftp://auth.example.com/token': URL scheme must be http or https",
    ),
    # -- client authentication methods --
    Case(
        "basic-without-secret",
        {f"{TOKEN}.client_secret_file": DELETE},
        f"{TOKEN}.client_secret",
        "missing (auth_method client_secret_basic needs client_secret or client_secret_file)",
    ),
    Case(
        "post-with-both-secrets",
        {
            f"{TOKEN}.auth_method": "client_secret_post",
            f"{TOKEN}.client_secret": "${CLIENT_SECRET}",
        },
        f"{TOKEN}.client_secret_file",
        "set either client_secret or client_secret_file, not both",
    ),
    Case(
        "basic-with-private-key",
        {
            f"{TOKEN}.auth_method": "client_secret_basic",
            f"{TOKEN}.private_key_file": "FILES/rsa.pem",
        },
        f"{TOKEN}.private_key_file",
        "not used with auth_method client_secret_basic",
    ),
    Case(
        "private-key-default-method-with-secret",
        {f"{TOKEN}.private_key_file": "FILES/rsa.pem"},
        f"{TOKEN}.client_secret_file",
        "not used with auth_method private_key_jwt",
    ),
    Case(
        "jwt-with-key-and-assertion",
        {
            f"{TOKEN}.client_secret_file": DELETE,
            f"{TOKEN}.private_key_file": "FILES/rsa.pem",
            f"{TOKEN}.client_assertion_file": "FILES/assertion.jwt",
        },
        f"{TOKEN}.client_assertion_file",
        "set either private_key_file or client_assertion_file, not both",
    ),
    Case(
        "jwt-without-key",
        {f"{TOKEN}.client_secret_file": DELETE, f"{TOKEN}.auth_method": "private_key_jwt"},
        f"{TOKEN}.private_key_file",
        "missing (auth_method private_key_jwt needs private_key_file or client_assertion_file)",
    ),
    Case(
        "key-id-with-assertion",
        {
            f"{TOKEN}.client_secret_file": DELETE,
            f"{TOKEN}.client_assertion_file": "FILES/assertion.jwt",
            f"{TOKEN}.key_id": "k1",
        },
        f"{TOKEN}.key_id",
        "only used with private_key_file",
    ),
    Case(
        "tls-client-auth-without-cert",
        {f"{TOKEN}.client_secret_file": DELETE, f"{TOKEN}.auth_method": "tls_client_auth"},
        f"{TOKEN}.client_cert_file",
        "missing (auth_method tls_client_auth needs it)",
    ),
    Case(
        "tls-client-auth-without-key",
        {
            f"{TOKEN}.client_secret_file": DELETE,
            f"{TOKEN}.auth_method": "tls_client_auth",
            f"{TOKEN}.client_cert_file": "FILES/client.crt",
        },
        f"{TOKEN}.client_key_file",
        "missing (auth_method tls_client_auth needs it)",
    ),
    Case(
        "tls-client-auth-with-secret",
        {
            f"{TOKEN}.auth_method": "tls_client_auth",
            f"{TOKEN}.client_cert_file": "FILES/client.crt",
            f"{TOKEN}.client_key_file": "FILES/client.key",
        },
        f"{TOKEN}.client_secret_file",
        "not used with auth_method tls_client_auth",
    ),
    # -- private keys --
    *(
        Case(
            f"private-key-{name}",
            {f"{TOKEN}.client_secret_file": DELETE, f"{TOKEN}.private_key_file": f"FILES/{name}"},
            f"{TOKEN}.private_key_file",
            problem,
        )
        for name, problem in [
            ("ec384.pem", "must be an RSA (RS256) or EC P-256 (ES256) private key"),
            ("ed25519.pem", "must be an RSA (RS256) or EC P-256 (ES256) private key"),
            ("rsa1024.pem", "RSA key is 1024 bits; RS256 needs at least 2048"),
            ("encrypted.pem", "the private key is encrypted; provide an unencrypted PEM key"),
            ("secret-not-a-key.pem", "not a PEM-encoded private key"),
            ("client.crt", "not a PEM-encoded private key"),
        ]
    ),
    # -- match.hosts --
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
    # -- duplicate and overlapping host matches --
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
        "nested-path-prefixes-overlap",
        {
            f"{UP}.match.path_prefix": "/api",
            "upstreams.billing": second(
                match={"hosts": ["inventory.internal"], "path_prefix": "/api/v2/"}
            ),
        },
        "upstreams.billing.match.hosts[0]",
        "inventory.internal of upstream billing overlaps inventory.internal of upstream "
        "inventory, path prefixes /api/v2 and /api: a request would match both",
    ),
    Case(
        "prefix-overlaps-no-prefix",
        {
            "upstreams.billing": second(
                match={"hosts": ["inventory.internal"], "path_prefix": "/billing"}
            ),
        },
        "upstreams.billing.match.hosts[0]",
        "inventory.internal of upstream billing overlaps inventory.internal of upstream "
        "inventory: a request would match both",
    ),
    # -- path_prefix --
    Case(
        "prefix-without-slash",
        {f"{UP}.match.path_prefix": "api"},
        f"{UP}.match.path_prefix",
        "'api' must start with '/'",
    ),
    Case(
        "prefix-with-dotdot",
        {f"{UP}.match.path_prefix": "/api/../admin"},
        f"{UP}.match.path_prefix",
        "'/api/../admin' must not contain '.' or '..' segments",
    ),
    Case(
        "prefix-with-query",
        {f"{UP}.match.path_prefix": "/api?x=1"},
        f"{UP}.match.path_prefix",
        "'/api?x=1' must be a plain path without query or fragment",
    ),
    # -- url --
    Case(
        "url-with-path",
        {f"{UP}.url": "https://inventory.internal/v1"},
        f"{UP}.url",
        "'https://inventory.internal/v1': only scheme, host and port are used; "
        "remove the path/query",
    ),
    Case(
        "url-with-query",
        {f"{UP}.url": "https://inventory.internal/?a=b"},
        f"{UP}.url",
        "'https://inventory.internal/?a=b': only scheme, host and port are used; "
        "remove the path/query",
    ),
    Case(
        "url-with-userinfo",
        {f"{UP}.url": "https://u@inventory.internal"},
        f"{UP}.url",
        "URL must not contain credentials (user:password@)",
    ),
    Case(
        "url-without-host",
        {f"{UP}.url": "https:///x"},
        f"{UP}.url",
        "'https:///x': URL has no host",
    ),
    Case(
        "url-bad-port",
        {f"{UP}.url": "https://inventory.internal:99999"},
        f"{UP}.url",
        "invalid URL 'https://inventory.internal:99999': Port out of range 0-65535",
    ),
    Case(
        "listen-without-url",
        {f"{UP}.listen": "127.0.0.1:18081"},
        f"{UP}.listen",
        "a reverse-proxy listen port needs url (where its requests are sent)",
    ),
    # -- cleartext credentials (RFC 6750 §5.3) --
    Case(
        "insecure-token-url",
        {f"{TOKEN}.token_url": "http://auth.example.com/token"},
        f"{TOKEN}.token_url",
        "'http://auth.example.com/token' sends credentials in cleartext to a non-loopback "
        "host; use https, or set allow_insecure_http: true on the upstream",
    ),
    Case(
        "insecure-issuer",
        {f"{TOKEN}.token_url": DELETE, f"{TOKEN}.issuer": "http://10.0.0.1"},
        f"{TOKEN}.issuer",
        "'http://10.0.0.1' sends credentials in cleartext to a non-loopback host; use https, "
        "or set allow_insecure_http: true on the upstream",
    ),
    Case(
        "insecure-url",
        {f"{UP}.url": "http://inventory.internal"},
        f"{UP}.url",
        "'http://inventory.internal' sends credentials in cleartext to a non-loopback host; "
        "use https, or set allow_insecure_http: true on the upstream",
    ),
    Case(
        "localhost-lookalike-is-not-loopback",
        {f"{UP}.url": "http://localhost.example.com"},
        f"{UP}.url",
        "'http://localhost.example.com' sends credentials in cleartext to a non-loopback "
        "host; use https, or set allow_insecure_http: true on the upstream",
    ),
    # -- listen addresses and port conflicts --
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
    # -- header --
    *(
        Case(f"header-{header}", {f"{UP}.header": header}, f"{UP}.header", problem)
        for header, problem in [
            ("Host", "Host is managed by the proxy and cannot carry the token"),
            ("content-length", "content-length is managed by the proxy and cannot carry the token"),
            (
                "Transfer-Encoding",
                "Transfer-Encoding is managed by the proxy and cannot carry the token",
            ),
            ("Connection", "Connection is managed by the proxy and cannot carry the token"),
            ("Upgrade", "Upgrade is managed by the proxy and cannot carry the token"),
            ("X Token", "'X Token' is not a valid HTTP header name"),
            ("X-Token:", "'X-Token:' is not a valid HTTP header name"),
        ]
    ),
    # -- upstream names --
    Case(
        "bad-upstream-name",
        {"upstreams.bad name!": SECOND_UPSTREAM},
        "upstreams.bad name!",
        "invalid upstream name: use letters, digits, '_', '.' and '-' only "
        "(it becomes a metric label)",
    ),
    Case(
        "reserved-upstream-name",
        {"upstreams.unmatched": SECOND_UPSTREAM},
        "upstreams.unmatched",
        "'unmatched' is reserved (the label of unmatched requests)",
    ),
    # -- token parameters --
    Case(
        "extra-params-override-grant-type",
        {f"{TOKEN}.extra_params": {"grant_type": "password"}},
        f"{TOKEN}.extra_params.grant_type",
        "grant_type is set by the proxy and cannot be overridden",
    ),
    Case(
        "extra-params-override-assertion-type",
        {f"{TOKEN}.extra_params": {"client_assertion_type": "x"}},
        f"{TOKEN}.extra_params.client_assertion_type",
        "client_assertion_type is set by the proxy and cannot be overridden",
    ),
    Case(
        "extra-params-override-scope",
        {f"{TOKEN}.extra_params": {"scope": "x"}},
        f"{TOKEN}.extra_params.scope",
        "scope is set by the proxy and cannot be overridden",
    ),
    Case(
        "extra-params-duplicate-audience",
        {f"{TOKEN}.audience": "https://a.example", f"{TOKEN}.extra_params": {"audience": "b"}},
        f"{TOKEN}.extra_params.audience",
        "conflicts with token.audience",
    ),
    Case(
        "scope-with-quote",
        {f"{TOKEN}.scope": ['read"all']},
        f"{TOKEN}.scope",
        "scope 'read\"all' has characters RFC 6749 §3.3 does not allow",
    ),
    Case(
        "scope-list-item-not-string",
        {f"{TOKEN}.scope": ["read", 5]},
        f"{TOKEN}.scope[1]",
        "expected a string, got an integer",
    ),
    Case(
        "relative-resource",
        {f"{TOKEN}.resource": "inventory"},
        f"{TOKEN}.resource",
        "'inventory' must be an absolute URI without a fragment",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_each_problem_names_file_key_path_and_problem(
    case: Case, tmp_path: Path, files: Path
) -> None:
    path = write(tmp_path, edited(case.edits), files)
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ=ENV)
    error = caught.value
    expected_problem = case.problem.replace("FILES/", f"{files}/").replace("FILES", str(files))
    assert (error.file, error.key_path, error.problem) == (
        str(path),
        case.key_path,
        expected_problem,
    )
    assert str(error) == f"{path}: {case.key_path}: {expected_problem}"
    assert SECRET not in str(error)


def test_message_format_matches_the_contract(
    tmp_path: Path, files: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path, edited({f"{TOKEN}.client_id": DELETE}), files)
    monkeypatch.chdir(tmp_path)  # the file is named as the operator named it
    with pytest.raises(ConfigError) as caught:
        load_config("proxy.yaml")
    assert str(caught.value) == "proxy.yaml: upstreams.inventory.token.client_id: missing"


RAW_CASES = [
    (
        "syntax-error",
        "listen: 127.0.0.1:1\nupstreams: [a, b\nlog_level: info\n",
        "invalid YAML at line 3, column 10: expected ',' or ']', but got ':'",
    ),
    (
        "tab-indentation",
        "limits:\n\tmax_headers: 5\n",
        "invalid YAML at line 2, column 1: found character '\\t' that cannot start any token",
    ),
    (
        "duplicate-key",
        "log_level: info\nlog_level: debug\n",
        "invalid YAML at line 2, column 1: duplicate key 'log_level'",
    ),
    ("list-document", "- listen\n- admin_listen\n", None),
    ("scalar-document", "hello\n", None),
    ("empty-document", "", None),
    (
        "bad-date",
        "log_level: 2024-13-45\n",
        "invalid YAML: a value could not be read (an invalid date or !!tag?)",
    ),
    (
        "python-tag",
        "listen: !!python/object/apply:os.system [echo]\n",
        "invalid YAML at line 1, column 9: could not determine a constructor for the tag "
        "'tag:yaml.org,2002:python/object/apply:os.system'",
    ),
    (
        "nul-byte",
        "listen: \x00\n",
        "invalid YAML at position 8: special characters are not allowed",
    ),
]
NON_MAPPING = {
    "list-document": "expected a mapping of settings at the top level, got a list",
    "scalar-document": "expected a mapping of settings at the top level, got a string",
    "empty-document": "expected a mapping of settings at the top level, got an empty document",
}


@pytest.mark.parametrize(
    ("text", "problem"), [c[1:] for c in RAW_CASES], ids=[c[0] for c in RAW_CASES]
)
def test_unparseable_documents(text: str, problem: str | None, tmp_path: Path) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text(text, encoding="utf-8")
    case_id = next(case[0] for case in RAW_CASES if case[1] == text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.file == str(path)
    assert caught.value.key_path == ""
    assert caught.value.problem == (problem or NON_MAPPING[case_id])
    assert str(caught.value) == f"{path}: {caught.value.problem}"


def test_missing_and_unreadable_config_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as missing:
        load_config(tmp_path / "nope.yaml")
    assert str(missing.value) == (
        f"{tmp_path}/nope.yaml: cannot read the config file: No such file or directory"
    )
    with pytest.raises(ConfigError) as directory:
        load_config(tmp_path)
    assert str(directory.value) == f"{tmp_path}: cannot read the config file: Is a directory"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read a file without permissions")
def test_unreadable_secret_file(tmp_path: Path, files: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s")
    secret.chmod(0)
    path = write(tmp_path, edited({f"{TOKEN}.client_secret_file": str(secret)}), files)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert (caught.value.key_path, caught.value.problem) == (
        f"{TOKEN}.client_secret_file",
        "cannot read file: Permission denied",
    )


# -- what does load ------------------------------------------------------------


DESIGN_EXAMPLE = """
listen: 127.0.0.1:15080          # the forward-proxy port (HTTP_PROXY points here)
admin_listen: 0.0.0.0:15090      # /metrics /healthz /readyz /status
unknown_hosts: passthrough       # or: deny (403 for hosts no upstream matches)
tls_intercept:
  ca_cert_file: FILES/ca.crt
  ca_key_file: FILES/ca.key
  write_ca_cert_to: FILES/subdir/token-proxy-ca.crt

upstreams:
  inventory:
    match:
      hosts: [inventory.internal, "inventory.internal:8443"]
      path_prefix: /api
    url: https://inventory.internal
    listen: 127.0.0.1:18081
    header: Authorization
    overwrite: true
    required: true
    ca_file: FILES/inventory-ca.pem
    token:
      token_url: https://auth.example.com/oauth/token
      client_id: order-service
      client_secret_file: FILES/client-secret
      # client_secret: ${INVENTORY_CLIENT_SECRET}
      auth_method: client_secret_basic
      scope: read:inventory write:orders
      audience: https://inventory.internal
      refresh_before_expiry: 5m
"""


def test_the_design_example_loads(tmp_path: Path, files: Path) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text(DESIGN_EXAMPLE.replace("FILES/", f"{files}/"))
    config = load_config(path, environ={})
    assert config == ProxyConfig(
        upstreams=(
            UpstreamConfig(
                name="inventory",
                match=MatchConfig(
                    hosts=(
                        HostMatch("inventory.internal"),
                        HostMatch("inventory.internal", 8443),
                    ),
                    path_prefix="/api",
                ),
                token=TokenConfig(
                    client_id="order-service",
                    token_url="https://auth.example.com/oauth/token",
                    auth_method="client_secret_basic",
                    client_secret_file=files / "client-secret",
                    scope=("read:inventory", "write:orders"),
                    audience="https://inventory.internal",
                    refresh_before_expiry=300.0,
                ),
                url=TargetUrl("https", "inventory.internal", 443),
                listen=Address("127.0.0.1", 18081),
                tls=TlsClientConfig(ca_file=files / "inventory-ca.pem"),
            ),
        ),
        listen=Address("127.0.0.1", 15080),
        admin_listen=Address("0.0.0.0", 15090),
        unknown_hosts="passthrough",
        tls_intercept=TlsInterceptConfig(
            ca_cert_file=files / "ca.crt",
            ca_key_file=files / "ca.key",
            write_ca_cert_to=files / "subdir" / "token-proxy-ca.crt",
        ),
        source=str(path),
    )


def test_defaults_and_an_empty_upstreams_mapping(tmp_path: Path, files: Path) -> None:
    documents: list[dict[str, Any]] = [
        {"upstreams": {}},
        {"upstreams": None},
        {"log_level": "info"},
    ]
    for document in documents:
        config = load_config(write(tmp_path, document, files))
        assert config == ProxyConfig(upstreams=(), source=str(tmp_path / "proxy.yaml"))


def test_every_setting_is_read(tmp_path: Path, files: Path) -> None:
    (tmp_path / "relative-secret").write_text("s3")
    document = {
        "listen": "[::1]:0",
        "admin_listen": "127.0.0.1:0",
        "unknown_hosts": "deny",
        "tls_intercept": {"write_ca_cert_to": "ca-out.crt"},
        "connect_ports": [443, 8443, 443],
        "limits": {
            "max_request_line": "16KiB",
            "max_header_size": "1MB",
            "max_headers": 50,
            "max_body_size": "10MiB",
            "header_timeout": "2.5s",
            "idle_timeout": 30,
            "tunnel_idle_timeout": "1h30m",
            "max_connections": 7,
        },
        "log_level": "debug",
        "log_format": "json",
        "access_log": True,
        "shutdown_grace_period": "250ms",
        "upstreams": {
            "inventory": {
                "match": {"hosts": ["Inventory.Internal.", "[::1]:9443"], "path_prefix": "/"},
                "url": "http://127.0.0.1:8080/",
                "listen": "127.0.0.1:0",
                "header": "X-Api-Token",
                "overwrite": False,
                "required": False,
                "ca_file": "FILES/inventory-ca.pem",
                "client_cert_file": "FILES/client.crt",
                "client_key_file": "FILES/client.key",
                "connect_timeout": "1s",
                "timeout": "2m",
                "token": {
                    "issuer": "http://localhost:8080/realms/demo",
                    "client_id": "${ORDER_CLIENT}",
                    "client_secret": "${CLIENT_SECRET}",
                    "auth_method": "client_secret_post",
                    "scope": ["read:inventory", "write:orders"],
                    "resource": ["https://inventory.internal/", "urn:example:inventory"],
                    "extra_params": {"tenant": "t-$${literal}", "n": 3, "flag": True, "f": 1.5},
                    "refresh_before_expiry": 0,
                    "default_lifetime": "10m",
                    "timeout": 3,
                    "connect_timeout": 0.5,
                    "retry_initial": "100ms",
                    "retry_max": "30s",
                },
            },
            "signed.api": {
                "match": {"hosts": ["inventory.internal:8080"], "path_prefix": "/signed/"},
                "allow_insecure_http": True,
                "url": "http://inventory.internal:8080",
                "token": {
                    "token_url": "http://auth.internal/token",
                    "client_id": "c",
                    "private_key_file": "FILES/ec.pem",
                    "key_id": "key-1",
                },
            },
            "assertion": {
                "match": {"hosts": ["a.internal"]},
                "token": {
                    "token_url": "https://auth.example.com/token",
                    "client_id": "c",
                    "client_assertion_file": "FILES/assertion.jwt",
                },
            },
            "mtls": {
                "match": {"hosts": ["m.internal:8443"]},
                "token": {
                    "token_url": "https://[::1]:9000/token",
                    "client_id": "c",
                    "auth_method": "tls_client_auth",
                    "client_cert_file": "FILES/client.crt",
                    "client_key_file": "FILES/client.key",
                    "ca_file": "FILES/ca.crt",
                },
            },
            "relative": {
                "match": {"hosts": ["r.internal"]},
                "token": {
                    "token_url": "https://auth.example.com/token",
                    "client_id": "c",
                    "client_secret_file": "relative-secret",
                    "scope": "",
                },
            },
        },
    }
    path = write(tmp_path, document, files)
    config = load_config(path, environ=ENV)
    assert config.listen == Address("::1", 0)
    assert str(config.listen) == "[::1]:0"
    assert config.unknown_hosts == "deny"
    assert config.tls_intercept == TlsInterceptConfig(write_ca_cert_to=tmp_path / "ca-out.crt")
    assert config.connect_ports == (443, 8443)
    assert config.limits == LimitsConfig(
        max_request_line=16384,
        max_header_size=1_000_000,
        max_headers=50,
        max_body_size=10 * 1024 * 1024,
        header_timeout=2.5,
        idle_timeout=30.0,
        tunnel_idle_timeout=5400.0,
        max_connections=7,
    )
    assert (config.log_level, config.log_format, config.access_log) == ("debug", "json", True)
    assert config.shutdown_grace_period == 0.25

    inventory = config.upstream("inventory")
    assert inventory.match == MatchConfig(
        hosts=(HostMatch("inventory.internal"), HostMatch("::1", 9443)), path_prefix=None
    )
    assert inventory.url == TargetUrl("http", "127.0.0.1", 8080)
    assert inventory.listen == Address("127.0.0.1", 0)
    assert (inventory.header, inventory.overwrite, inventory.required) == (
        "X-Api-Token",
        False,
        False,
    )
    assert inventory.tls == TlsClientConfig(
        files / "inventory-ca.pem", files / "client.crt", files / "client.key"
    )
    assert (inventory.connect_timeout, inventory.timeout) == (1.0, 120.0)
    assert inventory.token == TokenConfig(
        client_id="order-service",
        issuer="http://localhost:8080/realms/demo",
        auth_method="client_secret_post",
        client_secret=Secret(SECRET),
        scope=("read:inventory", "write:orders"),
        resource=("https://inventory.internal/", "urn:example:inventory"),
        extra_params=(("tenant", "t-${literal}"), ("n", "3"), ("flag", "true"), ("f", "1.5")),
        refresh_before_expiry=0.0,
        default_lifetime=600.0,
        timeout=3.0,
        connect_timeout=0.5,
        retry_initial=0.1,
        retry_max=30.0,
    )

    signed = config.upstream("signed.api")
    assert signed.match.path_prefix == "/signed"
    assert signed.allow_insecure_http is True
    assert signed.token.auth_method == "private_key_jwt"
    assert (signed.token.private_key_file, signed.token.key_id) == (files / "ec.pem", "key-1")
    assertion = config.upstream("assertion").token
    assert assertion.auth_method == "private_key_jwt"
    assert assertion.client_assertion_file == files / "assertion.jwt"
    mtls = config.upstream("mtls")
    assert mtls.match.hosts == (HostMatch("m.internal", 8443),)
    assert mtls.token.token_url == "https://[::1]:9000/token"
    assert mtls.token.tls == TlsClientConfig(
        files / "ca.crt", files / "client.crt", files / "client.key"
    )
    relative = config.upstream("relative").token
    assert relative.client_secret_file == tmp_path / "relative-secret"
    assert relative.scope == ()


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
    ],
    ids=["other-port", "80-vs-443", "prefix-not-on-segment", "sibling-prefixes", "other-host"],
)
def test_matches_that_do_not_overlap_are_accepted(
    first: dict[str, Any], second_match: dict[str, Any], tmp_path: Path, files: Path
) -> None:
    document = edited({f"{UP}.match": first, "upstreams.billing": second(match=second_match)})
    config = load_config(write(tmp_path, document, files), environ=ENV)
    assert [upstream.name for upstream in config.upstreams] == ["inventory", "billing"]


@pytest.mark.parametrize(
    ("edits", "where"),
    [
        ({f"{UP}.allow_insecure_http": True, f"{TOKEN}.token_url": "http://auth.internal/t"}, "a"),
        ({f"{TOKEN}.token_url": "http://127.0.0.2:8080/token"}, "127/8"),
        ({f"{TOKEN}.token_url": "http://[::1]:8080/token"}, "::1"),
        ({f"{TOKEN}.token_url": "http://LOCALHOST:8080/token"}, "localhost"),
        ({f"{UP}.url": "http://127.0.0.1:8080"}, "url on loopback"),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_cleartext_http_allowed_on_loopback_or_by_opt_in(
    edits: dict[str, object], where: str, tmp_path: Path, files: Path
) -> None:
    config = load_config(write(tmp_path, edited(edits), files), environ=ENV)
    assert config.upstreams[0].name == "inventory", where


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


def test_environment_comes_from_os_environ_by_default(
    tmp_path: Path, files: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ORDER_CLIENT_FROM_ENV", "from-env")
    path = write(tmp_path, edited({f"{TOKEN}.client_id": "${ORDER_CLIENT_FROM_ENV}"}), files)
    assert load_config(path).upstreams[0].token.client_id == "from-env"


# -- secrets stay secret -----------------------------------------------------------


def test_secret_is_not_in_repr_or_str_of_the_config(tmp_path: Path, files: Path) -> None:
    document = edited(
        {f"{TOKEN}.client_secret_file": DELETE, f"{TOKEN}.client_secret": "${CLIENT_SECRET}"}
    )
    config = load_config(write(tmp_path, document, files), environ=ENV)
    token = config.upstreams[0].token
    assert token.client_secret is not None
    assert token.client_secret.reveal() == SECRET
    for text in (repr(config), str(config), repr(token), repr(token.client_secret)):
        assert SECRET not in text


def test_secret_file_contents_are_not_stored(tmp_path: Path, files: Path) -> None:
    config = load_config(write(tmp_path, base_config(), files), environ=ENV)
    assert SECRET not in repr(config)
    assert config.upstreams[0].token.client_secret is None


SECRET_LEAK_CASES = {
    "secret-as-secret-file-path": {f"{TOKEN}.client_secret_file": SECRET},
    "secret-as-key-file-path": {
        f"{TOKEN}.client_secret_file": DELETE,
        f"{TOKEN}.private_key_file": SECRET,
    },
    "secret-as-assertion-file-path": {
        f"{TOKEN}.client_secret_file": DELETE,
        f"{TOKEN}.client_assertion_file": SECRET,
    },
    "secret-as-client-key-file-path": {f"{UP}.client_key_file": SECRET},
    "secret-as-ca-key-file": {
        "tls_intercept": {"ca_cert_file": "FILES/ca.crt", "ca_key_file": SECRET}
    },
    "secret-in-key-file-content": {
        f"{TOKEN}.client_secret_file": DELETE,
        f"{TOKEN}.private_key_file": "FILES/secret-not-a-key.pem",
    },
    "secret-with-secret-file": {f"{TOKEN}.client_secret": "${CLIENT_SECRET}"},
    "secret-as-list": {f"{TOKEN}.client_secret_file": DELETE, f"{TOKEN}.client_secret": [SECRET]},
    "secret-with-tls-client-auth": {
        f"{TOKEN}.client_secret_file": DELETE,
        f"{TOKEN}.client_secret": SECRET,
        f"{TOKEN}.auth_method": "tls_client_auth",
    },
    "secret-as-key-id": {f"{TOKEN}.key_id": SECRET},
    "secret-in-extra-param": {f"{TOKEN}.extra_params": {"client_secret": SECRET}},
    "secret-in-extra-param-list": {f"{TOKEN}.extra_params": {"x": [SECRET]}},
}


@pytest.mark.parametrize("edits", SECRET_LEAK_CASES.values(), ids=SECRET_LEAK_CASES.keys())
def test_errors_never_show_a_secret(edits: dict[str, object], tmp_path: Path, files: Path) -> None:
    path = write(tmp_path, edited(edits), files)
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ=ENV)
    assert caught.value.file == str(path)
    assert SECRET not in str(caught.value)


@pytest.mark.parametrize(
    "line",
    [
        f'client_secret: "{SECRET}',
        f"client_secret: {SECRET}: x",
        f"client_secret: {SECRET}\n      client_secret: {SECRET}",
        f"client_secret: [{SECRET}",
    ],
    ids=["unterminated", "colon", "duplicate", "flow"],
)
def test_yaml_errors_never_show_a_secret(line: str, tmp_path: Path) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text(f"upstreams:\n  a:\n    token:\n      {line}\n      client_id: x\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problem.startswith("invalid YAML")
    assert SECRET not in str(caught.value)


# -- durations and property tests ---------------------------------------------------


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


# Key names are the dataclass field names; random documents use them so that they
# get past the unknown-key check and reach the deeper validation.
_ALL_KEYS = sorted(
    {
        field.name
        for config_class in (
            ProxyConfig,
            LimitsConfig,
            TlsInterceptConfig,
            UpstreamConfig,
            MatchConfig,
            TlsClientConfig,
            TokenConfig,
        )
        for field in dataclasses.fields(config_class)
    }
    | {"inventory"}
)
_interesting_strings = [
    *("5m", "1h30m", "10MiB", "127.0.0.1:0", "[::1]:0", "https://a.example", "http://b"),
    *("/api", "${HOME}", "$${x}", "${", "inventory.internal", "a:443", "/etc/hostname"),
    *("client_secret_basic", "private_key_jwt", "tls_client_auth", "deny", "json"),
]
_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(_interesting_strings)
)
_documents = st.recursive(
    _scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(_ALL_KEYS) | st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=20,
)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("scratch")


def _load_only_config_errors(path: Path) -> None:
    """Loading `path` either succeeds or raises a one-line ConfigError naming the file."""
    message = None
    try:
        config = load_config(path, environ={"HOME": "/root"})
    except ConfigError as error:
        message = str(error)
    if message is None:
        assert config.source == str(path)
    else:
        assert message.startswith(f"{path}: ")
        assert "\n" not in message


@settings(max_examples=200, deadline=None)
@given(document=_documents)
def test_arbitrary_documents_raise_only_config_error(document: object, scratch: Path) -> None:
    path = scratch / "random.yaml"
    path.write_text(yaml.safe_dump(document, allow_unicode=True), encoding="utf-8")
    _load_only_config_errors(path)


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(
        alphabet=st.sampled_from(list("ab:-[]{}&*!|>'\"%@`#,? \n\t.0123456789")) | st.characters(),
        max_size=80,
    )
)
def test_arbitrary_text_raises_only_config_error(text: str, scratch: Path) -> None:
    path = scratch / "random-text.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    _load_only_config_errors(path)


def _paths(node: object, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, (*prefix, key))
    return found


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_mutated_valid_configs_raise_only_config_error(data: st.DataObject, scratch: Path) -> None:
    document = edited(
        {
            f"{UP}.url": "https://inventory.internal",
            f"{UP}.listen": "127.0.0.1:0",
            f"{TOKEN}.scope": ["a", "b"],
            f"{TOKEN}.extra_params": {"x": 1},
            "limits": {"max_headers": 5},
            "upstreams.billing": second(),
        }
    )
    path_to_change = data.draw(st.sampled_from(_paths(document)))
    *parents, last = path_to_change
    node: Any = document
    for part in parents:
        node = node[part]
    if data.draw(st.booleans()):
        del node[last]
    else:
        node[last] = data.draw(_documents)
    path = scratch / "mutated.yaml"
    path.write_text(yaml.safe_dump(document, allow_unicode=True), encoding="utf-8")
    _load_only_config_errors(path)
