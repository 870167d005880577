"""The fleet token cache's names and sealed values: what Redis sees of a token.

Everything stored in Redis comes out of here, and none of it is a token, a secret or
anything derived from a secret without a key:

* Keys are derived with HKDF-SHA256 from the contents of ``encryption_key_file``
  (the same file on every replica; one trailing newline is no part of it): one for
  AES-256-GCM, one for HMAC-SHA256 names.
* An entry's name is ``<key_prefix>:token:<hex HMAC>`` over the credential's identity:
  token endpoint (or issuer), grant, client id, authentication method and key id, an
  HMAC fingerprint of the secret, signing key, client certificate or assertion
  subject (never the secret itself), scope, audience, resource and extra parameters,
  and what the grant adds (`proxy.tokens.grants`: for a token exchange the token
  types and fingerprints of who the subject and actor tokens speak for; for a JWT
  bearer grant a fingerprint of the assertion's subject or of its signing key).
  Two configs that differ in any of these never share an entry; a replica with
  another key computes other names and reads nothing of the others'.
* A value is ``0x01 || nonce (12 bytes) || AES-256-GCM(entry JSON)`` with the entry's
  name as associated data, so a value copied under another name does not open.
  The JSON holds the token, its type, its absolute expiry on the writer's wall clock
  and its lifetime.

`seal()` and `open_entry()` are pure; a value that does not open or parse raises
`EntryRejected`, which the caller counts as a miss.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeGuard

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from proxy.config import TokenConfig
from proxy.config.cache import MIN_ENCRYPTION_KEY_BYTES, encryption_key_material
from proxy.tokens.grants import grant_for
from proxy.tokens.grants.base import token_subject

__all__ = [
    "MIN_KEY_BYTES",
    "CacheEntry",
    "CacheKeys",
    "CredentialUnreadable",
    "EntryRejected",
    "credential_identity",
]

# `openssl rand -base64 32` gives 44 characters; the loader refuses fewer than 32 bytes.
MIN_KEY_BYTES = MIN_ENCRYPTION_KEY_BYTES
_VERSION = b"\x01"
_NONCE_BYTES = 12
_SALT = b"token-proxy fleet token cache"
_AAD_PREFIX = b"token-proxy:v1:"
# Nothing sane lives longer than a day (the token client clamps to that as well).
_MAX_LIFETIME = 24 * 3600.0
_HEADER_SAFE = re.compile(r"[\x21-\x7e]+")
_MAX_VALUE_BYTES = 64 * 1024


class EntryRejected(Exception):
    """A stored value that does not open or parse; `reason` is a metric label value."""

    def __init__(self, reason: Literal["undecryptable", "malformed"]) -> None:
        super().__init__(reason)
        self.reason = reason


class CredentialUnreadable(Exception):
    """The secret or key file behind a credential cannot be read to fingerprint it."""


@dataclass(frozen=True)
class CacheEntry:
    """One shared token: what the value holds once opened."""

    access_token: str = field(repr=False)
    token_type: str
    expires_at: float  # Unix time on the writer's wall clock
    lifetime: float  # seconds, as the writer gave the token (already floored)


class CacheKeys:
    """The keys derived from ``encryption_key_file``, and what is done with them."""

    def __init__(self, key_material: bytes) -> None:
        material = encryption_key_material(key_material)
        if len(material) < MIN_KEY_BYTES:
            raise ValueError(f"the cache key must be at least {MIN_KEY_BYTES} bytes")
        self._aead = AESGCM(_derive(material, b"aead:aes-256-gcm"))
        self._names = _derive(material, b"names:hmac-sha256")

    @classmethod
    def from_file(cls, path: Path) -> CacheKeys:
        """Read and derive; `ValueError` or `OSError` for a missing or short file."""
        return cls(path.read_bytes())

    def fingerprint(self, material: bytes) -> str:
        """A keyed fingerprint of secret material: comparable, not reversible, never stored."""
        return hmac.new(self._names, b"fingerprint\0" + material, hashlib.sha256).hexdigest()

    def entry_name(self, prefix: str, identity: list[str]) -> str:
        """The Redis key of a credential's entry (its lock adds a suffix)."""
        canonical = json.dumps(identity, separators=(",", ":"), ensure_ascii=True)
        digest = hmac.new(self._names, b"name\0" + canonical.encode(), hashlib.sha256)
        return f"{prefix}:token:{digest.hexdigest()}"

    def seal(self, name: str, entry: CacheEntry) -> bytes:
        plaintext = json.dumps(
            {
                "access_token": entry.access_token,
                "token_type": entry.token_type,
                "expires_at": entry.expires_at,
                "lifetime": entry.lifetime,
            },
            separators=(",", ":"),
        ).encode()
        nonce = os.urandom(_NONCE_BYTES)
        return _VERSION + nonce + self._aead.encrypt(nonce, plaintext, _AAD_PREFIX + name.encode())

    def open_entry(self, name: str, value: bytes) -> CacheEntry:
        """The entry sealed in `value` under `name`; `EntryRejected` otherwise."""
        if (
            len(value) <= len(_VERSION) + _NONCE_BYTES + 16
            or len(value) > _MAX_VALUE_BYTES
            or not value.startswith(_VERSION)
        ):
            raise EntryRejected("undecryptable")
        nonce = value[1 : 1 + _NONCE_BYTES]
        try:
            plaintext = self._aead.decrypt(
                nonce, value[1 + _NONCE_BYTES :], _AAD_PREFIX + name.encode()
            )
        except InvalidTag:
            raise EntryRejected("undecryptable") from None
        return _parse(plaintext)


