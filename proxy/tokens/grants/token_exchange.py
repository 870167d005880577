"""The token-exchange grant (RFC 8693): a token presented for another.

The shape of cloud security-token services for workload identity federation: a
projected Kubernetes service-account token (``subject_token_file``, read at every
request because the kubelet rotates it) exchanged for an access token.

Request (§2.1): ``subject_token`` and ``subject_token_type`` always, ``actor_token``
with ``actor_token_type`` together or not at all, ``requested_token_type`` when set;
``audience``, ``resource`` and ``scope`` are the common parameters. Client
authentication may be absent (the deployment decides, §2.1).

Answer (§2.2.1): ``issued_token_type`` is required, and only a token the resource
server takes as an access token is injected: an access token or a JWT. Any other type
(a refresh token, an ID token, a SAML assertion) is an `InvalidTokenResponse`.
``token_type`` is ``Bearer``, or ``N_A`` when the issuer does not call the token an
access token although it is usable as one (a JWT); both are sent as bearer tokens.
"""

from __future__ import annotations

from collections.abc import Mapping

from proxy.config.model import TOKEN_TYPE_ACCESS_TOKEN, TOKEN_TYPE_JWT, TokenConfig
from proxy.errors import InvalidClient, InvalidTokenResponse
from proxy.tokens.grants.base import Grant, GrantRequest, read_token_file, token_subject

__all__ = ["INJECTABLE_TOKEN_TYPES", "TOKEN_EXCHANGE_GRANT_TYPE", "TokenExchange"]

TOKEN_EXCHANGE_GRANT_TYPE = "urn:ietf:params:oauth:grant-type:token-exchange"
# What may go into `Authorization: Bearer`: RFC 8693 §3 identifiers.
INJECTABLE_TOKEN_TYPES = frozenset({TOKEN_TYPE_ACCESS_TOKEN, TOKEN_TYPE_JWT})
_SHOWN_LIMIT = 100


class TokenExchange(Grant):
    name = "token_exchange"
    grant_type = TOKEN_EXCHANGE_GRANT_TYPE
    token_types = frozenset({"bearer", "n_a"})

    def parameters(self, config: TokenConfig, token_url: str) -> GrantRequest:
        if config.subject_token_file is None:
            raise InvalidClient("token_exchange needs subject_token_file")
        subject = read_token_file(config.subject_token_file, "subject token")
        form = [("subject_token", subject), ("subject_token_type", config.subject_token_type)]
        sensitive = [subject]
        if config.actor_token_file is not None and config.actor_token_type is not None:
            actor = read_token_file(config.actor_token_file, "actor token")
            form += [("actor_token", actor), ("actor_token_type", config.actor_token_type)]
            sensitive.append(actor)
        if config.requested_token_type is not None:
            form.append(("requested_token_type", config.requested_token_type))
        return GrantRequest(form, sensitive)

    def check_answer(self, document: Mapping[str, object], shown: list[str]) -> None:
        issued = document.get("issued_token_type")
        if issued is None:
            raise InvalidTokenResponse(
                "token exchange answer has no issued_token_type (RFC 8693 §2.2.1)"
            )
        if issued not in INJECTABLE_TOKEN_TYPES:
            text = str(issued)
            for value in shown:
                if value:
                    text = text.replace(value, "***")
            text = "".join(c if " " <= c <= "~" else "?" for c in text)[:_SHOWN_LIMIT]
            raise InvalidTokenResponse(
                f"issued_token_type is {text!r}: not an access token or a JWT, "
                "so it cannot be sent as a bearer token"
            )

    def identity(self, config: TokenConfig) -> list[str | bytes]:
        items: list[str | bytes] = [config.subject_token_type]
        if config.subject_token_file is not None:
            items.append(b"subject\0" + token_subject(config.subject_token_file.read_bytes()))
        if config.actor_token_file is not None:
            items.append(config.actor_token_type or "")
            items.append(b"actor\0" + token_subject(config.actor_token_file.read_bytes()))
        items.append(config.requested_token_type or "")
        return items
