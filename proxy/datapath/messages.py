"""HTTP/1.1 message heads: sorting fields, serialisation.

What the proxy forwards is what it received, in the same order and case, minus what
RFC 9110 §7.6.1 says a proxy must not forward. The hop-by-hop and framing fields, which
the proxy reads and never forwards as they are, are set aside; every other field is
kept without being looked at twice.

Request fields are sorted by `HeadFields` as the parser reports them, one by one.
A response head, which llhttp has already checked and which usually carries many
fields the proxy never reads, is cut into lines by `read_response_head`: only lines
whose name could be a set-aside one (by its initial and length) are looked at closer,
and the rest is forwarded verbatim.
"""

from __future__ import annotations

from typing import Final

from proxy.datapath.speedups import decimal
from proxy.errors import REASON_PHRASES

Headers = list[tuple[bytes, bytes]]

# Module constants are `Final` so that the compiled build reads them from C statics
# instead of looking them up in the module's dictionary on every use.

# RFC 9110 §7.6.1 hop-by-hop fields, the legacy ones real clients still send, and the
# proxy's own credentials (Proxy-Authorization is meant for this hop only).
HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

# Written by the proxy itself from what it knows about the message it sends.
FRAMING: Final = frozenset({b"content-length", b"host"})
_SET_ASIDE: Final = HOP_BY_HOP | FRAMING
# Connection values that name no other field, as nearly every message has them.
_PLAIN_CONNECTION: Final = frozenset({b"keep-alive", b"close", b"upgrade"})
# Set-aside names told apart by their shape: initial letter (0 for a/A, ..., 25 for
# z/Z) and length. A field name is only lower-cased and compared if a set-aside name
# has its shape, and then only with that one name; a response's field line is not even
# scanned for its colon unless its initial is one of theirs.
_SET_ASIDE_INITIALS: Final = sum({1 << (name[0] - 97) for name in _SET_ASIDE})
_LONGEST_SET_ASIDE: Final = max(len(name) for name in _SET_ASIDE)


def _names_by_shape() -> list[bytes | None]:
    table: list[bytes | None] = [None] * ((_LONGEST_SET_ASIDE + 1) * 32)
    for name in _SET_ASIDE:
        table[len(name) * 32 + name[0] - 97] = name
    return table


# Indexed by length * 32 + initial (a list: a dict lookup would box the key first).
_SET_ASIDE_BY_SHAPE: Final = _names_by_shape()
_CASE_BIT: Final = 0x20  # set in an ASCII letter's lower-case form
_LOWER_A: Final = 97  # ord("a")
_COLON: Final = 58  # ord(":")

# For a status line that came without a reason phrase.
_STATUS_REASONS: Final = {code: phrase.encode("ascii") for code, phrase in REASON_PHRASES.items()}


# The heads are plain classes rather than dataclasses: one is built per message, and a
# dataclass's generated __init__ stays interpreted Python in the compiled build.


class RequestHead:
    """A parsed request head, as received from the client."""

    __slots__ = (
        "chunked",
        "content_length",
        "headers",
        "hosts",
        "keep_alive",
        "method",
        "target",
        "upgrade",
        "upgrade_to",
        "version",
    )

    def __init__(
        self,
        method: str,
        target: bytes,
        version: str,
        headers: Headers,  # end-to-end fields only (see HeadFields)
        keep_alive: bool,
        *,
        upgrade: bool = False,
        content_length: int | None = None,
        chunked: bool = False,
        hosts: tuple[bytes, ...] = (),  # the Host field values
        upgrade_to: bytes | None = None,  # the Upgrade field value
    ) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.keep_alive = keep_alive
        self.upgrade = upgrade
        self.content_length = content_length
        self.chunked = chunked
        self.hosts = hosts
        self.upgrade_to = upgrade_to

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)


class ResponseHead:
    """A parsed response head, as received from the upstream."""

    __slots__ = (
        "chunked",
        "content_length",
        "fields",
        "keep_alive",
        "reason",
        "status",
        "upgrade_to",
        "version",
    )

    def __init__(
        self,
        status: int,
        reason: bytes,
        version: str,
        # The end-to-end field lines as received, each preceded by CRLF (read_response_head).
        fields: bytes,
        keep_alive: bool,
        *,
        content_length: int | None = None,
        chunked: bool = False,
        upgrade_to: bytes | None = None,
    ) -> None:
        self.status = status
        self.reason = reason
        self.version = version
        self.fields = fields
        self.keep_alive = keep_alive
        self.content_length = content_length
        self.chunked = chunked
        self.upgrade_to = upgrade_to


