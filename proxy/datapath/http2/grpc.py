"""gRPC on the HTTP/2 server side: the proxy's own errors as gRPC statuses, and reading
the status an upstream sent.

A gRPC client reads a call's outcome from `grpc-status`, not from `:status`, so the
proxy answers a gRPC request (`content-type: application/grpc...`) it refuses with a
trailers-only response (`:status 200`, `content-type`, `grpc-status`, `grpc-message`;
one HEADERS frame with END_STREAM, gRPC's PROTOCOL-HTTP2). The status says what the
client may do about it:

==========================  ===============================  =========================
proxy error                 gRPC status                      why
==========================  ===============================  =========================
token_unavailable (503)     14 UNAVAILABLE                   transient: retry later
host_not_allowed (403)      7 PERMISSION_DENIED              the proxy's policy
upstream_timeout (504)      4 DEADLINE_EXCEEDED              no answer in time
upstream_unreachable (502)  14 UNAVAILABLE                   transient: retry later
431, 413 (too large)        8 RESOURCE_EXHAUSTED             a configured limit
bad_request (400), others   gRPC's HTTP mapping: 400 -> 13   as if the client had read
                            INTERNAL, 401 -> 16, 403 -> 7,   the HTTP status itself
                            404 -> 12, 429/502/503/504 ->
                            14, anything else 2 UNKNOWN
==========================  ===============================  =========================

A request the proxy will not forward is not an invalid argument of the method called
(3 INVALID_ARGUMENT is the server's to say), so 400 keeps gRPC's own mapping, INTERNAL:
the same status a gRPC client derives from the HTTP answer when it ignores trailers.
"""

from __future__ import annotations

from typing import Final

from proxy.errors import (
    HeadersTooLarge,
    HostNotAllowed,
    ProxyError,
    RequestTooLarge,
    TokenUnavailable,
    UpstreamTimeout,
    UpstreamUnreachable,
)

Headers = list[tuple[bytes, bytes]]

OK: Final = 0
UNKNOWN: Final = 2
DEADLINE_EXCEEDED: Final = 4
PERMISSION_DENIED: Final = 7
RESOURCE_EXHAUSTED: Final = 8
UNIMPLEMENTED: Final = 12
INTERNAL: Final = 13
UNAVAILABLE: Final = 14
UNAUTHENTICATED: Final = 16

GRPC_CONTENT_TYPE: Final = b"application/grpc"
GRPC_STATUS: Final = b"grpc-status"
GRPC_MESSAGE: Final = b"grpc-message"

# gRPC's doc/http-grpc-status-mapping.md: what a client makes of an HTTP status.
_BY_HTTP_STATUS: Final = {
    400: INTERNAL,
    401: UNAUTHENTICATED,
    403: PERMISSION_DENIED,
    404: UNIMPLEMENTED,
    429: UNAVAILABLE,
    502: UNAVAILABLE,
    503: UNAVAILABLE,
    504: UNAVAILABLE,
}

_BY_ERROR: Final[tuple[tuple[type[ProxyError], int], ...]] = (
    (TokenUnavailable, UNAVAILABLE),
    (HostNotAllowed, PERMISSION_DENIED),
    (UpstreamTimeout, DEADLINE_EXCEEDED),
    (UpstreamUnreachable, UNAVAILABLE),
    (HeadersTooLarge, RESOURCE_EXHAUSTED),
    (RequestTooLarge, RESOURCE_EXHAUSTED),
)

# gRPC's PROTOCOL-HTTP2 "Status-Message": percent-encoded outside these bytes.
_UNRESERVED_MIN: Final = 0x20
_UNRESERVED_MAX: Final = 0x7E
_PERCENT: Final = 0x25


def is_grpc(content_type: bytes | None) -> bool:
    """Whether a request with this content-type is a gRPC call (`application/grpc`,
    `application/grpc+proto`, `application/grpc-web`... all start so)."""
    return content_type is not None and content_type.lower().startswith(GRPC_CONTENT_TYPE)


def status_for(error: ProxyError) -> int:
    """The gRPC status code the proxy answers `error` with (see the module's table)."""
    for kind, code in _BY_ERROR:
        if isinstance(error, kind):
            return code
    return _BY_HTTP_STATUS.get(error.status, UNKNOWN)


def percent_encode(message: str) -> bytes:
    """`message` as a `grpc-message` value: UTF-8, percent-encoded where gRPC says."""
    out = bytearray()
    for byte in message.encode("utf-8"):
        if _UNRESERVED_MIN <= byte <= _UNRESERVED_MAX and byte != _PERCENT:
            out.append(byte)
        else:
            out += b"%%%02X" % byte
    return bytes(out)


def trailers_only(error: ProxyError) -> Headers:
    """The one HEADERS block (sent with END_STREAM) that answers a gRPC call with `error`."""
    return [(b":status", b"200"), (b"content-type", GRPC_CONTENT_TYPE), *trailers(error)]


def trailers(error: ProxyError) -> Headers:
    """The trailers that end a gRPC call with `error` after its response head went out."""
    return [
        (GRPC_STATUS, b"%d" % status_for(error)),
        (GRPC_MESSAGE, percent_encode(f"token-proxy: {error.code}: {error.detail}")),
    ]


def status_in(fields: Headers) -> int | None:
    """The `grpc-status` among `fields` (trailers, or a trailers-only head), if any."""
    for name, value in fields:
        if name == GRPC_STATUS:
            digits = value.strip()
            return int(digits) if digits.isdigit() and len(digits) < 4 else None
    return None
