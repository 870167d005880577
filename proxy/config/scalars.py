"""Scalars: durations, sizes, hosts, `host:port` addresses, booleans, integers and choices.

Two layers. The parsers (`parse_duration`, `parse_size`, `split_host_port`, ...) take a
value and return it typed or raise `ValueError` with the problem; the reads (`duration`,
`size`, `address`, `boolean`, `integer`, `one_of`, ...) take a `Reader`, a key path and
a value, expand `${VAR}` where strings may hold one, and turn a `ValueError` into the
config error for that key path.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import re
from collections.abc import Sequence
from typing import TypeVar

from proxy.config.model import Address
from proxy.config.source import KeyPath, Read, Reader, is_secretish, show, type_name

__all__ = [
    "MAX_COUNT",
    "address",
    "boolean",
    "count",
    "duration",
    "integer",
    "is_wildcard",
    "one_of",
    "parse_duration",
    "parse_host",
    "parse_ipv6",
    "parse_size",
    "size",
    "split_host_port",
]

_Choice = TypeVar("_Choice", bound=str)

# The largest count a setting takes (a C int, as the limits of the data path are).
MAX_COUNT = 2**31 - 1

# ---------------------------------------------------------------------------
# Parsers
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
        raise ValueError(f"expected a duration like 90s, 5m or 1h, got {type_name(value)}")
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
            f"invalid duration {show(text)}: use e.g. 250ms, 90s, 5m, 1h, 1h30m or seconds"
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


def parse_size(value: object) -> int:
    """Bytes as an int, or `512KiB` / `10MiB` / `1GiB` / `10MB`; ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError("expected a size in bytes, got a boolean")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        match = _SIZE.fullmatch(value.strip())
        if match is None or len(match.group(1)) > 20:
            raise ValueError(f"invalid size {show(value)}: use e.g. 65536, 512KiB, 10MiB or 1GB")
        size = int(match.group(1)) * _SIZE_UNIT_BYTES[match.group(2)]
    else:
        raise ValueError(f"expected a size like 65536 or 10MiB, got {type_name(value)}")
    if size <= 0:
        raise ValueError("must be greater than 0")
    return size


_HOSTNAME_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")


def parse_host(text: str) -> str:
    """A hostname or IP literal (IPv6 without brackets): lower-cased, one trailing dot removed."""
    if text.startswith("["):
        raise ValueError("unexpected '['")
    if ":" in text:
        try:
            return parse_ipv6(text)
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
            raise ValueError(f"{show(text)} is not a valid hostname or IP address")
    if all(label.isdigit() for label in labels):
        try:
            return str(ipaddress.IPv4Address(host))
        except ValueError:
            raise ValueError(f"{show(text)} is not a valid IPv4 address") from None
    return host


def parse_ipv6(text: str) -> str:
    if "%" in text:
        raise ValueError("IPv6 zone identifiers are not supported")
    return ipaddress.IPv6Address(text).compressed


def split_host_port(text: str, *, port_required: bool) -> tuple[str, int | None]:
    """Split `host`, `host:port` or `[v6]:port`; the port is None when absent."""
    if not text:
        raise ValueError("empty")
    if any(not char.isprintable() or char.isspace() for char in text):
        raise ValueError("must not contain whitespace or control characters")
    bad = sorted({char for char in text if char in "/@?#%\\"})
    if bad:
        raise ValueError(f"{show(text)} contains {' '.join(repr(c) for c in bad)}")
    port_text: str | None
    if text.startswith("["):
        closing = text.find("]")
        if closing < 0:
            raise ValueError(f"{show(text)}: missing ']'")
        try:
            host = parse_ipv6(text[1:closing])
        except ValueError:
            raise ValueError(f"{show(text)}: not a valid IPv6 address in brackets") from None
        rest = text[closing + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(f"{show(text)}: expected ':port' after ']'")
        port_text = rest[1:] if rest else None
    elif text.count(":") > 1:
        raise ValueError(f"{show(text)}: write IPv6 literals in brackets, e.g. [::1]:8080")
    else:
        host_text, colon, after = text.partition(":")
        host = parse_host(host_text)
        port_text = after if colon else None
    if port_text is None:
        if port_required:
            raise ValueError(f"{show(text)}: missing the port")
        return host, None
    if not port_text.isdigit() or not port_text.isascii() or len(port_text) > 5:
        raise ValueError(f"{show(text)}: port must be a number from 0 to 65535")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"{show(text)}: port must be a number from 0 to 65535")
    return host, port


def is_wildcard(host: str) -> bool:
    return host in ("0.0.0.0", "::")


# ---------------------------------------------------------------------------
# Reads
# ---------------------------------------------------------------------------


def boolean(reader: Reader, path: KeyPath, value: object) -> bool:
    if not isinstance(value, bool):
        reader.fail(path, f"expected a boolean (true or false), got {type_name(value)}")
    return value


def integer(reader: Reader, path: KeyPath, value: object, *, minimum: int, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        reader.fail(path, f"expected an integer, got {type_name(value)}")
    if not minimum <= value <= maximum:
        reader.fail(path, f"must be from {minimum} to {maximum}")
    return value


def count(reader: Reader, path: KeyPath, value: object) -> int:
    """An integer from 1 to `MAX_COUNT`."""
    return integer(reader, path, value, minimum=1, maximum=MAX_COUNT)


def duration(reader: Reader, path: KeyPath, value: object, *, allow_zero: bool = False) -> float:
    if isinstance(value, str):
        value = reader.expand(path, value)
    try:
        seconds = parse_duration(value)
    except ValueError as error:
        reader.fail(path, str(error))
    if seconds == 0 and not allow_zero:
        reader.fail(path, "must be greater than 0")
    return seconds


def size(reader: Reader, path: KeyPath, value: object) -> int:
    if isinstance(value, str):
        value = reader.expand(path, value)
    try:
        return parse_size(value)
    except ValueError as error:
        reader.fail(path, str(error))


def one_of(choices: Sequence[_Choice]) -> Read[_Choice]:
    """A read that takes exactly one of `choices`, suggesting the closest on a typo."""

    def read(reader: Reader, path: KeyPath, value: object) -> _Choice:
        text = reader.string(path, value)
        for choice in choices:
            if text == choice:
                return choice
        close = difflib.get_close_matches(text.lower(), choices, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else ""
        shown = "" if is_secretish(path) else f"{show(text)}: "
        reader.fail(path, f"{shown}must be one of {', '.join(choices)}{hint}")

    return read


def address(reader: Reader, path: KeyPath, value: object) -> Address:
    text = reader.string(path, value)
    try:
        host, port = split_host_port(text.strip(), port_required=True)
    except ValueError as error:
        reader.fail(path, f"{error} (expected host:port or [v6]:port)")
    assert port is not None  # port_required
    return Address(host, port)
