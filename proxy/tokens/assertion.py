"""Client assertions for `private_key_jwt` (RFC 7523 §2.2, RFC 7521 §4.2).

`sign_client_assertion()` also signs the assertion of the JWT-bearer grant
(`proxy.tokens.grants.jwt_bearer`, RFC 7523 §2.1): the claims RFC 7523 §3 asks of both
are the same when the client asserts itself.

Either a JWT that we sign ourselves with the configured private key (RS256 for an RSA
key, ES256/ES384/ES512 for an EC P-256/P-384/P-521 key), or an assertion minted by
someone else and read from ``client_assertion_file`` (a Kubernetes projected service
account token, which the kubelet rotates: the file is read again for every request).

Everything here is synchronous file and CPU work; the token client runs it in a thread.
Failures raise `InvalidClient` with a message naming the file, never its content.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import jwt

from proxy.config import TokenConfig
from proxy.config.keys import SigningKey, UnusableKey, parse_signing_key
from proxy.errors import InvalidClient
from proxy.tokens.clock import wall_time

__all__ = [
    "ASSERTION_LIFETIME",
    "JWT_BEARER_ASSERTION_TYPE",
    "SigningKey",
    "client_assertion",
    "load_signing_key",
    "read_assertion_file",
    "sign_client_assertion",
]

JWT_BEARER_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# RFC 7523 §3 wants a short-lived assertion; a minute covers any sane clock skew.
ASSERTION_LIFETIME = 60


def load_signing_key(path: Path) -> tuple[SigningKey, str]:
    """The private key in `path` and its JWS algorithm, by the rule `proxy.config.keys` sets.

    The config loader checked the same file with the same function at load; this reads
    it again for every assertion, so a rotated key file is picked up.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidClient(f"private key file unreadable: {path} ({exc.strerror})") from None
    try:
        return parse_signing_key(data)
    except UnusableKey as exc:
        raise InvalidClient(
            f"private key file is not a readable private key: {path} ({exc})"
        ) from None


def sign_client_assertion(
    *,
    client_id: str,
    audience: str,
    key: SigningKey,
    algorithm: str,
    key_id: str | None = None,
    now: float | None = None,
) -> str:
    """A fresh signed JWT: iss = sub = client_id, aud = the token endpoint, unique jti."""
    issued_at = int(wall_time() if now is None else now)
    claims = {
        "iss": client_id,
        "sub": client_id,
        "aud": audience,
        "jti": secrets.token_urlsafe(24),
        "iat": issued_at,
        "exp": issued_at + ASSERTION_LIFETIME,
    }
    headers = {"kid": key_id} if key_id else None
    return jwt.encode(claims, key, algorithm=algorithm, headers=headers)


def read_assertion_file(path: Path) -> str:
    """The assertion in `path`, stripped of surrounding whitespace."""
    try:
        assertion = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        detail = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
        raise InvalidClient(f"client assertion file unreadable: {path} ({detail})") from None
    if not assertion:
        raise InvalidClient(f"client assertion file is empty: {path}")
    return assertion


def client_assertion(config: TokenConfig, token_url: str) -> str:
    """The assertion to send with one token request to `token_url`."""
    if config.client_assertion_file is not None:
        return read_assertion_file(config.client_assertion_file)
    if config.private_key_file is None:
        raise InvalidClient("private_key_jwt needs private_key_file or client_assertion_file")
    key, algorithm = load_signing_key(config.private_key_file)
    return sign_client_assertion(
        client_id=config.client_id,
        audience=token_url,
        key=key,
        algorithm=algorithm,
        key_id=config.key_id,
    )
