"""Reading and validating the YAML configuration into `proxy.config.model`'s dataclasses.

One pass over the document with a key path at every step, so that each problem
becomes one `ConfigError` line naming the file, the key path and what is wrong.
Values of keys that look secret are never echoed in those lines.
"""

from __future__ import annotations

import datetime
import difflib
import ipaddress
import math
import os
import re
import stat
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple, NoReturn, TypeVar, cast

import yaml
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from proxy.config.model import (
    MIN_SECRET_LENGTH,
    Address,
    AuthMethod,
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
)
from proxy.hosts import is_loopback_host

_T = TypeVar("_T")
_Choice = TypeVar("_Choice", bound=str)

# ---------------------------------------------------------------------------
# Scalars: durations, sizes, hosts and addresses
# ---------------------------------------------------------------------------

_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ms|s|m|h)")
_PLAIN_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")
_DURATION_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: object) -> float:
    """`90s`, `5m`, `1h`, `250ms` or plain (int/float) seconds; ValueError otherwise.

    Units combine largest first or in any order (`1h30m`, `1m30s500ms`); a string of
    digits alone is seconds. Negative, infinite and NaN values are rejected.
    """
    # YAML `true` is an int subclass in Python; it is never a duration.
    if isinstance(value, bool):
        raise ValueError("expected a duration, got a boolean")
    if isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:
            raise ValueError("duration is too large") from None
    elif isinstance(value, str):
        seconds = _parse_duration_text(value.strip())
    else:
        raise ValueError(f"expected a duration like 90s, 5m or 1h, got {_type_name(value)}")
    if not math.isfinite(seconds):
        raise ValueError("duration must be finite")
    if seconds < 0:
        raise ValueError("duration must not be negative")
    return seconds


def _parse_duration_text(text: str) -> float:
    if _PLAIN_NUMBER.fullmatch(text):
        return float(text)
    total = 0.0
    position = 0
    for part in _DURATION_PART.finditer(text):
        if part.start() != position:
            break
        total += float(part.group(1)) * _DURATION_UNIT_SECONDS[part.group(2)]
        position = part.end()
    if position == 0 or position != len(text):
        raise ValueError(
            f"invalid duration {_show(text)}: use e.g. 250ms, 90s, 5m, 1h, 1h30m or seconds"
        )
    return total


_SIZE = re.compile(r"([0-9]+) ?(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?")
_SIZE_UNIT_BYTES = {
    None: 1,
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "TiB": 1024**4,
}


