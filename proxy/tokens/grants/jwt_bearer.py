"""The JWT-bearer grant (RFC 7523 §2.1): a signed assertion is the authorization grant.

``assertion`` is one JWT: read from ``assertion_file`` at every request (an identity
provider or the kubelet rotates it), or signed here with ``private_key_file`` by the
rule of RFC 7523 §3: ``iss`` = ``sub`` = ``client_id``, ``aud`` = the token endpoint,
an ``exp`` a minute away and a unique ``jti`` (`proxy.tokens.assertion`). Client
authentication is optional (§2.1, RFC 6749 §3.2.1). The answer is a bearer token.
"""

from __future__ import annotations

from proxy.config.model import TokenConfig
from proxy.errors import InvalidClient
from proxy.tokens.assertion import load_signing_key, sign_client_assertion
from proxy.tokens.grants.base import Grant, GrantRequest, read_token_file, token_subject

__all__ = ["JWT_BEARER_GRANT_TYPE", "JwtBearer"]

JWT_BEARER_GRANT_TYPE = "urn:ietf:params:oauth:grant-type:jwt-bearer"


class JwtBearer(Grant):
    name = "jwt_bearer"
    grant_type = JWT_BEARER_GRANT_TYPE

    def parameters(self, config: TokenConfig, token_url: str) -> GrantRequest:
        if config.assertion_file is not None:
            assertion = read_token_file(config.assertion_file, "assertion")
        elif config.private_key_file is not None:
            key, algorithm = load_signing_key(config.private_key_file)
            assertion = sign_client_assertion(
                client_id=config.client_id,
                audience=token_url,
                key=key,
                algorithm=algorithm,
                key_id=config.key_id,
            )
        else:
            raise InvalidClient("jwt_bearer needs assertion_file or private_key_file")
        return GrantRequest([("assertion", assertion)], [assertion])

    def identity(self, config: TokenConfig) -> list[str | bytes]:
        if config.assertion_file is not None:
            return [b"assertion\0" + token_subject(config.assertion_file.read_bytes())]
        if config.private_key_file is not None:
            return [b"private_key\0" + config.private_key_file.read_bytes()]
        return []
