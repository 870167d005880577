"""How long a token may be used: what a token response's lifetime is.

`token_lifetime()` reads ``expires_in`` and, for a JWT access token, its ``exp`` and
``iat`` (without verifying it: the proxy is not the token's audience), and says how
many seconds from its fetch the token may be used and where that came from. The
caller counts those seconds on the monotonic clock; the wall clock is read only for a
JWT that carries nothing else (`proxy.tokens.clock`).
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import jwt

from proxy.errors import InvalidTokenResponse
from proxy.tokens.clock import wall_time

if TYPE_CHECKING:
    from jwt.types import Options

__all__ = ["MAX_LIFETIME", "lifetime_and_clock_offset", "token_lifetime"]

# The token client's lines: the log masks registered secrets in them.
log = logging.getLogger("token_proxy.tokens.client")

# Longer declared lifetimes are clamped: a day-old token is re-requested anyway.
MAX_LIFETIME = 24 * 3600.0


def token_lifetime(
    expires_in: object,
    access_token: str,
    *,
    default_lifetime: float,
    upstream: str | None = None,
    now: float | None = None,
) -> tuple[float, str]:
    """How long to use a token, in seconds from its fetch, and where that came from.

    * ``expires_in`` (int, float or numeric string) when positive;
    * but a JWT access token's ``exp - iat`` (read without verification) when shorter;
    * missing or unreadable ``expires_in``: the JWT's ``exp - iat``; a JWT without
      ``iat`` its ``exp`` against the wall clock `now`; else `default_lifetime`;
    * zero or negative ``expires_in`` (a server bug, or "expires now"): as if missing,
      but never longer than `default_lifetime`, so that such a token is replaced soon;
    * at most `MAX_LIFETIME`. A JWT whose ``exp`` is not after its ``iat`` is refused.

    The lifetime never depends on the local wall clock when the answer has
    ``expires_in`` or the JWT has ``iat``: the caller counts it on the monotonic clock.
    """
    lifetime, source, _ = lifetime_and_clock_offset(
        expires_in,
        access_token,
        default_lifetime=default_lifetime,
        upstream=upstream,
        now=wall_time() if now is None else now,
    )
    return lifetime, source


def lifetime_and_clock_offset(
    expires_in: object,
    access_token: str,
    *,
    default_lifetime: float,
    upstream: str | None,
    now: float,
) -> tuple[float, str, float | None]:
    """`token_lifetime`, plus how far the wall clock `now` is from the token's issue time
    (positive: ahead), when the token tells; None when it does not."""
    extra = {"event": "token_response_warning", "upstream": upstream}
    declared = _seconds(expires_in)
    if expires_in is not None and declared is None:
        log.warning("unreadable expires_in from the authorization server; ignoring it", extra=extra)
    exp, iat = _jwt_times(access_token)
    # The JWT's own lifetime, independent of any clock, when it says when it was issued.
    span = None if exp is None or iat is None else exp - iat
    # The issue time on the issuer's clock: `iat`, or `exp` less the declared lifetime.
    issued = iat
    if issued is None and exp is not None and declared is not None and 0 < declared <= MAX_LIFETIME:
        issued = exp - declared
    offset = None if issued is None else now - issued
    if declared is not None and declared > 0:
        lifetime, source = declared, "expires_in"
        if span is not None and span < declared:
            lifetime, source = span, "jwt_exp"
    elif span is not None:
        lifetime, source = span, "jwt_exp"
    elif exp is not None and exp > now:
        # A JWT without `iat` or `expires_in`: its `exp` on our clock is all there is.
        lifetime, source = exp - now, "jwt_exp"
    elif exp is not None:
        # Expired by our clock, and nothing says whether the token or the clock is wrong:
        # used for the default lifetime (the upstream's 401 replaces it if it is the
        # token), rather than refused in a loop that a wrong clock never ends.
        lifetime, source = default_lifetime, "default"
        offset = now - exp
    else:
        lifetime, source = default_lifetime, "default"
    if declared is not None and declared <= 0:
        lifetime = min(lifetime, default_lifetime)
        log.warning(
            "token response has expires_in <= 0; using %.0f s instead", lifetime, extra=extra
        )
    if lifetime <= 0:
        raise InvalidTokenResponse("access token is already expired: its JWT exp is not after iat")
    return min(lifetime, MAX_LIFETIME), source, offset


def _seconds(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        seconds = float(value.strip() if isinstance(value, str) else value)
    except OverflowError:
        seconds = math.inf
    except ValueError:
        return None
    return None if math.isnan(seconds) else seconds


# Read only: no claim is checked against the local clock (that is what goes wrong).
_UNVERIFIED: Options = {
    "verify_signature": False,
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
    "verify_aud": False,
    "verify_iss": False,
}


def _jwt_times(token: str) -> tuple[float | None, float | None]:
    """A JWT's `exp` and `iat` claims (None for each the token lacks or is no JWT)."""
    if token.count(".") != 2:
        return None, None
    try:
        claims = jwt.decode(token, options=_UNVERIFIED)
    except (jwt.PyJWTError, ValueError):
        return None, None
    return _numeric_date(claims.get("exp")), _numeric_date(claims.get("iat"))


def _numeric_date(value: object) -> float | None:
    """RFC 7519 §2 NumericDate, or None."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)
