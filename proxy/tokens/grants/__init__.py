"""The grants a token is requested with, one module each, chosen by `token.grant`.

`grant_for(config)` is the only lookup: the token client asks it for the form
parameters and the checks of the answer, the fleet cache for the credential's identity.
A new grant is a new module here and one line in `GRANTS`.
"""

from __future__ import annotations

from proxy.config.model import GrantName, TokenConfig
from proxy.tokens.grants.base import Grant, GrantRequest
from proxy.tokens.grants.client_credentials import ClientCredentials
from proxy.tokens.grants.jwt_bearer import JWT_BEARER_GRANT_TYPE, JwtBearer
from proxy.tokens.grants.token_exchange import (
    INJECTABLE_TOKEN_TYPES,
    TOKEN_EXCHANGE_GRANT_TYPE,
    TokenExchange,
)

__all__ = [
    "GRANTS",
    "INJECTABLE_TOKEN_TYPES",
    "JWT_BEARER_GRANT_TYPE",
    "TOKEN_EXCHANGE_GRANT_TYPE",
    "Grant",
    "GrantRequest",
    "grant_for",
]

GRANTS: dict[GrantName, Grant] = {
    grant.name: grant for grant in (ClientCredentials(), TokenExchange(), JwtBearer())
}


def grant_for(config: TokenConfig) -> Grant:
    """The grant `config` asks for."""
    return GRANTS[config.grant]
