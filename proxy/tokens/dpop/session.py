"""One upstream's DPoP: its key, the proofs it signs, and the nonces servers gave it.

A `DpopSession` is made with the upstream's `TokenProvider` and lives as long as it
(a reload that keeps the token settings keeps the key and the tokens bound to it).
The token client asks it for the proof of each token request (`token_request_proof`)
and tells it the authorization server's nonce; the request path asks it for the proof
of each request sent with a DPoP token (`request_proof`) and tells it each resource
server's nonce (`note_resource_nonce`).
"""

from __future__ import annotations

from collections.abc import Callable

from proxy.config import DpopConfig
from proxy.tokens.clock import wall_time
from proxy.tokens.dpop.key import DpopKey
from proxy.tokens.dpop.nonces import NonceBook, valid_nonce
from proxy.tokens.dpop.proof import ProofSigner, target_uri

__all__ = ["DpopSession"]


class DpopSession:
    """The DPoP key of one upstream, its proof signer and the servers' nonces."""

    __slots__ = ("_resource_nonces", "authorization_nonce", "key", "signer")

    def __init__(self, key: DpopKey, wall_clock: Callable[[], float] = wall_time) -> None:
        self.key = key
        self.signer = ProofSigner(key, wall_clock)
        self.authorization_nonce: str | None = None
        self._resource_nonces = NonceBook()

    @classmethod
    def from_config(cls, config: DpopConfig) -> DpopSession:
        return cls(DpopKey.from_config(config))

    @property
    def shareable(self) -> bool:
        """Whether tokens bound to this key may be shared with other replicas: only when
        the key comes from a file (the same on every replica), never a generated one."""
        return not self.key.generated

    # -- token requests -----------------------------------------------------------

    def token_request_proof(self, token_url: str) -> str:
        """The proof of a token request POSTed to `token_url` (RFC 9449 §5)."""
        scheme, _, rest = token_url.partition("://")
        authority, slash, path = rest.partition("/")
        htu = target_uri(scheme, authority, slash + path)
        return self.signer.proof("POST", htu, None, self.authorization_nonce).decode("ascii")

    def note_authorization_nonce(self, value: str | None) -> bool:
        """Keep the token endpoint's ``DPoP-Nonce``; whether it was a usable nonce."""
        nonce = valid_nonce(value)
        if nonce is not None:
            self.authorization_nonce = nonce
        return nonce is not None

    # -- requests to the upstream ---------------------------------------------------

    def request_proof(
        self, method: str, scheme: str, authority: str, target: str, token: str
    ) -> bytes:
        """The proof of a request sent with `token` to `scheme://authority` + `target`."""
        htu = target_uri(scheme, authority, target)
        origin = htu[: htu.find("/", len(scheme) + 3)]
        return self.signer.proof(method, htu, token, self._resource_nonces.get(origin))

    def note_resource_nonce(self, scheme: str, authority: str, value: str | None) -> bool:
        """Keep a resource server's ``DPoP-Nonce``; whether it was a usable nonce."""
        htu = target_uri(scheme, authority, "/")
        return self._resource_nonces.note(htu[:-1], value)

    def status(self) -> dict[str, object]:
        """For /status: the key's algorithm and thumbprint, never the key."""
        return {
            "alg": self.key.alg,
            "jkt": self.key.thumbprint,
            "key": "generated" if self.key.generated else "file",
        }
