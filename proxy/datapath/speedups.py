"""Hand-written versions of small byte-level functions on the hot path.

Each fast function here does what a one-line use of a built-in would, and sits beside
that plain reference version (`*_reference`). Once compiled, a byte loop over a short
value runs several times cheaper than the built-in: `int()` of bytes and `bytes.find`
parse their arguments and go through generic machinery on every call.

The two versions must agree on every input, errors included;
tests/datapath/test_speedups.py checks that with random and adversarial inputs. A fast
version is only worth keeping while the instruction counts of `python -m
bench.instructions` show it pays.
"""

from __future__ import annotations

from typing import Final

_SPACE: Final = 32
_TAB: Final = 9
_ZERO: Final = 48  # ord("0")
_COLON: Final = 58  # ord(":")
_SLASH: Final = 47  # ord("/")
_MAX_DIGITS: Final = 18  # any such number fits a native (63-bit) int


def decimal(value: bytes) -> int:
    """`int(value)` for a field value llhttp accepted as a Content-Length: digits between
    optional blanks. Read byte by byte: `int()` of bytes costs several times more.
    Anything else (never seen after llhttp) is left to `int()`, errors included."""
    start = 0
    end = len(value)
    while start < end and (value[start] == _SPACE or value[start] == _TAB):
        start += 1
    while end > start and (value[end - 1] == _SPACE or value[end - 1] == _TAB):
        end -= 1
    if start == end or end - start > _MAX_DIGITS:
        return int(value)
    number = 0
    for index in range(start, end):
        digit = value[index] - _ZERO
        if not 0 <= digit <= 9:
            return int(value)
        number = number * 10 + digit
    return number


def decimal_reference(value: bytes) -> int:
    """What `decimal` computes, plainly: the same value, the same `ValueError`."""
    return int(value)


def slash_after_authority(target: bytes) -> int:
    """Where the first '/' after `scheme://` is, or -1: a byte scan (cheaper than find()
    once compiled; the scheme and authority are a few dozen bytes)."""
    length = len(target)
    index = 0
    while index < length and target[index] != _COLON:
        index += 1
    if index + 2 >= length or target[index + 1] != _SLASH or target[index + 2] != _SLASH:
        return -1
    index += 3
    while index < length and target[index] != _SLASH:
        index += 1
    return index if index < length else -1


def slash_after_authority_reference(target: bytes) -> int:
    """What `slash_after_authority` computes, with `bytes.find`: after the first ':', if
    `//` follows it and at least one byte follows the ':', the next '/' after those."""
    colon = target.find(b":")
    if colon < 0 or colon + 2 >= len(target) or target[colon + 1 : colon + 3] != b"//":
        return -1
    return target.find(b"/", colon + 3)
