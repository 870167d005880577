"""The typed model of the configuration: frozen dataclasses, validated once at load.

`load_config()` (in `proxy.config.load`) reads the YAML file of the product contract into the frozen
dataclasses below. Every problem is a `ConfigError` naming the file, the key path
and what is wrong, e.g. ``proxy.yaml: upstreams.inventory.token.client_id: missing``.
Nothing here touches the network; secret *files* are checked for readability at
load and re-read by the token client on every fetch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

UnknownHosts = Literal["passthrough", "deny"]
AuthMethod = Literal[
    "client_secret_basic",
    "client_secret_post",
    "private_key_jwt",
    "tls_client_auth",
    "none",  # no client authentication: only for grants that carry their own proof
]
# The grant a token is requested with (RFC 6749 §4.4, RFC 8693, RFC 7523 §2.1).
GrantName = Literal["client_credentials", "token_exchange", "jwt_bearer"]
# RFC 8693 §3 token type identifiers.
TOKEN_TYPE_JWT = "urn:ietf:params:oauth:token-type:jwt"
TOKEN_TYPE_ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"
LogFormat = Literal["text", "json"]
TokenCacheMode = Literal["shared", "local"]
# The JWS algorithms DPoP proofs are signed with (RFC 9449 §4.2, RFC 7518, RFC 8037).
DpopAlgorithm = Literal["ES256", "EdDSA", "RS256", "PS256"]
# Whether an upstream is spoken to in HTTP/2 (RFC 9113): when it offers h2 in ALPN or
# the request came in as HTTP/2 (auto), never (off), or always (required).
Http2Mode = Literal["auto", "off", "required"]


class ConfigError(Exception):
    """A configuration problem: `file`, dotted `key_path` and a human `problem`."""

    def __init__(self, file: str, key_path: str, problem: str) -> None:
        self.file = file
        self.key_path = key_path
        self.problem = problem
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.file}: {self.key_path}" if self.key_path else self.file
        return f"{where}: {self.problem}"


class Secret:
    """A secret string that never shows itself in `repr`, `str` or logs."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class Address:
    """A `host:port` to listen on or connect to."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class HostMatch:
    """One entry of `match.hosts`: lower-cased host, and a port or None for the scheme default."""

    host: str
    port: int | None = None


@dataclass(frozen=True)
class MatchConfig:
    """Which requests an upstream takes: exact hosts, and optionally a path prefix and methods."""

    hosts: tuple[HostMatch, ...]
    # Normalised without a trailing slash; matches the prefix itself and paths below it
    # on a segment boundary (`/api` matches `/api` and `/api/x`, not `/apiary`).
    path_prefix: str | None = None
    # Upper-cased HTTP methods; empty: every method.
    methods: tuple[str, ...] = ()


@dataclass(frozen=True)
class TargetUrl:
    """The upstream's `url`: where matched requests are sent (scheme, host, port)."""

    scheme: Literal["http", "https"]
    host: str
    port: int

    @property
    def authority(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.authority}"


@dataclass(frozen=True)
class TlsClientConfig:
    """TLS trust and client identity for outbound connections (upstream or token endpoint)."""

    ca_file: Path | None = None
    client_cert_file: Path | None = None
    client_key_file: Path | None = None


@dataclass(frozen=True)
class DpopConfig:
    """Sender-constrained tokens (RFC 9449): the key every DPoP proof is signed with."""

    # The private key (PEM or DER) fitting `alg`: proxy.config.keys. None: a key of
    # `alg`'s kind is generated in memory at start-up (and tokens are not shared).
    key_file: Path | None = None
    alg: DpopAlgorithm = "ES256"


@dataclass(frozen=True)
class TokenConfig:
    """How to obtain one upstream's token: the grant, the client and the request."""

    client_id: str  # "" when absent (token_exchange with auth_method none)
    token_url: str | None = None  # exactly one of token_url / issuer is set
    issuer: str | None = None
    auth_method: AuthMethod = "client_secret_basic"
    client_secret: Secret | None = field(default=None, repr=False)
    client_secret_file: Path | None = None  # re-read at every fetch
    private_key_file: Path | None = None  # RSA or EC, PEM or DER: proxy.config.keys
    key_id: str | None = None  # `kid` header of the client assertion
    client_assertion_file: Path | None = None  # sent as-is as the client assertion
    scope: tuple[str, ...] = ()
    audience: str | None = None
    resource: tuple[str, ...] = ()
    extra_params: tuple[tuple[str, str], ...] = ()
    grant: GrantName = "client_credentials"
    # token_exchange (RFC 8693 §2.1): the token presented, re-read at every fetch.
    subject_token_file: Path | None = None
    subject_token_type: str = TOKEN_TYPE_JWT
    actor_token_file: Path | None = None  # with actor_token_type, or neither
    actor_token_type: str | None = None
    requested_token_type: str | None = None
    # jwt_bearer (RFC 7523 §2.1): a ready-made assertion, re-read at every fetch; without
    # it the assertion is signed with `private_key_file` (iss = sub = client_id).
    assertion_file: Path | None = None
    refresh_before_expiry: float | None = None  # None: min(300 s, 20% of the lifetime)
    default_lifetime: float = 300.0  # when expires_in is absent and the token is no JWT
    timeout: float = 10.0  # total time for one token request
    connect_timeout: float = 5.0
    retry_initial: float = 1.0  # backoff after a failed fetch: full jitter, doubling
    retry_max: float = 60.0
    tls: TlsClientConfig = TlsClientConfig()
    # `local`: this upstream keeps its token to itself even when `token_cache` is set.
    cache: TokenCacheMode = "shared"
    # Set: tokens are DPoP-bound, each request carries a proof (RFC 9449).
    dpop: DpopConfig | None = None


