"""Finding an issuer's token endpoint: OpenID Connect Discovery, then RFC 8414.

The metadata document is looked for at, in order:

1. ``{issuer}/.well-known/openid-configuration`` (OpenID Connect Discovery 1.0 §4);
2. ``https://host/.well-known/oauth-authorization-server{path}`` (RFC 8414 §3: the
   well-known segment goes between the host and the issuer's path);
3. for an issuer with a path, ``{issuer}/.well-known/oauth-authorization-server``, the
   form some servers publish instead (RFC 8414 §5).

A document is accepted only if its ``issuer`` is exactly the configured one (RFC 8414
§3.3, which stops a mix-up with another server's metadata) and its ``token_endpoint``
is https, or http on a loopback address, or http when the upstream allows insecure http.
Failures are `TokenFetchError`s classified like token request failures.
"""

from __future__ import annotations

import json

import aiohttp
from yarl import URL

from proxy.errors import (
    InvalidTokenResponse,
    TokenEndpointTimeout,
    TokenEndpointUnreachable,
    TokenFetchError,
)
from proxy.hosts import is_loopback_host
from proxy.tokens.client import (
    MAX_RESPONSE_BYTES,
    display_url,
    error_for_status,
    read_body,
    sanitise,
    transport_errors,
)

__all__ = ["discover_token_endpoint", "metadata_urls"]

OIDC_WELL_KNOWN = "/.well-known/openid-configuration"
OAUTH_WELL_KNOWN = "/.well-known/oauth-authorization-server"


async def discover_token_endpoint(
    session: aiohttp.ClientSession,
    issuer: str,
    *,
    allow_insecure_http: bool,
) -> str:
    """The `token_endpoint` from `issuer`'s metadata; a `TokenFetchError` if none is usable."""
    _check_url_scheme(issuer, "issuer", allow_insecure_http)
    failures: list[TokenFetchError] = []
    for url in metadata_urls(issuer):
        try:
            return await _token_endpoint_from(session, url, issuer, allow_insecure_http)
        except (TokenEndpointTimeout, TokenEndpointUnreachable):
            raise  # every candidate lives on the same host: trying the next one is pointless
        except TokenFetchError as failure:
            failures.append(failure)
    last = failures[-1]
    message = "discovery failed: " + "; ".join(failure.message for failure in failures)
    raise type(last)(message, retry_after=last.retry_after)


def metadata_urls(issuer: str) -> list[str]:
    """Where `issuer`'s metadata may be, most likely first, without duplicates."""
    parsed = URL(issuer)
    path = parsed.path.rstrip("/")
    origin = str(parsed.origin())
    candidates = [
        issuer.rstrip("/") + OIDC_WELL_KNOWN,
        origin + OAUTH_WELL_KNOWN + path,
        issuer.rstrip("/") + OAUTH_WELL_KNOWN,
    ]
    return list(dict.fromkeys(candidates))


async def _token_endpoint_from(
    session: aiohttp.ClientSession,
    url: str,
    issuer: str,
    allow_insecure_http: bool,
) -> str:
    """The token endpoint in the metadata at `url`; the session's timeouts apply."""
    where = display_url(url)
    with transport_errors(url, session.timeout.total or 0.0):
        async with session.get(
            url, headers={"Accept": "application/json"}, allow_redirects=False
        ) as response:
            ok = response.status == 200
            body = await read_body(response, MAX_RESPONSE_BYTES, truncate=not ok)
            status, headers = response.status, response.headers
    if not ok:
        error = error_for_status(status, body, headers)
        raise type(error)(f"{where}: {error.message}", retry_after=error.retry_after)
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        raise InvalidTokenResponse(f"{where}: metadata is not JSON") from None
    if not isinstance(document, dict):
        raise InvalidTokenResponse(f"{where}: metadata is not a JSON object")
    published_issuer = document.get("issuer")
    if published_issuer != issuer:
        shown = sanitise(str(published_issuer), limit=100)
        raise InvalidTokenResponse(
            f"{where}: metadata issuer {shown!r} is not the configured issuer {issuer!r}"
            " (RFC 8414 §3.3)"
        )
    token_endpoint = document.get("token_endpoint")
    if not isinstance(token_endpoint, str) or not token_endpoint:
        raise InvalidTokenResponse(f"{where}: metadata has no token_endpoint")
    _check_url_scheme(token_endpoint, f"{where}: token_endpoint", allow_insecure_http)
    return token_endpoint


def _check_url_scheme(url: str, what: str, allow_insecure_http: bool) -> None:
    try:
        parsed = URL(url)
    except (ValueError, TypeError):
        raise InvalidTokenResponse(f"{what} is not a URL") from None
    if parsed.scheme == "https" and parsed.host:
        return
    if parsed.scheme == "http" and parsed.host:
        if allow_insecure_http or is_loopback_host(parsed.host):
            return
        raise InvalidTokenResponse(
            f"{what} {display_url(url)} is plain http; https is required"
            " (or allow_insecure_http, or a loopback address)"
        )
    raise InvalidTokenResponse(f"{what} {sanitise(url, limit=100)!r} is not an http(s) URL")
