"""HTTP/1.1 message heads: header filtering, token injection and serialisation.

Headers are kept as lists of raw ``(name, value)`` byte pairs in the order and case
they arrived, so that what the proxy forwards is what the client sent, minus what
RFC 9110 §7.6.1 says a proxy must not forward.
"""

from __future__ import annotations

from dataclasses import dataclass

Headers = list[tuple[bytes, bytes]]

# RFC 9110 §7.6.1 hop-by-hop fields, the legacy ones real clients still send, and the
# proxy's own credentials (Proxy-Authorization is meant for this hop only).
HOP_BY_HOP = frozenset(
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
FRAMING = frozenset({b"content-length", b"host"})
_DROPPED = HOP_BY_HOP | FRAMING

_STATUS_REASONS = {
    100: b"Continue",
    101: b"Switching Protocols",
    200: b"OK",
    204: b"No Content",
    304: b"Not Modified",
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    500: b"Internal Server Error",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}


@dataclass(slots=True)
class RequestHead:
    """A parsed request head, as received from the client."""

    method: str
    target: bytes
    version: str
    headers: Headers
    keep_alive: bool
    upgrade: bool = False
    content_length: int | None = None
    chunked: bool = False

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)


@dataclass(slots=True)
class ResponseHead:
    """A parsed response head, as received from the upstream."""

    status: int
    reason: bytes
    version: str
    headers: Headers
    keep_alive: bool
    content_length: int | None = None
    chunked: bool = False


def connection_tokens(headers: Headers) -> frozenset[bytes]:
    """Lower-cased field names listed in Connection headers (RFC 9110 §7.6.1)."""
    names: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            names.update(part.strip().lower() for part in value.split(b",") if part.strip())
    return frozenset(names)


def end_to_end(headers: Headers, *, keep: frozenset[bytes] = frozenset()) -> Headers:
    """`headers` without hop-by-hop fields, fields named in Connection, and framing fields.

    Names in `keep` survive (used for Upgrade on a WebSocket handshake).
    """
    dropped = _DROPPED
    for name, _ in headers:
        if name.lower() == b"connection":
            dropped = HOP_BY_HOP | FRAMING | connection_tokens(headers)
            break
    if keep:
        dropped = dropped - keep
    return [(name, value) for name, value in headers if name.lower() not in dropped]


def forward_headers(
    headers: Headers,
    *,
    credential: tuple[bytes, bytes] | None,
    overwrite: bool,
    keep: frozenset[bytes] = frozenset(),
) -> tuple[Headers, bool]:
    """The request fields to send upstream, with `credential` (name, value) set once.

    Hop-by-hop, Connection-named and framing fields are dropped (`keep` excepted). With
    `overwrite`, fields of the credential's name the client sent are dropped too (never
    duplicated or comma-joined); without it, a client's own field wins and nothing is
    added. Returns the fields and whether the credential is among them.
    """
    dropped = _DROPPED
    for name, _ in headers:
        if name.lower() == b"connection":
            dropped = HOP_BY_HOP | FRAMING | connection_tokens(headers)
            break
    if keep:
        dropped = dropped - keep
    if credential is None:
        return [(n, v) for n, v in headers if n.lower() not in dropped], False
    credential_name = credential[0].lower()
    kept: Headers = []
    clients_own = False
    for name, value in headers:
        lowered = name.lower()
        if lowered in dropped:
            continue
        if lowered == credential_name:
            clients_own = True
            if overwrite:
                continue
        kept.append((name, value))
    if clients_own and not overwrite:
        return kept, False
    kept.append(credential)
    return kept, True


def header_values(headers: Headers, name: bytes) -> list[bytes]:
    lowered = name.lower()
    return [value for key, value in headers if key.lower() == lowered]


def request_head_bytes(
    method: str, path: bytes, host: bytes, headers: Headers, framing: bytes
) -> bytes:
    """The request head sent upstream: HTTP/1.1, our Host first, then the end-to-end fields."""
    parts = [method.encode("ascii"), b" ", path, b" HTTP/1.1\r\nHost: ", host, b"\r\n"]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    parts += (framing, b"\r\n")
    return b"".join(parts)


def response_head_bytes(status: int, reason: bytes, headers: Headers, framing: bytes) -> bytes:
    if not reason:
        reason = _STATUS_REASONS.get(status, b"Unknown")
    parts = [b"HTTP/1.1 %d " % status, reason, b"\r\n"]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    parts += (framing, b"\r\n")
    return b"".join(parts)


def frame_response(
    request: RequestHead, response: ResponseHead, *, keep_alive: bool
) -> tuple[bytes, bool, bool, bool]:
    """The head to send the client for `response`, and how its body is framed.

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
        response.status, response.reason, end_to_end(response.headers), framing
    )
    return head, not no_body, rechunk, keep_alive


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body (RFC 9112 §7.1)."""
    return b"%x\r\n%b\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"