@dataclass(frozen=True)
class UpstreamConfig:
    """One upstream API: which requests it takes, where they go, and its token."""

    name: str
    match: MatchConfig
    token: TokenConfig
    url: TargetUrl | None = None
    listen: Address | None = None
    header: str = "Authorization"
    overwrite: bool = True
    required: bool = True
    tls: TlsClientConfig = TlsClientConfig()
    connect_timeout: float = 5.0
    timeout: float = 60.0  # waiting for the response head, and between body reads
    allow_insecure_http: bool = False
    # Upstream answers with these statuses, to a request that carried our token, drop
    # that token (idempotent requests are then sent again with a new one).
    purge_on_status: tuple[int, ...] = (401,)
    http2: Http2Mode = "auto"


@dataclass(frozen=True)
class TlsInterceptConfig:
    """TLS interception of CONNECT tunnels to configured hosts, with a local CA."""

    ca_cert_file: Path | None = None  # both or neither; neither: generate a CA at start-up
    ca_key_file: Path | None = None
    write_ca_cert_to: Path | None = None


@dataclass(frozen=True)
class LimitsConfig:
    """Bounds on what a client may send and how long it may take."""

    max_request_line: int = 8192
    max_header_size: int = 65536
    max_headers: int = 100
    max_body_size: int | None = None  # None: unlimited (bodies are streamed)
    header_timeout: float = 10.0  # from connection or previous response to a full head
    idle_timeout: float = 60.0  # keep-alive connections with nothing in flight
    tunnel_idle_timeout: float = 300.0
    max_connections: int = 10000
    admin_max_connections: int = 64  # and at most an eighth of the descriptor limit


@dataclass(frozen=True)
class RedisConfig:
    """How to reach the Redis (or Valkey) server of the fleet token cache."""

    url: str  # redis://host:port/db or rediss:// (TLS)
    username: str | None = None
    password_file: Path | None = None  # re-read at every (re)connection
    ca_file: Path | None = None  # trust for rediss://


@dataclass(frozen=True)
class TokenCacheConfig:
    """The `token_cache` section: tokens shared by every replica through Redis."""

    redis: RedisConfig
    encryption_key_file: Path  # at least 32 bytes; the same file on every replica
    key_prefix: str = "token-proxy"
    lock_timeout: float = 10.0  # how long a replica waits for another's fetch


@dataclass(frozen=True)
class ProxyConfig:
    """The whole configuration file."""

    upstreams: tuple[UpstreamConfig, ...]
    listen: Address = Address("127.0.0.1", 15080)
    admin_listen: Address = Address("0.0.0.0", 15090)
    unknown_hosts: UnknownHosts = "passthrough"
    tls_intercept: TlsInterceptConfig | None = None
    connect_ports: tuple[int, ...] = (443,)
    limits: LimitsConfig = LimitsConfig()
    log_level: str = "info"
    log_format: LogFormat = "text"
    access_log: bool = False
    # RFC 9110 §7.6.3: `Via: 1.1 token-proxy` on forwarded requests and responses.
    via: bool = True
    # Passthrough requests and tunnels to link-local and cloud-metadata addresses
    # (169.254.0.0/16, fe80::/10, 169.254.169.254, metadata.google.internal, ...).
    allow_link_local_targets: bool = False
    shutdown_grace_period: float = 20.0
    token_cache: TokenCacheConfig | None = None  # None: every process on its own
    # At most this many token requests in flight to one token endpoint at once.
    token_endpoint_concurrency: int = 8
    source: str = "<config>"  # the file it was loaded from, for messages

    def upstream(self, name: str) -> UpstreamConfig:
        for upstream in self.upstreams:
            if upstream.name == name:
                return upstream
        raise KeyError(name)


# A client secret shorter than this is easy to guess; `check` and start-up warn about it.
MIN_SECRET_LENGTH = 8
