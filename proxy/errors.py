"""Every failure the proxy names, and the one place they become HTTP responses.

Two families live here:

* `ProxyError` subclasses are answered to the client by the proxy itself, with the
  JSON body of the product contract: ``{"error", "upstream", "detail"}``.
  `error_response()` is the only function that turns one into bytes on the wire.
* `TokenFetchError` subclasses describe why one token request failed; their
  ``reason`` is the ``reason`` label of ``token_proxy_token_fetch_failures_total``.

No message built here may contain a token or a secret: details are written by the
code that raises, from names and status codes only.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import ClassVar


class ProxyError(Exception):
    """A request the proxy answers itself instead of forwarding."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"

    def __init__(self, detail: str, *, upstream: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.upstream = upstream

    def extra_headers(self) -> list[tuple[str, str]]:
        return []


class BadRequest(ProxyError):
    """The request cannot be parsed, or the proxy will not forward it."""

    status = 400
    code = "bad_request"


class HostNotAllowed(ProxyError):
    """`unknown_hosts: deny`, or a configured host behind a CONNECT we cannot intercept."""

    status = 403
    code = "host_not_allowed"


class TokenUnavailable(ProxyError):
    """No valid token for the upstream could be had; the request was not sent."""

    status = 503
    code = "token_unavailable"

    def __init__(self, detail: str, *, upstream: str | None, retry_after: float = 1.0) -> None:
        super().__init__(detail, upstream=upstream)
        self.retry_after = retry_after

    def extra_headers(self) -> list[tuple[str, str]]:
        # RFC 9110 §10.2.3: delay-seconds is a non-negative integer.
        return [("Retry-After", str(max(1, int(self.retry_after + 0.999))))]


class UpstreamUnreachable(ProxyError):
    """Connecting to, or talking to, the upstream failed."""

    status = 502
    code = "upstream_unreachable"


class UpstreamTimeout(ProxyError):
    """The upstream did not answer within the configured time."""

    status = 504
    code = "upstream_timeout"


class RequestTooLarge(ProxyError):
    """The request body is larger than `limits.max_body_size`."""

    status = 413
    code = "bad_request"


class HeadersTooLarge(ProxyError):
    """The request head exceeds the header size or count limits."""

    status = 431
    code = "bad_request"


class RequestTimeout(ProxyError):
    """The client did not send a complete request head within `limits.header_timeout`."""

    status = 408
    code = "bad_request"


class UriTooLong(ProxyError):
    """The request line exceeds the configured limit."""

    status = 414
    code = "bad_request"


class TransferCodingNotImplemented(ProxyError):
    """A request transfer coding other than `chunked` (RFC 9112 §6.1: 501)."""

    status = 501
    code = "bad_request"


class VersionNotSupported(ProxyError):
    """A request line naming an HTTP version other than 1.0 or 1.1 (RFC 9110 §15.6.6)."""

    status = 505
    code = "bad_request"


# The reason phrase of each status code: Python's table, with the names RFC 9110 gave
# the codes it renamed (Python 3.13 has them too). The proxy's own answers use it, and
# so do relayed status lines that came without a phrase.
REASON_PHRASES: dict[int, str] = {
    **{status.value: status.phrase for status in HTTPStatus},
    413: "Content Too Large",  # RFC 9110 §15.5.14
    414: "URI Too Long",  # RFC 9110 §15.5.15
    416: "Range Not Satisfiable",  # RFC 9110 §15.5.17
    422: "Unprocessable Content",  # RFC 9110 §15.5.21
}


def error_body(error: ProxyError) -> bytes:
    """The JSON body of the product contract for `error`."""
    return json.dumps(
        {"error": error.code, "upstream": error.upstream, "detail": error.detail},
        separators=(",", ":"),
    ).encode()


def error_response(error: ProxyError, *, keep_alive: bool, head_only: bool = False) -> bytes:
    """A complete HTTP/1.1 response for `error`, ready to write to the client.

    With `head_only` (the answer to a HEAD request) the body is left out and its length
    still given: content after a HEAD response would be read as the next response
    (RFC 9110 §9.3.2, RFC 9112 §6.3).
    """
    body = error_body(error)
    lines = [
        f"HTTP/1.1 {error.status} {REASON_PHRASES.get(error.status, 'Error')}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
        *(f"{name}: {value}" for name, value in error.extra_headers()),
        "Connection: keep-alive" if keep_alive else "Connection: close",
    ]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + body


class TokenFetchError(Exception):
    """One token request failed. `reason` is the metric label; `retry_after` a server hint."""

    reason: ClassVar[str] = "invalid_response"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class TokenEndpointTimeout(TokenFetchError):
    """The token endpoint did not answer in time."""

    reason = "timeout"


class TokenEndpointUnreachable(TokenFetchError):
    """The token endpoint could not be connected to (refused, reset, DNS, TLS)."""

    reason = "connect"


class TokenEndpointClientError(TokenFetchError):
    """A 4xx answer that is not an RFC 6749 §5.2 client-authentication error."""

    reason = "http_4xx"


class TokenEndpointServerError(TokenFetchError):
    """A 5xx answer."""

    reason = "http_5xx"


class InvalidTokenResponse(TokenFetchError):
    """A 2xx answer that is not a usable bearer token response (RFC 6749 §5.1)."""

    reason = "invalid_response"


class InvalidClient(TokenFetchError):
    """RFC 6749 §5.2 error: invalid_client, unauthorized_client, invalid_scope, ..."""

    reason = "invalid_client"


TOKEN_FETCH_FAILURE_REASONS: tuple[str, ...] = (
    "timeout",
    "connect",
    "http_4xx",
    "http_5xx",
    "invalid_response",
    "invalid_client",
)
