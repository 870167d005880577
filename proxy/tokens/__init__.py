"""Obtaining OAuth 2.0 access tokens for the upstreams: where a token comes from.

`TokenClient` (client.py) makes exactly one token request, with the form of the
upstream's grant (grants/: client credentials, RFC 8693 token exchange, RFC 7523 JWT
bearer) and its client authentication; `TokenProvider` (provider.py) owns one
upstream's token: single flight, refresh and retry schedule (schedule.py), the fleet
token cache (fleet_sync.py, shared_cache.py, cache_crypto.py); the request path reads
the token it holds (held_token.py). `discover_token_endpoint` finds an issuer's token
endpoint; `assertion` builds private_key_jwt client assertions.
"""

from proxy.tokens.client import TokenClient, TokenResponse
from proxy.tokens.discovery import discover_token_endpoint
from proxy.tokens.provider import TokenProvider

__all__ = ["TokenClient", "TokenProvider", "TokenResponse", "discover_token_endpoint"]
