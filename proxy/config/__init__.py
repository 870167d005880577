"""The configuration: the typed model (`model`) and the YAML loader that fills it (`load`).

Everything else imports from here: ``from proxy.config import ProxyConfig, load_config``.
"""

from proxy.config.load import load_config, parse_duration, short_secret_warnings
from proxy.config.model import (
    MIN_SECRET_LENGTH,
    Address,
    AuthMethod,
    ConfigError,
    HostMatch,
    LimitsConfig,
    LogFormat,
    MatchConfig,
    ProxyConfig,
    RedisConfig,
    Secret,
    TargetUrl,
    TlsClientConfig,
    TlsInterceptConfig,
    TokenCacheConfig,
    TokenCacheMode,
    TokenConfig,
    UnknownHosts,
    UpstreamConfig,
)

__all__ = [
    "MIN_SECRET_LENGTH",
    "Address",
    "AuthMethod",
    "ConfigError",
    "HostMatch",
    "LimitsConfig",
    "LogFormat",
    "MatchConfig",
    "ProxyConfig",
    "RedisConfig",
    "Secret",
    "TargetUrl",
    "TlsClientConfig",
    "TlsInterceptConfig",
    "TokenCacheConfig",
    "TokenCacheMode",
    "TokenConfig",
    "UnknownHosts",
    "UpstreamConfig",
    "load_config",
    "parse_duration",
    "short_secret_warnings",
]