class HeadFields:
    """The fields of one request head as the parser reports them, sorted on arrival.

    Hop-by-hop and framing fields (RFC 9110 §7.6.1, Host, Content-Length) are set aside
    with lower-cased names for the proxy to read; all others are kept in order, and only
    those of the same initial and length as a set-aside name are lower-cased to tell.
    """

    __slots__ = ("aside", "kept", "size")

    def __init__(self) -> None:
        self.kept: Headers = []
        self.aside: Headers = []
        self.size = 0

    def add(self, name: bytes, value: bytes) -> None:
        length = len(name)
        self.size += length + len(value) + 4
        if 0 < length <= _LONGEST_SET_ASIDE:
            initial = (name[0] | _CASE_BIT) - _LOWER_A
            if 0 <= initial < 26:
                set_aside = _SET_ASIDE_BY_SHAPE[length * 32 + initial]
                if set_aside is not None and name.lower() == set_aside:
                    self.aside.append((set_aside, value))
                    return
        self.kept.append((name, value))

    def __len__(self) -> int:
        return len(self.kept) + len(self.aside)

    def end_to_end(self) -> Headers:
        """The kept fields, minus any that a Connection field names (RFC 9110 §7.6.1)."""
        listed = _connection_listed([value for name, value in self.aside if name == b"connection"])
        if listed:
            return [(name, value) for name, value in self.kept if name.lower() not in listed]
        return self.kept


def _connection_listed(values: list[bytes]) -> set[bytes]:
    """The names of other fields that Connection field `values` make hop-by-hop."""
    listed: set[bytes] = set()
    for value in values:
        if value.lower() not in _PLAIN_CONNECTION:
            listed.update(part.strip().lower() for part in value.split(b","))
    if listed:
        listed -= _SET_ASIDE
        listed.discard(b"")
    return listed


def read_response_head(raw: bytes, status: int, keep_alive: bool) -> ResponseHead:
    """Cut `raw`, a complete HTTP response head llhttp accepted, into a `ResponseHead`.

    llhttp has checked the syntax (`HTTP/d.d ddd` status line, CRLF line ends, no line
    folding, no space before a colon, a colon in every field line), so each line is a
    field whose name ends at its first colon. (llhttp also takes `RTSP/` and `ICE/`
    status lines: the caller refuses those.) The lines of set-aside fields are read and
    left out; the others are kept byte for byte, in order.
    """
    lines = raw.split(b"\r\n")  # the status line, the field lines, then b"" and b""
    status_line = lines[0]
    reason = status_line[13:]  # empty for `HTTP/1.1 302`, without a space after the code
    version_digits = raw[5:8]
    version = "1.1" if version_digits == b"1.1" else version_digits.decode("ascii")
    content_length: int | None = None
    chunked = False
    upgrade_to: bytes | None = None
    connection: list[bytes] = []
    kept: list[bytes] = []
    for index in range(1, len(lines) - 2):
        line = lines[index]
        initial = (line[0] | _CASE_BIT) - _LOWER_A
        if 0 <= initial < 26 and _SET_ASIDE_INITIALS >> initial & 1:
            colon = 1
            while line[colon] != _COLON:
                colon += 1
            name = (
                _SET_ASIDE_BY_SHAPE[colon * 32 + initial] if colon <= _LONGEST_SET_ASIDE else None
            )
            if name is not None and line[:colon].lower() == name:
                value = line[colon + 1 :]
                if name == b"content-length":
                    content_length = decimal(value)  # llhttp refuses duplicates and non-digits
                elif name == b"transfer-encoding":
                    chunked = value.rstrip().lower().endswith(b"chunked")
                elif name == b"connection":
                    # As nearly every response spells it: nothing to read from it.
                    if value != b" keep-alive" and value != b" close":
                        value = value.strip().lower()
                        if value not in _PLAIN_CONNECTION:
                            connection.append(value)
                elif name == b"upgrade":
                    upgrade_to = value.strip()
                continue
        kept.append(line)
    if connection:
        listed = _connection_listed(connection)
        if listed:
            kept = [line for line in kept if line.partition(b":")[0].lower() not in listed]
    if len(kept) == len(lines) - 3:
        fields = raw[len(status_line) : len(raw) - 4]  # nothing left out
    else:
        fields = b"\r\n" + b"\r\n".join(kept) if kept else b""
    return ResponseHead(
        status,
        reason,
        version,
        fields,
        keep_alive,
        content_length=None if chunked else content_length,
        chunked=chunked,
        upgrade_to=upgrade_to,
    )