def _parse_size(value: object) -> int:
    """Bytes as an int, or `512KiB` / `10MiB` / `1GiB` / `10MB`; ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError("expected a size in bytes, got a boolean")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        match = _SIZE.fullmatch(value.strip())
        if match is None or len(match.group(1)) > 20:
            raise ValueError(f"invalid size {_show(value)}: use e.g. 65536, 512KiB, 10MiB or 1GB")
        size = int(match.group(1)) * _SIZE_UNIT_BYTES[match.group(2)]
    else:
        raise ValueError(f"expected a size like 65536 or 10MiB, got {_type_name(value)}")
    if size <= 0:
        raise ValueError("must be greater than 0")
    return size


_HOSTNAME_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")


def _parse_host(text: str) -> str:
    """A hostname or IP literal (IPv6 without brackets): lower-cased, one trailing dot removed."""
    if text.startswith("["):
        raise ValueError("unexpected '['")
    if ":" in text:
        try:
            return _parse_ipv6(text)
        except ValueError:
            raise ValueError("IPv6 literals must be in brackets, e.g. [::1]:8080") from None
    host = text.lower()
    if host.endswith("."):
        host = host[:-1]
    if not host:
        raise ValueError("empty host")
    if not host.isascii():
        raise ValueError("host must be ASCII (use the xn-- form of international names)")
    if len(host) > 253:
        raise ValueError("host is longer than 253 characters")
    labels = host.split(".")
    for label in labels:
        if not _HOSTNAME_LABEL.fullmatch(label):
            raise ValueError(f"{_show(text)} is not a valid hostname or IP address")
    if all(label.isdigit() for label in labels):
        try:
            return str(ipaddress.IPv4Address(host))
        except ValueError:
            raise ValueError(f"{_show(text)} is not a valid IPv4 address") from None
    return host


def _parse_ipv6(text: str) -> str:
    if "%" in text:
        raise ValueError("IPv6 zone identifiers are not supported")
    return ipaddress.IPv6Address(text).compressed


def _split_host_port(text: str, *, port_required: bool) -> tuple[str, int | None]:
    """Split `host`, `host:port` or `[v6]:port`; the port is None when absent."""
    if not text:
        raise ValueError("empty")
    if any(not char.isprintable() or char.isspace() for char in text):
        raise ValueError("must not contain whitespace or control characters")
    bad = sorted({char for char in text if char in "/@?#%\\"})
    if bad:
        raise ValueError(f"{_show(text)} contains {' '.join(repr(c) for c in bad)}")
    port_text: str | None
    if text.startswith("["):
        closing = text.find("]")
        if closing < 0:
            raise ValueError(f"{_show(text)}: missing ']'")
        try:
            host = _parse_ipv6(text[1:closing])
        except ValueError:
            raise ValueError(f"{_show(text)}: not a valid IPv6 address in brackets") from None
        rest = text[closing + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(f"{_show(text)}: expected ':port' after ']'")
        port_text = rest[1:] if rest else None
    elif text.count(":") > 1:
        raise ValueError(f"{_show(text)}: write IPv6 literals in brackets, e.g. [::1]:8080")
    else:
        host_text, colon, after = text.partition(":")
        host = _parse_host(host_text)
        port_text = after if colon else None
    if port_text is None:
        if port_required:
            raise ValueError(f"{_show(text)}: missing the port")
        return host, None
    if not port_text.isdigit() or not port_text.isascii() or len(port_text) > 5:
        raise ValueError(f"{_show(text)}: port must be a number from 0 to 65535")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"{_show(text)}: port must be a number from 0 to 65535")
    return host, port


def _is_wildcard(host: str) -> bool:
    return host in ("0.0.0.0", "::")


def _show(value: object, limit: int = 80) -> str:
    """A value quoted for a message: printable, escaped and bounded in length."""
    text = str(value)
    if len(text) > limit:
        text = text[:limit] + "..."
    return "'" + "".join(c if c.isprintable() else repr(c)[1:-1] for c in text) + "'"


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, datetime.date):
        return "a date"
    if isinstance(value, bytes):
        return "binary data"
    if isinstance(value, set):
        return "a set"
    return type(value).__name__


def _format_host_match(host: HostMatch) -> str:
    name = f"[{host.host}]" if ":" in host.host else host.host
    return name if host.port is None else f"{name}:{host.port}"


def _ports_overlap(a: int | None, b: int | None) -> bool:
    # None is "the scheme's default port": 80 for http://, 443 for https://, and both
    # for CONNECT, which names no scheme.
    if a == b:
        return True
    if a is None:
        return b in (80, 443)
    if b is None:
        return a in (80, 443)
    return False


def _prefixes_overlap(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return True
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


# ---------------------------------------------------------------------------
# YAML and environment expansion
# ---------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that rejects a key given twice instead of keeping the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:
                continue  # unhashable: the base constructor reports it
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"duplicate key {_show(key)}",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_MERGE_TAG = "tag:yaml.org,2002:merge"
_ENV_REFERENCE = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$\{")

_KeyPath = tuple[str, ...]
_MISSING: Any = object()

# Values of keys with these words in their names are never echoed in a message: a
# misplaced secret (say, the secret itself written into client_secret_file) must not
# end up in a log line.
_SECRET_WORDS = ("secret", "assertion", "key", "password")


def _dotted(path: _KeyPath) -> str:
    text = ""
    for part in path:
        if part.startswith("[") or not text:
            text += part
        else:
            text += "." + part
    return text


def _key_segment(key: object) -> str:
    text = str(key)
    if len(text) > 60:
        text = text[:60] + "..."
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _is_secretish(path: _KeyPath) -> bool:
    key = next((part for part in reversed(path) if not part.startswith("[")), "")
    return any(word in key for word in _SECRET_WORDS)


# ---------------------------------------------------------------------------
# The loader
# ---------------------------------------------------------------------------

_TOP_KEYS = (
    "listen",
    "admin_listen",
    "unknown_hosts",
    "tls_intercept",
    "connect_ports",
    "limits",
    "log_level",
    "log_format",
    "access_log",
    "shutdown_grace_period",
    "upstreams",
)
_TLS_INTERCEPT_KEYS = ("ca_cert_file", "ca_key_file", "write_ca_cert_to")
_LIMIT_KEYS = (
    "max_request_line",
    "max_header_size",
    "max_headers",
    "max_body_size",
    "header_timeout",
    "idle_timeout",
    "tunnel_idle_timeout",
    "max_connections",
    "admin_max_connections",
)
_TLS_KEYS = ("ca_file", "client_cert_file", "client_key_file")
_UPSTREAM_KEYS = (
    "match",
    "url",
    "listen",
    "header",
    "overwrite",
    "required",
    *_TLS_KEYS,
    "connect_timeout",
    "timeout",
    "allow_insecure_http",
    "token",
)
_MATCH_KEYS = ("hosts", "path_prefix")
_TOKEN_KEYS = (
    "token_url",
    "issuer",
    "client_id",
    "client_secret",
    "client_secret_file",
    "auth_method",
    "private_key_file",
    "key_id",
    "client_assertion_file",
    "scope",
    "audience",
    "resource",
    "extra_params",
    "refresh_before_expiry",
    "default_lifetime",
    "timeout",
    "connect_timeout",
    "retry_initial",
    "retry_max",
    *_TLS_KEYS,
)
_AUTH_METHODS: tuple[AuthMethod, ...] = (
    "client_secret_basic",
    "client_secret_post",
    "private_key_jwt",
    "tls_client_auth",
)
_LOG_LEVELS = ("debug", "info", "warning", "error")
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
# RFC 6749 §3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E )
_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")
_PROXY_OWNED_PARAMS = ("grant_type", "client_id", "client_secret", "scope")
# Secret and key files are only read at load to check them; a secret is not megabytes.
_MAX_CHECKED_FILE_SIZE = 1 << 20


class _Section:
    """One YAML mapping being read: its key path, and only the keys it may contain."""

    def __init__(
        self, loader: _Loader, path: _KeyPath, value: object, allowed: Sequence[str]
    ) -> None:
        if not isinstance(value, dict):
            loader.fail(path, f"expected a mapping, got {_type_name(value)}")
        for key in value:
            if not isinstance(key, str):
                loader.fail(
                    (*path, _key_segment(key)),
                    f"keys must be strings, got {_type_name(key)}",
                )
            if key not in allowed:
                loader.fail((*path, _key_segment(key)), _unknown_key_problem(key, allowed))
        self.path = path
        self.values: dict[str, object] = value

    def __contains__(self, key: str) -> bool:
        return key in self.values

    def key_path(self, key: str) -> _KeyPath:
        return (*self.path, key)

    def get(self, key: str) -> object:
        return self.values.get(key, _MISSING)


def _unknown_key_problem(key: str, allowed: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    if close:
        return f"unknown key (did you mean {close[0]}?)"
    return f"unknown key (expected one of: {', '.join(allowed)})"


class _Loader:
    """Reads one parsed YAML document into `ProxyConfig`, failing on the first problem."""

    def __init__(self, file: str, base_dir: Path, environ: Mapping[str, str]) -> None:
        self.config_file = file
        self.base_dir = base_dir
        self.environ = environ

    def fail(self, path: _KeyPath, problem: str) -> NoReturn:
        raise ConfigError(self.config_file, _dotted(path), problem)

    # -- typed values ------------------------------------------------------

    def expand(self, path: _KeyPath, text: str) -> str:
        """Expand `${VAR}` from the environment; `$${` is a literal `${`."""

        def replace(reference: re.Match[str]) -> str:
            if reference.group(0) == "$${":
                return "${"
            name = reference.group(1)
            if name is None:
                self.fail(path, "malformed ${...}: expected ${NAME} (write $${ for a literal ${)")
            value = self.environ.get(name)
            if value is None:
                self.fail(path, f"environment variable {name} is not set")
            return value

        if "${" not in text:
            return text
        return _ENV_REFERENCE.sub(replace, text)

    def string(self, path: _KeyPath, value: object, *, allow_empty: bool = False) -> str:
        if not isinstance(value, str):
            self.fail(path, f"expected a string, got {_type_name(value)}")
        text = self.expand(path, value)
        if not allow_empty and not text.strip():
            self.fail(path, "must not be empty")
        return text

    def boolean(self, path: _KeyPath, value: object) -> bool:
        if not isinstance(value, bool):
            self.fail(path, f"expected a boolean (true or false), got {_type_name(value)}")
        return value

    def integer(self, path: _KeyPath, value: object, *, minimum: int, maximum: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(path, f"expected an integer, got {_type_name(value)}")
        if not minimum <= value <= maximum:
            self.fail(path, f"must be from {minimum} to {maximum}")
        return value

    def duration(self, path: _KeyPath, value: object, *, allow_zero: bool = False) -> float:
        if isinstance(value, str):
            value = self.expand(path, value)
        try:
            seconds = parse_duration(value)
        except ValueError as error:
            self.fail(path, str(error))
        if seconds == 0 and not allow_zero:
            self.fail(path, "must be greater than 0")
        return seconds

    def size(self, path: _KeyPath, value: object) -> int:
        if isinstance(value, str):
            value = self.expand(path, value)
        try:
            return _parse_size(value)
        except ValueError as error:
            self.fail(path, str(error))

    def choice(self, path: _KeyPath, value: object, choices: Sequence[_Choice]) -> _Choice:
        text = self.string(path, value)
        for choice in choices:
            if text == choice:
                return choice
        close = difflib.get_close_matches(text.lower(), choices, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else ""
        shown = "" if _is_secretish(path) else f"{_show(text)}: "
        self.fail(path, f"{shown}must be one of {', '.join(choices)}{hint}")

    def address(self, path: _KeyPath, value: object) -> Address:
        text = self.string(path, value)
        try:
            host, port = _split_host_port(text.strip(), port_required=True)
        except ValueError as error:
            self.fail(path, f"{error} (expected host:port or [v6]:port)")
        assert port is not None  # port_required
        return Address(host, port)

    def file_path(self, path: _KeyPath, value: object) -> tuple[str, Path]:
        """The text as written, and the path it names (relative: to the config's directory)."""
        text = self.string(path, value)
        if any(not char.isprintable() for char in text):
            self.fail(path, "file names must not contain control characters")
        file_path = Path(text)
        if not file_path.is_absolute():
            file_path = Path(os.path.abspath(self.base_dir / file_path))
        return text, file_path

    def file(self, path: _KeyPath, value: object) -> Path:
        """A path that must name a readable regular file."""
        text, file_path = self.file_path(path, value)
        where = "" if _is_secretish(path) else f" {_show(text)}"
        try:
            status = os.stat(file_path)
        except FileNotFoundError:
            self.fail(path, f"file{where} does not exist")
        except OSError as error:
            self.fail(path, f"cannot access file{where}: {error.strerror}")
        if not stat.S_ISREG(status.st_mode):
            kind = "a directory" if stat.S_ISDIR(status.st_mode) else "not a regular file"
            self.fail(path, f"file{where} is {kind}")
        try:
            with open(file_path, "rb"):
                pass
        except OSError as error:
            self.fail(path, f"cannot read file{where}: {error.strerror}")
        return file_path

    def read_file(self, path: _KeyPath, file_path: Path) -> bytes:
        """Contents of a file `file()` accepted, for a check only: never stored."""
        try:
            with open(file_path, "rb") as file:
                data = file.read(_MAX_CHECKED_FILE_SIZE + 1)
        except OSError as error:
            self.fail(path, f"cannot read file: {error.strerror}")
        if len(data) > _MAX_CHECKED_FILE_SIZE:
            self.fail(path, "file is larger than 1 MiB")
        return data

    def optional(
        self, section: _Section, key: str, read: Callable[[_KeyPath, object], _T]
    ) -> _T | None:
        value = section.get(key)
        return None if value is _MISSING else read(section.key_path(key), value)

    def with_default(
        self, section: _Section, key: str, read: Callable[[_KeyPath, object], _T], default: _T
    ) -> _T:
        value = section.get(key)
        return default if value is _MISSING else read(section.key_path(key), value)

    def required(self, section: _Section, key: str, read: Callable[[_KeyPath, object], _T]) -> _T:
        value = section.get(key)
        if value is _MISSING:
            self.fail(section.key_path(key), "missing")
        return read(section.key_path(key), value)

    def string_list(self, path: _KeyPath, value: object, *, split: bool) -> tuple[str, ...]:
        """A list of strings, or (when `split`) one string of space-separated words."""
        if split and isinstance(value, str):
            return tuple(self.string(path, value, allow_empty=True).split())
        if isinstance(value, str):
            return (self.string(path, value),)
        if not isinstance(value, list):
            self.fail(path, f"expected a string or a list of strings, got {_type_name(value)}")
        return tuple(
            self.string((*path, f"[{index}]"), item).strip() for index, item in enumerate(value)
        )

    # -- sections -----------------------------------------------------------

    def proxy(self, document: object) -> ProxyConfig:
        if not isinstance(document, dict):
            what = "an empty document" if document is None else _type_name(document)
            self.fail((), f"expected a mapping of settings at the top level, got {what}")
        top = _Section(self, (), document, _TOP_KEYS)
        defaults = ProxyConfig(upstreams=())
        listen = self.with_default(top, "listen", self.address, defaults.listen)
        admin_listen = self.with_default(top, "admin_listen", self.address, defaults.admin_listen)
        if _addresses_conflict(listen, admin_listen):
            self.fail(("admin_listen",), f"{admin_listen} conflicts with listen {listen}")
        unknown_hosts = self.with_default(
            top,
            "unknown_hosts",
            lambda path, value: self.choice(path, value, ("passthrough", "deny")),
            defaults.unknown_hosts,
        )
        upstreams = self.upstreams(top)
        self.check_listen_conflicts(listen, admin_listen, upstreams)
        self.check_host_overlaps(upstreams)
        return ProxyConfig(
            upstreams=upstreams,
            listen=listen,
            admin_listen=admin_listen,
            unknown_hosts=unknown_hosts,
            tls_intercept=self.optional(top, "tls_intercept", self.tls_intercept),
            connect_ports=self.with_default(
                top, "connect_ports", self.connect_ports, defaults.connect_ports
            ),
            limits=self.with_default(top, "limits", self.limits, defaults.limits),
            log_level=self.with_default(
                top,
                "log_level",
                lambda path, value: self.choice(path, value, _LOG_LEVELS),
                defaults.log_level,
            ),
            log_format=self.with_default(
                top,
                "log_format",
                lambda path, value: self.choice(path, value, ("text", "json")),
                defaults.log_format,
            ),
            access_log=self.with_default(top, "access_log", self.boolean, defaults.access_log),
            shutdown_grace_period=self.with_default(
                top, "shutdown_grace_period", self.duration, defaults.shutdown_grace_period
            ),
            source=self.config_file,
        )

    def tls_intercept(self, path: _KeyPath, value: object) -> TlsInterceptConfig:
        if value is None:
            self.fail(
                path,
                "expected a mapping, got null (write tls_intercept: {} to intercept with a "
                "generated CA, or remove the key)",
            )
        section = _Section(self, path, value, _TLS_INTERCEPT_KEYS)
        ca_cert_file = self.optional(section, "ca_cert_file", self.file)
        ca_key_file = self.optional(section, "ca_key_file", self.file)
        if (ca_cert_file is None) != (ca_key_file is None):
            missing = "ca_key_file" if ca_key_file is None else "ca_cert_file"
            self.fail(
                section.key_path(missing),
                "missing (give both ca_cert_file and ca_key_file, or neither to generate a CA)",
            )
        return TlsInterceptConfig(
            ca_cert_file=ca_cert_file,
            ca_key_file=ca_key_file,
            write_ca_cert_to=self.optional(section, "write_ca_cert_to", self.output_file),
        )

    def output_file(self, path: _KeyPath, value: object) -> Path:
        text, file_path = self.file_path(path, value)
        if file_path.is_dir():
            self.fail(path, f"{_show(text)} is a directory; expected a file name")
        if not file_path.parent.is_dir():
            self.fail(path, f"directory {_show(file_path.parent)} does not exist")
        return file_path

    def connect_ports(self, path: _KeyPath, value: object) -> tuple[int, ...]:
        if not isinstance(value, list):
            self.fail(path, f"expected a list of port numbers, got {_type_name(value)}")
        ports = [
            self.integer((*path, f"[{index}]"), item, minimum=1, maximum=65535)
            for index, item in enumerate(value)
        ]
        return tuple(dict.fromkeys(ports))

    def limits(self, path: _KeyPath, value: object) -> LimitsConfig:
        section = _Section(self, path, value, _LIMIT_KEYS)
        defaults = LimitsConfig()

        def count(path: _KeyPath, value: object) -> int:
            return self.integer(path, value, minimum=1, maximum=2**31 - 1)

        def optional_size(path: _KeyPath, value: object) -> int | None:
            return None if value is None else self.size(path, value)

        return LimitsConfig(
            max_request_line=self.with_default(
                section, "max_request_line", self.size, defaults.max_request_line
            ),
            max_header_size=self.with_default(
                section, "max_header_size", self.size, defaults.max_header_size
            ),
            max_headers=self.with_default(section, "max_headers", count, defaults.max_headers),
            max_body_size=self.with_default(
                section, "max_body_size", optional_size, defaults.max_body_size
            ),
            header_timeout=self.with_default(
                section, "header_timeout", self.duration, defaults.header_timeout
            ),
            idle_timeout=self.with_default(
                section, "idle_timeout", self.duration, defaults.idle_timeout
            ),
            tunnel_idle_timeout=self.with_default(
                section, "tunnel_idle_timeout", self.duration, defaults.tunnel_idle_timeout
            ),
            max_connections=self.with_default(
                section, "max_connections", count, defaults.max_connections
            ),
            admin_max_connections=self.with_default(
                section, "admin_max_connections", count, defaults.admin_max_connections
            ),
        )

    def upstreams(self, top: _Section) -> tuple[UpstreamConfig, ...]:
        value = top.get("upstreams")
        if value is _MISSING or value is None:
            return ()
        path = top.key_path("upstreams")
        if not isinstance(value, dict):
            self.fail(
                path, f"expected a mapping of upstream names to upstreams, got {_type_name(value)}"
            )
        result = []
        for name, body in value.items():
            if not isinstance(name, str):
                self.fail(
                    (*path, _key_segment(name)),
                    f"upstream names must be strings, got {_type_name(name)} (quote it)",
                )
            upstream_path = (*path, _key_segment(name))
            if not _UPSTREAM_NAME.fullmatch(name):
                self.fail(
                    upstream_path,
                    "invalid upstream name: use letters, digits, '_', '.' and '-' only "
                    "(it becomes a metric label)",
                )
            if name in _RESERVED_UPSTREAM_NAMES:
                self.fail(upstream_path, f"{name!r} is reserved (the label of unmatched requests)")
            result.append(self.upstream(upstream_path, name, body))
        return tuple(result)

    def upstream(self, path: _KeyPath, name: str, value: object) -> UpstreamConfig:
        section = _Section(self, path, value, _UPSTREAM_KEYS)
        defaults = UpstreamConfig(
            name=name, match=MatchConfig(hosts=()), token=TokenConfig(client_id="")
        )
        allow_insecure_http = self.with_default(
            section, "allow_insecure_http", self.boolean, defaults.allow_insecure_http
        )
        url = self.optional(
            section, "url", lambda path, value: self.target_url(path, value, allow_insecure_http)
        )
        listen = self.optional(section, "listen", self.address)
        if listen is not None and url is None:
            self.fail(
                section.key_path("listen"),
                "a reverse-proxy listen port needs url (where its requests are sent)",
            )
        return UpstreamConfig(
            name=name,
            match=self.required(section, "match", self.match),
            token=self.required(
                section,
                "token",
                lambda path, value: self.token(path, value, allow_insecure_http),
            ),
            url=url,
            listen=listen,
            header=self.with_default(section, "header", self.header_name, defaults.header),
            overwrite=self.with_default(section, "overwrite", self.boolean, defaults.overwrite),
            required=self.with_default(section, "required", self.boolean, defaults.required),
            tls=self.tls_client(section),
            connect_timeout=self.with_default(
                section, "connect_timeout", self.duration, defaults.connect_timeout
            ),
            timeout=self.with_default(section, "timeout", self.duration, defaults.timeout),
            allow_insecure_http=allow_insecure_http,
        )

    def match(self, path: _KeyPath, value: object) -> MatchConfig:
        section = _Section(self, path, value, _MATCH_KEYS)
        return MatchConfig(
            hosts=self.required(section, "hosts", self.host_matches),
            path_prefix=self.optional(section, "path_prefix", self.path_prefix),
        )

    def host_matches(self, path: _KeyPath, value: object) -> tuple[HostMatch, ...]:
        if not isinstance(value, list):
            hint = " (write [host] for one host)" if isinstance(value, str) else ""
            self.fail(path, f"expected a list of hosts, got {_type_name(value)}{hint}")
        if not value:
            self.fail(path, "must list at least one host")
        hosts = []
        for index, item in enumerate(value):
            item_path = (*path, f"[{index}]")
            text = self.string(item_path, item)
            try:
                host, port = _split_host_port(text, port_required=False)
            except ValueError as error:
                self.fail(item_path, f"{error} (expected host, host:port or [v6]:port)")
            if port == 0:
                self.fail(item_path, f"{_show(text)}: port must be from 1 to 65535")
            hosts.append(HostMatch(host, port))
        return tuple(hosts)

    def path_prefix(self, path: _KeyPath, value: object) -> str | None:
        text = self.string(path, value)
        if not text.startswith("/"):
            self.fail(path, f"{_show(text)} must start with '/'")
        if any(char in text for char in "?#") or any(
            not char.isprintable() or char.isspace() for char in text
        ):
            self.fail(path, f"{_show(text)} must be a plain path without query or fragment")
        if any(segment in (".", "..") for segment in text.split("/")):
            self.fail(path, f"{_show(text)} must not contain '.' or '..' segments")
        prefix = text.rstrip("/")
        return prefix or None

    def header_name(self, path: _KeyPath, value: object) -> str:
        text = self.string(path, value)
        if not _HTTP_TOKEN.fullmatch(text):
            self.fail(path, f"{_show(text)} is not a valid HTTP header name")
        if text.lower() in _FORBIDDEN_HEADERS:
            self.fail(path, f"{text} is managed by the proxy and cannot carry the token")
        return text

    def tls_client(self, section: _Section) -> TlsClientConfig:
        tls = TlsClientConfig(
            ca_file=self.optional(section, "ca_file", self.file),
            client_cert_file=self.optional(section, "client_cert_file", self.file),
            client_key_file=self.optional(section, "client_key_file", self.file),
        )
        if tls.client_key_file is not None and tls.client_cert_file is None:
            self.fail(section.key_path("client_cert_file"), "missing (client_key_file needs it)")
        return tls

    def web_url(self, path: _KeyPath, value: object, *, allow_path: bool) -> _WebUrl:
        """Check an http(s) URL's shape; returns the split URL with a validated host."""
        text = self.string(path, value).strip()
        if any(not char.isprintable() or char.isspace() for char in text):
            self.fail(path, "URL must not contain whitespace or control characters")
        try:
            parts = urllib.parse.urlsplit(text)
            port = parts.port
        except ValueError as error:
            self.fail(path, f"invalid URL {_show(text)}: {error}")
        if parts.scheme not in ("http", "https"):
            self.fail(path, f"{_show(text)}: URL scheme must be http or https")
        if "@" in parts.netloc:
            self.fail(path, "URL must not contain credentials (user:password@)")
        if not parts.hostname:
            self.fail(path, f"{_show(text)}: URL has no host")
        if "#" in text:
            self.fail(path, f"{_show(text)}: URL must not have a fragment")
        if not allow_path and ("?" in text or parts.path not in ("", "/")):
            self.fail(
                path,
                f"{_show(text)}: only scheme, host and port are used; remove the path/query",
            )
        host_text = parts.netloc.rsplit(":", 1)[0] if port is not None else parts.netloc
        try:
            host, _ = _split_host_port(host_text, port_required=False)
        except ValueError as error:
            self.fail(path, f"invalid URL host: {error}")
        if port == 0:
            self.fail(path, f"{_show(text)}: port must be from 1 to 65535")
        return _WebUrl(text, parts.scheme, host, port)

    def check_insecure(self, path: _KeyPath, url: _WebUrl, allow_insecure_http: bool) -> None:
        # RFC 6750 §5.3 / RFC 6749 §3.2: bearer tokens and client credentials must only
        # travel over TLS; plain http is fine on loopback (a sidecar next door).
        if url.scheme == "http" and not allow_insecure_http and not is_loopback_host(url.host):
            self.fail(
                path,
                f"{_show(url.text)} sends credentials in cleartext to a non-loopback host; "
                "use https, or set allow_insecure_http: true on the upstream",
            )

    def target_url(self, path: _KeyPath, value: object, allow_insecure_http: bool) -> TargetUrl:
        url = self.web_url(path, value, allow_path=False)
        self.check_insecure(path, url, allow_insecure_http)
        scheme = cast(Literal["http", "https"], url.scheme)
        default_port = 443 if scheme == "https" else 80
        return TargetUrl(scheme, url.host, default_port if url.port is None else url.port)

    def endpoint_url(self, path: _KeyPath, value: object, allow_insecure_http: bool) -> str:
        url = self.web_url(path, value, allow_path=True)
        self.check_insecure(path, url, allow_insecure_http)
        return url.text

    # -- token ---------------------------------------------------------------

    def token(self, path: _KeyPath, value: object, allow_insecure_http: bool) -> TokenConfig:
        section = _Section(self, path, value, _TOKEN_KEYS)

        def endpoint(path: _KeyPath, value: object) -> str:
            return self.endpoint_url(path, value, allow_insecure_http)

        token_url = self.optional(section, "token_url", endpoint)
        issuer = self.optional(section, "issuer", endpoint)
        if token_url is None and issuer is None:
            self.fail(section.key_path("token_url"), "missing (set token_url or issuer)")
        if token_url is not None and issuer is not None:
            self.fail(section.key_path("issuer"), "set either token_url or issuer, not both")
        client_id = self.required(section, "client_id", self.string)
        client_secret = self.optional(section, "client_secret", self.secret)
        client_secret_file = self.optional(section, "client_secret_file", self.secret_file)
        private_key_file = self.optional(section, "private_key_file", self.private_key_file)
        client_assertion_file = self.optional(section, "client_assertion_file", self.secret_file)
        key_id = self.optional(section, "key_id", self.string)
        tls = self.tls_client(section)
        default_method: AuthMethod = (
            "private_key_jwt"
            if private_key_file is not None or client_assertion_file is not None
            else "client_secret_basic"
        )
        auth_method = self.with_default(
            section,
            "auth_method",
            lambda path, value: self.choice(path, value, _AUTH_METHODS),
            default_method,
        )
        self.check_auth_method(section, auth_method, tls)
        defaults = TokenConfig(client_id=client_id)
        retry_initial = self.with_default(
            section, "retry_initial", self.duration, defaults.retry_initial
        )
        retry_max = self.with_default(section, "retry_max", self.duration, defaults.retry_max)
        if retry_max < retry_initial:
            self.fail(section.key_path("retry_max"), "must not be less than retry_initial")
        return TokenConfig(
            client_id=client_id,
            token_url=token_url,
            issuer=issuer,
            auth_method=auth_method,
            client_secret=client_secret,
            client_secret_file=client_secret_file,
            private_key_file=private_key_file,
            key_id=key_id,
            client_assertion_file=client_assertion_file,
            scope=self.with_default(section, "scope", self.scope, ()),
            audience=self.optional(section, "audience", self.string),
            resource=self.with_default(section, "resource", self.resource, ()),
            extra_params=self.extra_params(section),
            refresh_before_expiry=self.optional(
                section,
                "refresh_before_expiry",
                lambda path, value: (
                    None if value is None else self.duration(path, value, allow_zero=True)
                ),
            ),
            default_lifetime=self.with_default(
                section, "default_lifetime", self.duration, defaults.default_lifetime
            ),
            timeout=self.with_default(section, "timeout", self.duration, defaults.timeout),
            connect_timeout=self.with_default(
                section, "connect_timeout", self.duration, defaults.connect_timeout
            ),
            retry_initial=retry_initial,
            retry_max=retry_max,
            tls=tls,
        )

    def check_auth_method(
        self, section: _Section, method: AuthMethod, tls: TlsClientConfig
    ) -> None:
        """Each client authentication method takes exactly its own credentials (RFC 7591 §2)."""

        def present(key: str) -> bool:
            return key in section

        def not_used_with(key: str) -> None:
            if present(key):
                self.fail(section.key_path(key), f"not used with auth_method {method}")

        if method in ("client_secret_basic", "client_secret_post"):
            if present("client_secret") and present("client_secret_file"):
                self.fail(
                    section.key_path("client_secret_file"),
                    "set either client_secret or client_secret_file, not both",
                )
            if not present("client_secret") and not present("client_secret_file"):
                self.fail(
                    section.key_path("client_secret"),
                    f"missing (auth_method {method} needs client_secret or client_secret_file)",
                )
            for key in ("private_key_file", "client_assertion_file", "key_id"):
                not_used_with(key)
        elif method == "private_key_jwt":
            for key in ("client_secret", "client_secret_file"):
                not_used_with(key)
            if present("private_key_file") and present("client_assertion_file"):
                self.fail(
                    section.key_path("client_assertion_file"),
                    "set either private_key_file or client_assertion_file, not both",
                )
            if not present("private_key_file") and not present("client_assertion_file"):
                self.fail(
                    section.key_path("private_key_file"),
                    "missing (auth_method private_key_jwt needs private_key_file or "
                    "client_assertion_file)",
                )
            if present("key_id") and not present("private_key_file"):
                self.fail(section.key_path("key_id"), "only used with private_key_file")
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
                    self.fail(
                        section.key_path(key), "missing (auth_method tls_client_auth needs it)"
                    )

    def secret(self, path: _KeyPath, value: object) -> Secret:
        if not isinstance(value, str):
            self.fail(path, f"expected a string, got {_type_name(value)}")
        text = self.expand(path, value)
        if not text:
            self.fail(path, "must not be empty")
        return Secret(text)

    def secret_file(self, path: _KeyPath, value: object) -> Path:
        file_path = self.file(path, value)
        if not self.read_file(path, file_path).strip():
            self.fail(path, "file is empty")
        return file_path

    def private_key_file(self, path: _KeyPath, value: object) -> Path:
        file_path = self.file(path, value)
        data = self.read_file(path, file_path)
        # The library's messages are not shown: they could quote parts of the key.
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except TypeError:
            self.fail(path, "the private key is encrypted; provide an unencrypted PEM key")
        except (ValueError, UnsupportedAlgorithm):
            self.fail(path, "not a PEM-encoded private key")
        if isinstance(key, rsa.RSAPrivateKey):
            # RFC 7518 §3.3: RS256 keys must be 2048 bits or larger.
            if key.key_size < 2048:
                self.fail(path, f"RSA key is {key.key_size} bits; RS256 needs at least 2048")
        elif not (
            isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1)
        ):
            self.fail(path, "must be an RSA (RS256) or EC P-256 (ES256) private key")
        return file_path

    def scope(self, path: _KeyPath, value: object) -> tuple[str, ...]:
        scopes = self.string_list(path, value, split=True)
        for scope in scopes:
            if not _SCOPE_TOKEN.fullmatch(scope):
                self.fail(path, f"scope {_show(scope)} has characters RFC 6749 §3.3 does not allow")
        return scopes

    def resource(self, path: _KeyPath, value: object) -> tuple[str, ...]:
        resources = self.string_list(path, value, split=False)
        for resource in resources:
            # RFC 8707 §2: an absolute URI without a fragment.
            try:
                scheme = urllib.parse.urlsplit(resource).scheme
            except ValueError:
                scheme = ""
            if not scheme or "#" in resource:
                self.fail(path, f"{_show(resource)} must be an absolute URI without a fragment")
        return resources

    def extra_params(self, section: _Section) -> tuple[tuple[str, str], ...]:
        value = section.get("extra_params")
        if value is _MISSING:
            return ()
        path = section.key_path("extra_params")
        if not isinstance(value, dict):
            self.fail(
                path, f"expected a mapping of parameter names to values, got {_type_name(value)}"
            )
        params = []
        for name, param in value.items():
            param_path = (*path, _key_segment(name))
            if not isinstance(name, str) or not name:
                self.fail(param_path, "parameter names must be non-empty strings")
            if name in _PROXY_OWNED_PARAMS or name.startswith("client_assertion"):
                self.fail(param_path, f"{name} is set by the proxy and cannot be overridden")
            if name in ("audience", "resource") and name in section:
                self.fail(param_path, f"conflicts with token.{name}")
            if isinstance(param, bool):
                text = "true" if param else "false"
            elif isinstance(param, int | float):
                text = str(param)
            elif isinstance(param, str):
                text = self.expand(param_path, param)
            else:
                self.fail(
                    param_path,
                    f"expected a string, number or boolean, got {_type_name(param)}",
                )
            params.append((name, text))
        return tuple(params)

    # -- cross-upstream checks -------------------------------------------------

    def check_listen_conflicts(
        self, listen: Address, admin_listen: Address, upstreams: Sequence[UpstreamConfig]
    ) -> None:
        taken: list[tuple[str, Address]] = [("listen", listen), ("admin_listen", admin_listen)]
        for upstream in upstreams:
            if upstream.listen is None:
                continue
            for owner, address in taken:
                if _addresses_conflict(upstream.listen, address):
                    self.fail(
                        ("upstreams", upstream.name, "listen"),
                        f"{upstream.listen} conflicts with {owner} {address}",
                    )
            taken.append((f"upstreams.{upstream.name}.listen", upstream.listen))

    def check_host_overlaps(self, upstreams: Sequence[UpstreamConfig]) -> None:
        seen: dict[str, list[tuple[UpstreamConfig, int, HostMatch]]] = {}
        for upstream in upstreams:
            prefix = upstream.match.path_prefix
            for index, host in enumerate(upstream.match.hosts):
                for other, other_index, other_host in seen.get(host.host, []):
                    other_prefix = other.match.path_prefix
                    if not (
                        _ports_overlap(host.port, other_host.port)
                        and _prefixes_overlap(prefix, other_prefix)
                    ):
                        continue
                    path = ("upstreams", upstream.name, "match", "hosts", f"[{index}]")
                    this, that = _format_host_match(host), _format_host_match(other_host)
                    if other is upstream:
                        problem = (
                            f"{this} is listed twice"
                            if host == other_host
                            else f"{this} overlaps {that} (hosts[{other_index}]): "
                            "a host without a port matches ports 80 and 443"
                        )
                    else:
                        prefixes = ""
                        if prefix is not None and other_prefix is not None:
                            prefixes = f", path prefixes {prefix} and {other_prefix}"
                        problem = (
                            f"{this} of upstream {upstream.name} overlaps {that} of upstream "
                            f"{other.name}{prefixes}: a request would match both"
                        )
                    self.fail(path, problem)
                seen.setdefault(host.host, []).append((upstream, index, host))