def _derive(material: bytes, purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=_SALT, info=purpose).derive(material)


def _parse(plaintext: bytes) -> CacheEntry:
    try:
        document = json.loads(plaintext)
    except (UnicodeDecodeError, ValueError):
        raise EntryRejected("malformed") from None
    if not isinstance(document, dict):
        raise EntryRejected("malformed")
    token = document.get("access_token")
    token_type = document.get("token_type")
    expires_at = document.get("expires_at")
    lifetime = document.get("lifetime")
    if (
        not isinstance(token, str)
        or not _HEADER_SAFE.fullmatch(token)
        or not isinstance(token_type, str)
        or not _HEADER_SAFE.fullmatch(token_type)
        or not _finite_number(expires_at)
        or not _finite_number(lifetime)
        or not 0 < lifetime <= _MAX_LIFETIME
    ):
        raise EntryRejected("malformed")
    return CacheEntry(token, token_type, float(expires_at), float(lifetime))


def _finite_number(value: object) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def credential_identity(config: TokenConfig, keys: CacheKeys) -> list[str]:
    """Everything that defines the token a config obtains, secrets only as fingerprints.

    Files are read afresh (a rotated secret is another credential); `CredentialUnreadable`
    when one cannot be read, in which case the token is not shared this time.
    """
    endpoint = config.token_url if config.token_url is not None else f"issuer:{config.issuer}"
    grant = grant_for(config)
    try:
        extra = grant.identity(config)
    except OSError as exc:
        raise CredentialUnreadable(f"{grant.name}: {exc.strerror}") from None
    if config.dpop is not None and config.dpop.key_file is not None:
        # DPoP-bound tokens are shared only by replicas that sign with the same key.
        try:
            key = config.dpop.key_file.read_bytes()
        except OSError as exc:
            raise CredentialUnreadable(f"dpop.key_file: {exc.strerror}") from None
        extra = [*extra, "dpop", config.dpop.alg, key]
    # A client-credentials identity is exactly what it was before grants were added, so
    # replicas of either version share its entries.
    return [
        "v1",
        endpoint,
        grant.name,
        config.client_id,
        config.auth_method,
        config.key_id or "",
        keys.fingerprint(_credential_material(config)),
        " ".join(sorted(config.scope)),
        config.audience or "",
        json.dumps(list(config.resource)),
        json.dumps(sorted(config.extra_params)),
        *(keys.fingerprint(item) if isinstance(item, bytes) else item for item in extra),
    ]


def _credential_material(config: TokenConfig) -> bytes:
    """The bytes that tell one credential of this client from another."""
    if config.auth_method == "none":
        return b"none\0"
    if config.auth_method == "private_key_jwt":
        if config.client_assertion_file is not None:
            return b"assertion\0" + _assertion_subject(_read(config.client_assertion_file))
        if config.private_key_file is not None:
            return b"private_key\0" + _read(config.private_key_file)
        return b"private_key\0"
    if config.auth_method == "tls_client_auth":
        cert = config.tls.client_cert_file
        return b"client_cert\0" + (_read(cert) if cert is not None else b"")
    if config.client_secret is not None:
        return b"secret\0" + config.client_secret.reveal().encode()
    if config.client_secret_file is not None:
        return b"secret\0" + _read(config.client_secret_file).rstrip(b"\r\n")
    return b"none\0"


def _assertion_subject(assertion: bytes) -> bytes:
    """Who a ready-made assertion speaks for: `token_subject`."""
    return token_subject(assertion)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CredentialUnreadable(f"{path}: {exc.strerror}") from None
