"""Exactly one token request, and what its answer means.

`TokenClient.fetch()` builds the form from the configured grant (`proxy.tokens.grants`:
client credentials, RFC 8693 token exchange, RFC 7523 JWT bearer) and the common
parameters, authenticates the client (RFC 6749 §2.3: ``client_secret_basic``,
``client_secret_post``, RFC 7523 ``private_key_jwt``, RFC 8705 ``tls_client_auth``, or
``none`` for the grants that allow it), POSTs it, and turns the answer into a
`TokenResponse` or into one of the `proxy.errors.TokenFetchError` subclasses, whose
``reason`` is the failure metric label. It neither caches nor retries: that is the
provider's job.

Safety rules kept here: redirects are never followed (a token request must not be
replayed to another host), cookies are never kept, the response body is read up to a
cap, and no message built here contains the token, the secret, an assertion, a subject
or actor token or the ``Authorization`` header (server-supplied text is sanitised and
has them redacted).

The helpers `transport_errors()` and `read_body()` are shared with discovery.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.utils
import json
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path
from urllib.parse import quote_plus, urlencode

import aiohttp
from multidict import CIMultiDictProxy
from yarl import URL

from proxy.config import MIN_SECRET_LENGTH, TokenConfig
from proxy.errors import (
    InvalidClient,
    InvalidTokenResponse,
    TokenEndpointClientError,
    TokenEndpointServerError,
    TokenEndpointTimeout,
    TokenEndpointUnreachable,
    TokenFetchError,
)
from proxy.tokens.assertion import JWT_BEARER_ASSERTION_TYPE, client_assertion
from proxy.tokens.clock import wall_time
from proxy.tokens.dpop import DpopSession, asks_for_nonce
from proxy.tokens.grants import grant_for
from proxy.tokens.lifetime import lifetime_and_clock_offset

__all__ = [
    "CLOCK_TOLERANCE",
    "MAX_RESPONSE_BYTES",
    "REQUEST_ERROR_CODES",
    "RFC6749_ERROR_CODES",
    "TokenClient",
    "TokenResponse",
    "display_url",
    "parse_retry_after",
    "read_body",
    "sanitise",
    "transport_errors",
]

log = logging.getLogger("token_proxy.tokens.client")

# A token response is a few KiB at most; anything near this is broken or hostile.
MAX_RESPONSE_BYTES = 1 << 20
# The local wall clock and a token's `iat` may differ by this much (whole-second claims,
# network time, ordinary drift) before the difference is reported, whatever the lifetime.
CLOCK_TOLERANCE = 10.0
# The error codes of RFC 6749 §5.2: the request or the client's credentials are wrong.
RFC6749_ERROR_CODES = frozenset(
    {
        "invalid_request",
        "invalid_client",
        "invalid_grant",
        "unauthorized_client",
        "unsupported_grant_type",
        "invalid_scope",
    }
)
# Errors that say the request or the client is wrong, whichever grant: RFC 6749 §5.2, and
# `invalid_target` (RFC 8707 §2, RFC 8693 §2.2.2: audience or resource refused).
REQUEST_ERROR_CODES = RFC6749_ERROR_CODES | {"invalid_target"}
_MESSAGE_TEXT_LIMIT = 200
_DELTA_SECONDS = re.compile(r"[0-9]{1,10}")
_HEADER_SAFE_TOKEN = re.compile(r"[\x21-\x7e]+")
_TOKEN_TYPE_NAMES = {"bearer": "Bearer", "n_a": "N_A", "dpop": "DPoP"}


@dataclass(frozen=True)
class TokenResponse:
    """A usable token and how long it lives (seconds, already clamped); `token_type` is
    ``Bearer``, or ``DPoP`` for a DPoP-bound one (RFC 9449 §5)."""

    access_token: str = field(repr=False)
    expires_in: float
    scope: str | None = None
    token_type: str = "Bearer"
    # Where `expires_in` came from: "expires_in", "jwt_exp" or "default".
    lifetime_source: str = "expires_in"
    # RFC 8693 §2.2.1: what a token exchange issued (access token or JWT); else None.
    issued_token_type: str | None = None


class TokenClient:
    """Makes one token request per `fetch()` for one upstream's `TokenConfig`.

    The session should have a `DummyCookieJar` and, for `tls_client_auth`, a TLS context
    carrying the client certificate; timeouts come from the config on every request.
    Two conditions are reported once each time they begin or end, never per fetch: a
    local wall clock that disagrees with the tokens' ``iat``, and a client secret shorter
    than `MIN_SECRET_LENGTH`.

    With `dpop` (RFC 9449 §5), each request carries a DPoP proof; an answer that asks for
    a nonce (``use_dpop_nonce`` with a ``DPoP-Nonce``, §8) is sent again once, with it,
    and `on_nonce_retry` is called; a ``DPoP-Nonce`` on any answer is kept for the next
    request.
    """

    def __init__(
        self,
        config: TokenConfig,
        session: aiohttp.ClientSession,
        *,
        upstream: str | None = None,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
        wall_clock: Callable[[], float] = wall_time,
        dpop: DpopSession | None = None,
        on_nonce_retry: Callable[[], None] | None = None,
    ) -> None:
        self._config = config
        self._session = session
        self._upstream = upstream
        self._max_response_bytes = max_response_bytes
        self._wall_clock = wall_clock
        self._dpop = dpop
        self._on_nonce_retry = on_nonce_retry
        self._clock_disagrees = False
        self._short_secret = False
        self._bearer_for_dpop = False

    async def fetch(self, token_url: str) -> TokenResponse:
        """POST one token request to `token_url`; raise a `TokenFetchError`."""
        dpop = self._dpop
        status, body, response_headers, sensitive = await self._post(token_url)
        if dpop is not None and _asks_for_nonce(status, body, response_headers, dpop):
            if self._on_nonce_retry is not None:
                self._on_nonce_retry()
            # Built anew: a client assertion is not sent twice either (RFC 7523 §3).
            status, body, response_headers, sensitive = await self._post(token_url)
        if not 200 <= status < 300:
            raise error_for_status(status, body, response_headers, sensitive)
        return self._parse_success(body, response_headers, sensitive)

    async def _post(self, token_url: str) -> tuple[int, bytes, CIMultiDictProxy[str], list[str]]:
        """One POST of the token request: status, body, headers and the sensitive values."""
        # Secret, token and key files are read (and assertions signed) on every fetch so
        # that rotated credentials are picked up; off the event loop, files may be slow.
        form, headers, sensitive = await asyncio.to_thread(self._authenticated_request, token_url)
        headers["Accept"] = "application/json"
        headers["Content-Type"] = "application/x-www-form-urlencoded"
        dpop = self._dpop
        if dpop is not None:
            headers["DPoP"] = dpop.token_request_proof(token_url)
        timeout = aiohttp.ClientTimeout(
            total=self._config.timeout, sock_connect=self._config.connect_timeout
        )
        with transport_errors(token_url, self._config.timeout):
            async with self._session.post(
                token_url,
                data=urlencode(form).encode("ascii"),
                headers=headers,
                allow_redirects=False,
                timeout=timeout,
            ) as response:
                ok = 200 <= response.status < 300
                body = await read_body(response, self._max_response_bytes, truncate=not ok)
                status, response_headers = response.status, response.headers
        if dpop is not None:
            dpop.note_authorization_nonce(response_headers.get("DPoP-Nonce"))
        return status, body, response_headers, sensitive

    def _authenticated_request(
        self, token_url: str
    ) -> tuple[list[tuple[str, str]], dict[str, str], list[str]]:
        """The form, headers and the values that must never appear in a message.

        Order: ``grant_type``, the common parameters, the grant's own, ``extra_params``,
        then client authentication (RFC 8693 §2.3 and RFC 7523 §2.1 examples, byte for
        byte, when configured alike).
        """
        config = self._config
        grant = grant_for(config)
        form: list[tuple[str, str]] = [("grant_type", grant.grant_type)]
        if config.scope:
            form.append(("scope", " ".join(config.scope)))
        if config.audience:
            form.append(("audience", config.audience))
        form.extend(("resource", resource) for resource in config.resource)
        grant_request = grant.parameters(config, token_url)
        form.extend(grant_request.form)
        form.extend(config.extra_params)
        headers: dict[str, str] = {}
        sensitive: list[str] = list(grant_request.sensitive)
        method = config.auth_method
        if method == "client_secret_basic":
            secret = self._client_secret()
            sensitive.append(secret)
            # RFC 6749 §2.3.1: each part is form-urlencoded *before* base64, so a secret
            # with ":" "+" "%" or non-ASCII survives the trip.
            pair = f"{quote_plus(config.client_id)}:{quote_plus(secret)}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode("ascii")).decode()
            sensitive.append(headers["Authorization"])
        elif method == "client_secret_post":
            secret = self._client_secret()
            sensitive.append(secret)
            form += [("client_id", config.client_id), ("client_secret", secret)]
        elif method == "private_key_jwt":
            assertion = client_assertion(config, token_url)
            sensitive.append(assertion)
            form += [
                ("client_id", config.client_id),
                ("client_assertion_type", JWT_BEARER_ASSERTION_TYPE),
                ("client_assertion", assertion),
            ]
        elif method == "tls_client_auth":
            # The certificate in the session's TLS context authenticates.
            form.append(("client_id", config.client_id))
        elif config.client_id:
            # none: an unauthenticated client may still say who it is (RFC 6749 §3.2.1).
            form.append(("client_id", config.client_id))
        return form, headers, sensitive

    def _client_secret(self) -> str:
        config = self._config
        if config.client_secret_file is not None:
            secret = read_secret_file(config.client_secret_file)
        elif config.client_secret is not None:
            secret = config.client_secret.reveal()
        else:
            raise InvalidClient(f"{config.auth_method} needs client_secret or client_secret_file")
        self._note_secret_length(secret)
        return secret

    def _note_secret_length(self, secret: str) -> None:
        """Warn when the secret in use becomes short (the file may be rotated to one)."""
        short = len(secret) < MIN_SECRET_LENGTH
        if short and not self._short_secret:
            log.warning(
                "the client secret for %s is shorter than %d characters: easy to guess",
                self._upstream,
                MIN_SECRET_LENGTH,
                extra={"event": "short_client_secret", "upstream": self._upstream},
            )
        self._short_secret = short

    def _parse_success(
        self, body: bytes, headers: CIMultiDictProxy[str], sensitive: list[str]
    ) -> TokenResponse:
        """RFC 6749 §5.1 (and the grant's rules): a JSON object with an access_token of
        a type sent as a bearer token, else InvalidTokenResponse."""
        content_type = sanitise(headers.get("Content-Type", "none"), sensitive)
        try:
            document = json.loads(body)
        except (ValueError, RecursionError):
            # `from None`: a JSONDecodeError keeps the whole body, which may hold a token.
            raise InvalidTokenResponse(
                f"token response is not JSON (Content-Type: {content_type})"
            ) from None
        if not isinstance(document, dict):
            raise InvalidTokenResponse("token response is JSON but not an object")
        access_token = document.get("access_token")
        if not isinstance(access_token, str) or not access_token:
            raise InvalidTokenResponse("token response has no access_token string")
        if not _HEADER_SAFE_TOKEN.fullmatch(access_token):
            # RFC 6750 §2.1 b64token, and anything else would break the header we write.
            raise InvalidTokenResponse(
                "access_token contains characters that cannot be sent in an HTTP header"
            )
        grant = grant_for(self._config)
        grant.check_answer(document, [*sensitive, access_token])
        token_type = document.get("token_type")
        token_types = grant.token_types | {"dpop"} if self._dpop is not None else grant.token_types
        if token_type is None:
            log.warning(
                "token response has no token_type; treating it as Bearer",
                extra={"event": "token_response_warning", "upstream": self._upstream},
            )
        elif not isinstance(token_type, str) or token_type.lower() not in token_types:
            shown = sanitise(str(token_type), [*sensitive, access_token])
            allowed = " or ".join(_TOKEN_TYPE_NAMES[name] for name in sorted(token_types))
            hint = "; set token.dpop to use DPoP tokens" if shown.lower() == "dpop" else ""
            raise InvalidTokenResponse(f"token_type is {shown!r}, not {allowed} (RFC 6750){hint}")
        if token_type is None or token_type.lower() == "n_a":
            # RFC 8693 §2.2.1: N_A names a token the issuer does not call an access token
            # but which is used as one (its issued_token_type said so): a bearer token here.
            token_type = "Bearer"
        if token_type.lower() == "dpop":
            token_type = "DPoP"  # RFC 9449 §5: compared case-insensitively, named so here
        self._note_bearer_for_dpop(token_type != "DPoP")
        issued_token_type = document.get("issued_token_type")
        scope = document.get("scope")
        lifetime, source, clock_offset = lifetime_and_clock_offset(
            document.get("expires_in"),
            access_token,
            default_lifetime=self._config.default_lifetime,
            upstream=self._upstream,
            now=self._wall_clock(),
        )
        self._note_clock(clock_offset, lifetime)
        return TokenResponse(
            access_token=access_token,
            expires_in=lifetime,
            scope=scope if isinstance(scope, str) else None,
            token_type=token_type,
            lifetime_source=source,
            issued_token_type=issued_token_type if isinstance(issued_token_type, str) else None,
        )

    def _note_bearer_for_dpop(self, bearer: bool) -> None:
        """Warn, once each time it begins, that a DPoP client got bearer tokens."""
        bearer_for_dpop = bearer and self._dpop is not None
        if bearer_for_dpop and not self._bearer_for_dpop:
            log.warning(
                "the token endpoint for %s answered token_type Bearer to a DPoP token "
                "request; the token is sent as a bearer token, without proofs",
                self._upstream,
                extra={"event": "dpop_bearer_token", "upstream": self._upstream},
            )
        self._bearer_for_dpop = bearer_for_dpop

    def _note_clock(self, offset: float | None, lifetime: float) -> None:
        """Report, once per change, whether the wall clock disagrees with the tokens'."""
        if offset is None:
            return  # the token tells nothing about the endpoint's clock
        disagrees = abs(offset) > max(lifetime, CLOCK_TOLERANCE)
        extra = {"event": "clock_disagreement", "upstream": self._upstream}
        if disagrees and not self._clock_disagrees:
            log.warning(
                "the local wall clock is %.0f s %s the token issuer's for %s (by the tokens' "
                "iat/exp claims); lifetimes are counted from each fetch on the monotonic "
                "clock, so tokens are still used, but check the time synchronisation",
                abs(offset),
                "ahead of" if offset > 0 else "behind",
                self._upstream,
                extra={**extra, "clock_offset": round(offset, 1), "disagrees": True},
            )
        elif self._clock_disagrees and not disagrees:
            log.info(
                "the local wall clock agrees with the token issuer's for %s again",
                self._upstream,
                extra={**extra, "clock_offset": round(offset, 1), "disagrees": False},
            )
        self._clock_disagrees = disagrees


def read_secret_file(path: Path) -> str:
    """The client secret in `path` without its trailing newline; InvalidClient if unusable."""
    try:
        secret = path.read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        detail = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
        raise InvalidClient(f"client secret file unreadable: {path} ({detail})") from None
    if not secret:
        raise InvalidClient(f"client secret file is empty: {path}")
    return secret


def error_for_status(
    status: int, body: bytes, headers: Mapping[str, str], sensitive: Iterable[str] = ()
) -> TokenFetchError:
    """The error a non-2xx token endpoint answer stands for."""
    retry_after = parse_retry_after(headers.get("Retry-After")) if status in (429, 503) else None
    if 300 <= status < 400:
        location = sanitise(headers.get("Location", "nowhere"), sensitive)
        return InvalidTokenResponse(
            f"token endpoint redirected (HTTP {status}) to {location}; redirects are not followed"
        )
    code, description = _oauth_error(body, sensitive)
    if 400 <= status < 500:
        if code in REQUEST_ERROR_CODES:
            message = f"token endpoint answered HTTP {status} {code}"
            return InvalidClient(message + (f": {description}" if description else ""))
        suffix = f" ({code})" if code else ""
        return TokenEndpointClientError(
            f"token endpoint answered HTTP {status}{suffix}", retry_after=retry_after
        )
    if 500 <= status < 600:
        suffix = f" ({code})" if code else ""
        return TokenEndpointServerError(
            f"token endpoint answered HTTP {status}{suffix}", retry_after=retry_after
        )
    return InvalidTokenResponse(f"token endpoint answered unexpected HTTP status {status}")


def _asks_for_nonce(
    status: int, body: bytes, headers: Mapping[str, str], dpop: DpopSession
) -> bool:
    """Whether an authorization server's answer asks for a DPoP nonce (RFC 9449 §8): a
    400 (401 from some servers) with error ``use_dpop_nonce`` and a ``DPoP-Nonce`` that
    `dpop` took."""
    if status not in (400, 401) or "DPoP-Nonce" not in headers:
        return False
    code, _ = _oauth_error(body, ())
    if code is None:
        code = headers.get("WWW-Authenticate", "")
    return asks_for_nonce(code) and dpop.authorization_nonce == headers["DPoP-Nonce"].strip()


def _oauth_error(body: bytes, sensitive: Iterable[str]) -> tuple[str | None, str | None]:
    """`error` and `error_description` of an RFC 6749 §5.2 body, sanitised, if present."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return None, None
    if not isinstance(document, dict) or not isinstance(document.get("error"), str):
        return None, None
    code = sanitise(document["error"], sensitive, limit=64)
    description = document.get("error_description")
    return code, sanitise(description, sensitive) if isinstance(description, str) else None


def parse_retry_after(value: str | None) -> float | None:
    """RFC 9110 §10.2.3 Retry-After (delay-seconds or HTTP-date) in seconds from now."""
    if not value:
        return None
    value = value.strip()
    if _DELTA_SECONDS.fullmatch(value):
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - wall_time())


def sanitise(text: str, sensitive: Iterable[str] = (), *, limit: int = _MESSAGE_TEXT_LIMIT) -> str:
    """Server-supplied `text` made safe for a log line: secrets redacted, printable, short."""
    for value in sensitive:
        if value:
            text = text.replace(value, "***")
    text = "".join(c if " " <= c <= "~" else "?" for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def display_url(url: str) -> str:
    """`url` without userinfo, query or fragment, for messages."""
    try:
        parsed = URL(url)
        return str(parsed.with_user(None).with_query(None).with_fragment(None))
    except (ValueError, TypeError):
        return sanitise(url.split("?", 1)[0], limit=100)


@contextlib.contextmanager
def transport_errors(url: str, timeout: float) -> Iterator[None]:
    """Map aiohttp and socket errors raised while talking to `url` to TokenFetchErrors."""
    where = display_url(url)
    try:
        yield
    except TokenFetchError:
        raise
    except TimeoutError as exc:
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            message = f"connecting to {where} timed out"
        else:
            message = f"{where} did not answer within {timeout:g} s"
        raise TokenEndpointTimeout(message) from None
    except aiohttp.ClientConnectorCertificateError as exc:
        reason = sanitise(str(exc.certificate_error))
        raise TokenEndpointUnreachable(
            f"TLS certificate of {where} not trusted: {reason}"
        ) from None
    except aiohttp.ClientSSLError as exc:
        raise TokenEndpointUnreachable(
            f"TLS handshake with {where} failed: {sanitise(str(exc))}"
        ) from None
    except aiohttp.ClientConnectorDNSError:
        raise TokenEndpointUnreachable(f"cannot resolve the host of {where}") from None
    except aiohttp.ClientConnectorError as exc:
        detail = exc.os_error.strerror or type(exc.os_error).__name__
        raise TokenEndpointUnreachable(f"cannot connect to {where}: {detail}") from None
    except aiohttp.ServerDisconnectedError:
        raise TokenEndpointUnreachable(f"{where} closed the connection without answering") from None
    except aiohttp.ClientPayloadError:
        raise TokenEndpointUnreachable(f"connection to {where} broke mid-response") from None
    except aiohttp.InvalidURL:
        raise TokenEndpointUnreachable(f"invalid token endpoint URL {where}") from None
    except (aiohttp.ClientError, OSError) as exc:
        detail = sanitise(str(exc)) or type(exc).__name__
        raise TokenEndpointUnreachable(f"talking to {where} failed: {detail}") from None


async def read_body(response: aiohttp.ClientResponse, limit: int, *, truncate: bool) -> bytes:
    """At most `limit` bytes of the body: the rest dropped (`truncate`) or an error."""
    declared = response.content_length
    if not truncate and declared is not None and declared > limit:
        raise InvalidTokenResponse(f"response body of {declared} bytes exceeds {limit} bytes")
    body = bytearray()
    async for chunk in response.content.iter_chunked(64 * 1024):
        body += chunk
        if len(body) > limit:
            if truncate:
                return bytes(body[:limit])
            raise InvalidTokenResponse(f"response body exceeds {limit} bytes")
    return bytes(body)
