"""The configuration: the typed model (`model`) and the YAML loader that fills it.

Everything else imports from here: ``from proxy.config import ProxyConfig, load_config``.
`load` is the loader's entry point; the sections it reads have modules of their own
(`upstream`, `token`, `tls`, `cache`, `checks`), on top of `source` (the YAML, `${VAR}`
and files) and the values (`scalars`, `urls`, `keys`: the private keys the token code
signs with, checked by the same function at load).
"""

from proxy.config.load import load_config, parse_duration, short_secret_warnings
from proxy.config.model import (
    MIN_SECRET_LENGTH,
    Address,
    AuthMethod,
    ConfigError,
    DpopAlgorithm,
    DpopConfig,
    HostMatch,
    Http2Mode,
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
    "DpopAlgorithm",
    "DpopConfig",
    "HostMatch",
    "Http2Mode",
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
