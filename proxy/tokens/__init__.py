"""Obtaining OAuth 2.0 client-credentials tokens for the upstreams.

`TokenClient` makes exactly one token request; `TokenProvider` owns one upstream's
token (cache, single flight, refresh, backoff); `discover_token_endpoint` finds an
issuer's token endpoint; `assertion` builds private_key_jwt client assertions.
"""

from proxy.tokens.client import TokenClient, TokenResponse
from proxy.tokens.discovery import discover_token_endpoint
from proxy.tokens.provider import TokenProvider

__all__ = ["TokenClient", "TokenProvider", "TokenResponse", "discover_token_endpoint"]
