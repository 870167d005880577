"""Cutting heads apart: `read_response_head` and `HeadFields` against plain references.

`read_response_head` takes shortcuts that are only sound because llhttp has already
accepted the head (one field per line, no space before a colon, CRLF line ends). So
hypothesis builds heads from field names the proxy sets aside (in any letter case),
names a Connection field may list, and others; llhttp's own response parser filters
them; and for every head it accepts the result must equal what a plain reading of
RFC 9110 §7.6.1 gives: every field line as received, in order, minus the hop-by-hop and
framing fields and the fields a Connection field names. Request fields, which arrive one
by one, must be sorted by `HeadFields` exactly as comparing lower-cased names would.
"""

from __future__ import annotations

import httptools
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from proxy.datapath.messages import FRAMING, HOP_BY_HOP, HeadFields, read_response_head

SET_ASIDE = HOP_BY_HOP | FRAMING
OTHER_NAMES = [b"Server", b"Date", b"Content-Type", b"ETag", b"X-Trace", b"Keep", b"Hosts", b"T"]
# Same initial and length as a set-aside name: only comparing the whole name tells.
SAME_SHAPE_NAMES = [
    b"Connectiox",
    b"Content-Lengtx",
    b"Hast",
    b"Tf",
    b"Upgradx",
    b"Proxy-Connexion",
]


def spellings(name: bytes) -> st.SearchStrategy[bytes]:
    """`name` with any of its letters in the other case."""
    return st.lists(st.booleans(), min_size=len(name), max_size=len(name)).map(
        lambda flips: bytes(
            ord(chr(c).swapcase()) if flip else c for c, flip in zip(name, flips, strict=True)
        )
    )


field_names = st.one_of(
    st.sampled_from(sorted(SET_ASIDE)).flatmap(spellings),
    st.sampled_from(OTHER_NAMES + SAME_SHAPE_NAMES).flatmap(spellings),
)
values = st.one_of(
    st.sampled_from([b"keep-alive", b"close", b"upgrade", b"chunked", b"gzip, chunked", b"42"]),
    st.sampled_from([b"Keep-Alive", b"CLOSE", b"keep-alive ", b"close\t", b"keep-alive, x-trace"]),
    # Content-Length values, with blanks around them as llhttp allows.
    st.tuples(
        st.sampled_from([b"", b" ", b"\t "]),
        st.integers(0, 10**20).map(lambda n: str(n).encode()),
        st.sampled_from([b"", b" ", b" \t"]),
    ).map(b"".join),
    st.sampled_from([b"x-trace", b"X-Trace, Keep", b"close, server", b"date , etag"]),
    st.binary(max_size=12).map(lambda v: bytes(b for b in v if 0x20 <= b < 0x7F)),
)
fields = st.lists(st.tuples(field_names, values, st.sampled_from([b"", b" ", b"  "])), max_size=8)
status_lines = st.sampled_from(
    [
        b"HTTP/1.1 200 OK",
        b"HTTP/1.0 404 Not Found",
        b"HTTP/1.1 204 ",
        b"HTTP/1.1 302",
        b"HTTP/1.1 101 Up",
    ]
)


class _Accepted:
    """What llhttp reports for a head it accepts."""

    def __init__(self) -> None:
        self.complete = False

    def on_headers_complete(self) -> None:
        self.complete = True


def llhttp_accepts(raw: bytes) -> tuple[int, bool] | None:
    """(status, keep-alive) if llhttp takes `raw` as a complete response head, else None."""
    seen = _Accepted()
    parser = httptools.HttpResponseParser(seen)
    try:
        parser.feed_data(raw)
    except httptools.HttpParserUpgrade:
        pass
    except httptools.HttpParserError:
        return None
    if not seen.complete:
        return None
    return parser.get_status_code(), parser.should_keep_alive()


def reference_fields(raw: bytes) -> bytes:
    """The field lines a proxy forwards, read line by line (RFC 9110 §7.6.1)."""
    lines = raw.split(b"\r\n")[1:-2]
    named = [(line.partition(b":")[0].lower(), line) for line in lines]
    listed: set[bytes] = set()
    for name, line in named:
        value = line.partition(b":")[2].strip().lower()
        if name == b"connection" and value not in (b"keep-alive", b"close", b"upgrade"):
            listed.update(token.strip() for token in value.split(b","))
    return b"".join(
        b"\r\n" + line for name, line in named if name not in SET_ASIDE and name not in listed
    )


@settings(max_examples=600, deadline=None)
@given(status_line=status_lines, head_fields=fields)
@example(status_line=b"HTTP/1.1 200 OK", head_fields=[(b"Connection", b"X-Trace", b" ")])
@example(status_line=b"HTTP/1.1 200 OK", head_fields=[(b"Content-Length", b"42", b"")])
@example(
    status_line=b"HTTP/1.1 200 OK",
    head_fields=[(b"Connection", b"keep-alive, x-trace", b" "), (b"X-Trace", b"1", b" ")],
)
def test_response_heads_are_cut_as_a_line_by_line_reading_would(
    status_line: bytes, head_fields: list[tuple[bytes, bytes, bytes]]
) -> None:
    raw = status_line + b"".join(b"\r\n%b:%b%b" % (n, s, v) for n, v, s in head_fields)
    raw += b"\r\n\r\n"
    accepted = llhttp_accepts(raw)
    assume(accepted is not None)
    assert accepted is not None
    status, keep_alive = accepted
    head = read_response_head(raw, status, keep_alive)
    assert head.status == status
    assert head.version == status_line[5:8].decode()
    assert head.reason == status_line[13:]
    assert head.fields == reference_fields(raw)
    lowered = {n.lower(): v.strip() for n, v, _ in head_fields}
    if head.chunked:
        assert lowered[b"transfer-encoding"].endswith(b"chunked")
        assert head.content_length is None
    elif b"content-length" in lowered:
        assert head.content_length == int(lowered[b"content-length"])
    else:
        assert head.content_length is None


@settings(max_examples=300, deadline=None)
@given(request_fields=st.lists(st.tuples(field_names, values), max_size=8))
def test_request_fields_are_sorted_as_comparing_lowered_names_would(
    request_fields: list[tuple[bytes, bytes]],
) -> None:
    fields = HeadFields()
    for name, value in request_fields:
        fields.add(name, value)
    assert fields.aside == [(n.lower(), v) for n, v in request_fields if n.lower() in SET_ASIDE]
    assert fields.kept == [(n, v) for n, v in request_fields if n.lower() not in SET_ASIDE]
    assert len(fields) == len(request_fields)
