"""URLs in the config: an upstream's `url`, token endpoints and issuers, the Redis `url`.

Every URL is checked for its shape here (scheme, host, port, no credentials, no
fragment), with the same host rules as `match.hosts`. Bearer tokens and client
credentials only travel in cleartext to loopback unless the upstream opts in
(`allow_insecure_http`); a Redis URL never carries a password (that is `password_file`).
"""

from __future__ import annotations

import re
import urllib.parse
from typing import Literal, NamedTuple, cast

from proxy.config.model import TargetUrl
from proxy.config.scalars import split_host_port
from proxy.config.source import KeyPath, Read, Reader, show
from proxy.hosts import is_loopback_host

__all__ = ["REDIS_SCHEMES", "endpoint_url", "redis_url", "target_url"]

REDIS_SCHEMES = ("redis", "rediss")
# A Redis URL's path is at most a database number: `/0`, `/15`.
_REDIS_PATH = re.compile(r"/?|/[0-9]{1,9}")


class _WebUrl(NamedTuple):
    """An http(s) URL that passed the shape checks."""

    text: str
    scheme: str
    host: str
    port: int | None


def _web_url(reader: Reader, path: KeyPath, value: object, *, allow_path: bool) -> _WebUrl:
    """Check an http(s) URL's shape; returns the split URL with a validated host."""
    text = reader.string(path, value).strip()
    if any(not char.isprintable() or char.isspace() for char in text):
        reader.fail(path, "URL must not contain whitespace or control characters")
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port
    except ValueError as error:
        reader.fail(path, f"invalid URL {show(text)}: {error}")
    if parts.scheme not in ("http", "https"):
        reader.fail(path, f"{show(text)}: URL scheme must be http or https")
    if "@" in parts.netloc:
        reader.fail(path, "URL must not contain credentials (user:password@)")
    if not parts.hostname:
        reader.fail(path, f"{show(text)}: URL has no host")
    if "#" in text:
        reader.fail(path, f"{show(text)}: URL must not have a fragment")
    if not allow_path and ("?" in text or parts.path not in ("", "/")):
        reader.fail(
            path,
            f"{show(text)}: only scheme, host and port are used; remove the path/query",
        )
    host_text = parts.netloc.rsplit(":", 1)[0] if port is not None else parts.netloc
    try:
        host, _ = split_host_port(host_text, port_required=False)
    except ValueError as error:
        reader.fail(path, f"invalid URL host: {error}")
    if port == 0:
        reader.fail(path, f"{show(text)}: port must be from 1 to 65535")
    return _WebUrl(text, parts.scheme, host, port)


def _check_insecure(reader: Reader, path: KeyPath, url: _WebUrl, allow_insecure_http: bool) -> None:
    # RFC 6750 §5.3 / RFC 6749 §3.2: bearer tokens and client credentials must only
    # travel over TLS; plain http is fine on loopback (a sidecar next door).
    if url.scheme == "http" and not allow_insecure_http and not is_loopback_host(url.host):
        reader.fail(
            path,
            f"{show(url.text)} sends credentials in cleartext to a non-loopback host; "
            "use https, or set allow_insecure_http: true on the upstream",
        )


def target_url(allow_insecure_http: bool) -> Read[TargetUrl]:
    """A read of an upstream's `url`: scheme, host and port only."""

    def read(reader: Reader, path: KeyPath, value: object) -> TargetUrl:
        url = _web_url(reader, path, value, allow_path=False)
        _check_insecure(reader, path, url, allow_insecure_http)
        scheme = cast(Literal["http", "https"], url.scheme)
        default_port = 443 if scheme == "https" else 80
        return TargetUrl(scheme, url.host, default_port if url.port is None else url.port)

    return read


def endpoint_url(allow_insecure_http: bool) -> Read[str]:
    """A read of a token endpoint or issuer URL: kept as written, path included."""

    def read(reader: Reader, path: KeyPath, value: object) -> str:
        url = _web_url(reader, path, value, allow_path=True)
        _check_insecure(reader, path, url, allow_insecure_http)
        return url.text

    return read


def redis_url(reader: Reader, path: KeyPath, value: object) -> str:
    """`redis://host[:port][/db]` or `rediss://...` (TLS), without credentials."""
    text = reader.string(path, value).strip()
    if any(not char.isprintable() or char.isspace() for char in text):
        reader.fail(path, "URL must not contain whitespace or control characters")
    # Checked before anything that echoes the URL: a password must not reach a message.
    if "@" in text:
        reader.fail(
            path,
            "URL must not contain credentials (user:password@); use username and password_file",
        )
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port
    except ValueError as error:
        reader.fail(path, f"invalid URL {show(text)}: {error}")
    if parts.scheme not in REDIS_SCHEMES:
        reader.fail(path, f"{show(text)}: URL scheme must be redis, or rediss for TLS")
    if not parts.hostname:
        reader.fail(path, f"{show(text)}: URL has no host")
    if "?" in text or "#" in text or not _REDIS_PATH.fullmatch(parts.path):
        reader.fail(
            path,
            f"{show(text)}: only scheme, host, port and a database number (/0) are used",
        )
    host_text = parts.netloc.rsplit(":", 1)[0] if port is not None else parts.netloc
    try:
        split_host_port(host_text, port_required=False)
    except ValueError as error:
        reader.fail(path, f"invalid URL host: {error}")
    if port == 0:
        reader.fail(path, f"{show(text)}: port must be from 1 to 65535")
    return text