class _WebUrl(NamedTuple):
    """An http(s) URL that passed the shape checks."""

    text: str
    scheme: str
    host: str
    port: int | None


def _addresses_conflict(a: Address, b: Address) -> bool:
    if a.port == 0 or b.port == 0 or a.port != b.port:
        return False
    return a.host == b.host or _is_wildcard(a.host) or _is_wildcard(b.host)


def load_config(path: str | Path, environ: Mapping[str, str] | None = None) -> ProxyConfig:
    """Read, expand `${VAR}`s in, and validate the YAML file at `path`.

    `${VAR}` comes from `environ` (default: `os.environ`). Relative file paths in the
    config are resolved against the config file's directory. Any problem raises
    `ConfigError`; no message contains a secret.
    """
    file = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise ConfigError(file, "", f"cannot read the config file: {error.strerror}") from None
    try:
        document = yaml.load(data, Loader=_StrictLoader)  # a SafeLoader
    except yaml.MarkedYAMLError as error:
        # Only the problem and its position: the library's snippet of the offending line
        # could contain a secret.
        mark = error.problem_mark or error.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = error.problem or error.context or "syntax error"
        raise ConfigError(file, "", f"invalid YAML{where}: {problem}") from None
    except yaml.YAMLError as error:
        position = getattr(error, "position", None)
        where = f" at position {position}" if position is not None else ""
        reason = getattr(error, "reason", None) or "unreadable document"
        raise ConfigError(file, "", f"invalid YAML{where}: {reason}") from None
    except RecursionError:
        raise ConfigError(file, "", "invalid YAML: nested too deeply") from None
    except Exception:
        # PyYAML's scalar constructors raise plain ValueError/KeyError/... for values
        # such as `2024-13-45` or `!!float abc`; their text may quote the value.
        raise ConfigError(
            file, "", "invalid YAML: a value could not be read (an invalid date or !!tag?)"
        ) from None
    loader = _Loader(file, Path(path).parent, os.environ if environ is None else environ)
    return loader.proxy(document)


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
