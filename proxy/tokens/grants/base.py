"""What every grant module provides, and the helpers they share.

A grant owns the part of a token request that says *what* is asked for: its
``grant_type`` and the parameters that go with it (`Grant.parameters`), which of
those values must never appear in a message, what defines the credential for the
fleet cache (`Grant.identity`), and what a successful answer must say for this grant
(`Grant.check_answer`). Client authentication, the common parameters (``scope``,
``audience``, ``resource``, ``extra_params``), transport and the parsing every answer
shares stay in `proxy.tokens.client`.

Everything here is synchronous file and CPU work: the token client runs it in a
thread. A credential file that cannot be used raises `InvalidClient` with a message
naming the file, never its content.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import jwt

from proxy.config.model import GrantName, TokenConfig
from proxy.errors import InvalidClient

__all__ = ["Grant", "GrantRequest", "read_token_file", "token_subject"]


@dataclass(frozen=True)
class GrantRequest:
    """A grant's form parameters, and the values among them no message may contain."""

    form: list[tuple[str, str]]
    sensitive: list[str] = field(default_factory=list, repr=False)


class Grant:
    """One grant type; subclasses set `name` and `grant_type` and extend what they need."""

    name: ClassVar[GrantName]
    grant_type: ClassVar[str]
    # The `token_type` values (lower case) an answer may carry for this grant.
    token_types: ClassVar[frozenset[str]] = frozenset({"bearer"})

    def parameters(self, config: TokenConfig, token_url: str) -> GrantRequest:
        """The form parameters after ``grant_type`` and the common ones, for one request."""
        return GrantRequest([])

    def check_answer(self, document: Mapping[str, object], shown: list[str]) -> None:
        """Refuse, with `InvalidTokenResponse`, a 2xx answer this grant cannot use.

        `shown` are values to redact from anything quoted in the message.
        """

    def identity(self, config: TokenConfig) -> list[str | bytes]:
        """What defines this grant's credential beyond the client and the common
        parameters: text as is, `bytes` as secret material the cache fingerprints with
        its key. Files are read afresh; `OSError` when one cannot be read."""
        return []

    def __repr__(self) -> str:
        return f"<grant {self.name}>"


def read_token_file(path: Path, what: str) -> str:
    """The token in `path` (a subject, actor or assertion file), stripped of whitespace.

    Kubernetes projected tokens are rotated by replacing the file: it is read for every
    request, never cached.
    """
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        detail = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
        raise InvalidClient(f"{what} file unreadable: {path} ({detail})") from None
    if not text:
        raise InvalidClient(f"{what} file is empty: {path}")
    if any(not "\x21" <= char <= "\x7e" for char in text):
        # A token is one printable ASCII word (RFC 6750 b64token, a JWT, a SAML base64url).
        raise InvalidClient(f"{what} file does not hold one token: {path}")
    return text


def token_subject(token: bytes) -> bytes:
    """Who a token speaks for (issuer, subject, audience), as fleet cache material.

    Projected service-account tokens are rotated hourly and differ per pod; the identity
    they assert is what defines the token obtained with them, so pods of one service
    account share it. A token that is no JWT is fingerprinted whole.
    """
    try:
        claims = jwt.decode(token.strip(), options={"verify_signature": False})
    except jwt.PyJWTError:
        return b"raw\0" + token.strip()
    subject = [str(claims.get(name, "")) for name in ("iss", "sub", "aud")]
    return b"claims\0" + json.dumps(subject).encode()
