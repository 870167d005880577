"""Tests for `proxy.config.load`: the top-level section, what loads, and robustness.

The examples of the contract load into the dataclasses they describe, every setting is
read, defaults are the model's, and no document, however broken, raises anything but
a one-line `ConfigError` naming the file.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config import (
    Address,
    ConfigError,
    HostMatch,
    LimitsConfig,
    MatchConfig,
    ProxyConfig,
    RedisConfig,
    Secret,
    TargetUrl,
    TlsClientConfig,
    TlsInterceptConfig,
    TokenCacheConfig,
    TokenConfig,
    UpstreamConfig,
    load_config,
)
from tests.config.documents import (
    DELETE,
    ENV,
    SECRET,
    TOKEN,
    UP,
    Case,
    assert_problem,
    base_config,
    edited,
    second,
    write,
)

CASES = [
    Case(
        "zero-grace",
        {"shutdown_grace_period": 0},
        "shutdown_grace_period",
        "must be greater than 0",
    ),
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
        "concurrency-zero",
        {"token_endpoint_concurrency": 0},
        "token_endpoint_concurrency",
        "must be from 1 to 2147483647",
    ),
    Case(
        "concurrency-as-string",
        {"token_endpoint_concurrency": "8"},
        "token_endpoint_concurrency",
        "expected an integer, got a string",
    ),
    Case(
        "concurrency-as-bool",
        {"token_endpoint_concurrency": True},
        "token_endpoint_concurrency",
        "expected an integer, got a boolean",
    ),
    Case(
        "concurrency-as-float",
        {"token_endpoint_concurrency": 2.5},
        "token_endpoint_concurrency",
        "expected an integer, got a number",
    ),
    Case(
        "via-as-string",
        {"via": "off"},
        "via",
        "expected a boolean (true or false), got a string",
    ),
    Case(
        "allow-link-local-as-number",
        {"allow_link_local_targets": 1},
        "allow_link_local_targets",
        "expected a boolean (true or false), got an integer",
    ),
    Case(
        "unknown-top-key-near-token-cache",
        {"token_cach": {}},
        "token_cach",
        "unknown key (did you mean token_cache?)",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_each_problem_names_file_key_path_and_problem(
    case: Case, tmp_path: Path, files: Path
) -> None:
    assert_problem(case, tmp_path, files)


def test_message_format_matches_the_contract(
    tmp_path: Path, files: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path, edited({f"{TOKEN}.client_id": DELETE}), files)
    monkeypatch.chdir(tmp_path)  # the file is named as the operator named it
    with pytest.raises(ConfigError) as caught:
        load_config("proxy.yaml")
    assert str(caught.value) == "proxy.yaml: upstreams.inventory.token.client_id: missing"


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
        "via": False,
        "allow_link_local_targets": True,
        "shutdown_grace_period": "250ms",
        "token_cache": {
            "redis": {
                "url": "rediss://[fd00::7]:6380/3",
                "username": "token-proxy",
                "password_file": "FILES/redis-password",
                "ca_file": "FILES/redis-ca.pem",
            },
            "encryption_key_file": "FILES/cache-key",
            "key_prefix": "fleet-a",
            "lock_timeout": "2500ms",
        },
        "token_endpoint_concurrency": 3,
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
                    "cache": "local",
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
    assert (config.via, config.allow_link_local_targets) == (False, True)
    assert config.shutdown_grace_period == 0.25
    assert config.token_cache == TokenCacheConfig(
        redis=RedisConfig(
            url="rediss://[fd00::7]:6380/3",
            username="token-proxy",
            password_file=files / "redis-password",
            ca_file=files / "redis-ca.pem",
        ),
        encryption_key_file=files / "cache-key",
        key_prefix="fleet-a",
        lock_timeout=2.5,
    )
    assert config.token_endpoint_concurrency == 3

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
    assert (relative.cache, config.upstream("mtls").token.cache) == ("local", "shared")


def test_token_endpoint_concurrency(tmp_path: Path, files: Path) -> None:
    assert load_config(write(tmp_path, base_config(), files)).token_endpoint_concurrency == 8
    document = edited({"token_endpoint_concurrency": 1})
    assert load_config(write(tmp_path, document, files)).token_endpoint_concurrency == 1


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
            TokenCacheConfig,
            RedisConfig,
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