# RFC 9110 §7.6.3: the protocol the message was received with, and who received it.
# A field line of its own after the message's own Via lines: the same as appending to
# them (RFC 9110 §5.3).
VIA_11: Final = b"Via: 1.1 token-proxy\r\n"
VIA_10: Final = b"Via: 1.0 token-proxy\r\n"
VIA_2: Final = b"Via: 2 token-proxy\r\n"


def via_line(version: str) -> bytes:
    """The Via field line for a message received as HTTP/`version` ("1.1", "1.0", "2")."""
    if version == "1.1":
        return VIA_11
    return VIA_2 if version == "2" else VIA_10


def request_head_bytes(
    method: str, path: bytes, host: bytes, headers: Headers, framing: bytes, via: bytes
) -> bytes:
    """The request head sent upstream: HTTP/1.1, our Host first, then the end-to-end
    fields, `framing` and `via` (a Via field line, or empty)."""
    parts = [method.encode("ascii"), b" ", path, b" HTTP/1.1\r\nHost: ", host, b"\r\n"]
    for name, value in headers:
        parts.append(b"%b: %b\r\n" % (name, value))
    parts.append(framing)
    parts.append(via)
    parts.append(b"\r\n")
    return b"".join(parts)


def response_head_bytes(
    status: int, reason: bytes, fields: bytes, framing: bytes, via: bytes = b""
) -> bytes:
    """The response head sent to the client: HTTP/1.1, `fields` (CRLF-prefixed lines),
    `via` (a Via field line, or empty) and `framing`."""
    if not reason:
        reason = _STATUS_REASONS.get(status, b"Unknown")
    return b"HTTP/1.1 %d %b%b\r\n%b%b\r\n" % (status, reason, fields, via, framing)


def frame_response(
    request: RequestHead, response: ResponseHead, *, keep_alive: bool, via: bool = False
) -> tuple[bytes, bool, bool, bool]:
    """The head to send the client for `response`, and how its body is framed; with
    `via`, a Via field line for it.

    Returns ``(head, has_body, rechunk, keep_alive)``: whether a body follows, whether
    its bytes must be sent as chunks (the upstream's framing cannot be kept: chunked, or
    delimited by closing), and whether the client connection stays open afterwards.
    """
    no_body = request.method == "HEAD" or response.status in (204, 304)
    rechunk = False
    if no_body:
        if response.content_length is not None and response.status != 204:
            framing = b"Content-Length: %d\r\n" % response.content_length
        elif response.chunked and request.method == "HEAD":
            framing = b"Transfer-Encoding: chunked\r\n"
        else:
            framing = b""
    elif response.content_length is not None:
        framing = b"Content-Length: %d\r\n" % response.content_length
    elif request.version == "1.1":
        framing = b"Transfer-Encoding: chunked\r\n"
        rechunk = True
    else:
        framing = b""
        keep_alive = False  # close-delimited for an HTTP/1.0 client
    if not keep_alive:
        framing += b"Connection: close\r\n"
    elif request.version == "1.0":
        framing += b"Connection: keep-alive\r\n"
    head = response_head_bytes(
        response.status,
        response.reason,
        response.fields,
        framing,
        via_line(response.version) if via else b"",
    )
    return head, not no_body, rechunk, keep_alive


def field_values(fields: bytes, name: bytes) -> list[bytes]:
    """The values of the fields called `name` (lower case) in a `ResponseHead.fields`."""
    values: list[bytes] = []
    for line in fields.split(b"\r\n"):
        colon = line.find(b":")
        if colon == len(name) and line[:colon].lower() == name:
            values.append(line[colon + 1 :].strip())
    return values


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body (RFC 9112 §7.1)."""
    return b"%x\r\n%b\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"
