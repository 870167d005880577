"""Property tests pinning each fast function in `proxy.datapath.speedups` to its plain
reference version: the same result, or the same error, on every input."""

from __future__ import annotations

from collections.abc import Callable

from hypothesis import example, given, settings
from hypothesis import strategies as st

from proxy.datapath.speedups import (
    decimal,
    decimal_reference,
    slash_after_authority,
    slash_after_authority_reference,
)


def _outcome(function: Callable[[bytes], int], value: bytes) -> int | str:
    try:
        return function(value)
    except ValueError as error:
        return f"ValueError: {error}"


_BLANKS = st.text(alphabet=" \t", max_size=3)
_DIGITS = st.text(alphabet="0123456789", min_size=1, max_size=25)

# What llhttp passes on (digits between blanks), its edges (19-digit, zero-padded), and
# what it would not: signs, underscores, other whitespace, non-ASCII, stray bytes.
_CONTENT_LENGTHS = st.one_of(
    st.builds(lambda a, d, b: (a + d + b).encode(), _BLANKS, _DIGITS, _BLANKS),
    st.builds(
        lambda a, d, b: (a + d + b).encode(),
        _BLANKS,
        st.text(alphabet="0123456789 \t+-_\r\n\x0b\x0cx.", max_size=25),
        _BLANKS,
    ),
    st.binary(max_size=30),
)


@settings(max_examples=3000)
@given(_CONTENT_LENGTHS)
@example(b"")
@example(b" ")
@example(b"\t \t")
@example(b"0")
@example(b"007")
@example(b"999999999999999999")
@example(b"9999999999999999999")
@example(b"1000000000000000000000")
@example(b" 12 ")
@example(b"\t12\t")
@example(b"1 2")
@example(b"+5")
@example(b"-5")
@example(b"1_000")
@example(b"\x0b5\x0c")
@example(b"\r\n5")
@example(b"/")
@example(b":")
@example(b"\xff")
def test_decimal_matches_int(value: bytes) -> None:
    assert _outcome(decimal, value) == _outcome(decimal_reference, value)


_TARGET_BYTES = st.binary(max_size=40)
_TARGET_PIECES = st.lists(
    st.sampled_from([b":", b"/", b"//", b"://", b"http", b"a", b"?", b"#", b"@", b"\xff"]),
    max_size=12,
).map(b"".join)
_TARGETS = st.one_of(
    _TARGET_BYTES,
    _TARGET_PIECES,
    st.builds(
        lambda scheme, host, path: scheme + b"://" + host + path,
        st.sampled_from([b"http", b"https", b"ws", b"", b"HTTP"]),
        st.binary(max_size=20),
        st.binary(max_size=20),
    ),
)


@settings(max_examples=3000)
@given(_TARGETS)
@example(b"")
@example(b":")
@example(b":/")
@example(b"://")
@example(b"://a")
@example(b":///")
@example(b"http://host/")
@example(b"http://host")
@example(b"http://host:80/path")
@example(b"http:/host/")
@example(b"http:host/x")
@example(b"/path:x//y/")
@example(b"a:b://c/d")
def test_slash_after_authority_matches_find(target: bytes) -> None:
    assert slash_after_authority(target) == slash_after_authority_reference(target)
