"""The client-credentials grant (RFC 6749 §4.4): the client asks for itself.

Nothing beyond ``grant_type=client_credentials``: the client authentication is the
credential, and the answer is a bearer token (RFC 6750).
"""

from __future__ import annotations

from proxy.tokens.grants.base import Grant

__all__ = ["ClientCredentials"]


class ClientCredentials(Grant):
    name = "client_credentials"
    grant_type = "client_credentials"
