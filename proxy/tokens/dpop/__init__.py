"""DPoP, sender-constrained tokens (RFC 9449): keys, proofs and server nonces.

* `key`: the private key (from `dpop.key_file` or generated), its JWK and thumbprint;
* `proof`: one signed proof per request, and the ``htu`` normalisation;
* `nonces`: the nonces servers hand out, and how their answers ask for one;
* `session`: `DpopSession`, one upstream's key, signer and nonces, used by the token
  client (`proxy.tokens.client`) and by the request path (`proxy.datapath`).
"""

from proxy.tokens.dpop.key import DpopKey, jwk_thumbprint
from proxy.tokens.dpop.nonces import asks_for_nonce, valid_nonce
from proxy.tokens.dpop.proof import ProofSigner, access_token_hash, target_uri
from proxy.tokens.dpop.session import DpopSession

__all__ = [
    "DpopKey",
    "DpopSession",
    "ProofSigner",
    "access_token_hash",
    "asks_for_nonce",
    "jwk_thumbprint",
    "target_uri",
    "valid_nonce",
]
