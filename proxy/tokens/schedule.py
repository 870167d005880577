"""When a token is renewed and when a failed fetch is retried: pure arithmetic, no I/O.

`TokenProvider` (`proxy.tokens.provider`) asks this module for its times; nothing here
holds state, reads a clock or talks to anything, so every rule is tested on numbers.

Renewal: a token of lifetime L is renewed ``margin + jitter`` before it expires. The
margin is ``refresh_before_expiry`` or else ``min(300 s, 20 % of L)``, never more than
half of L and never within the expiry leeway; the jitter (up to 5 % of the margin)
keeps replicas from renewing in lockstep. A token is no longer handed out within the
leeway of its expiry (``min(5 s, 5 % of L)``): the upstream checks ``exp`` on its own
clock after the request has travelled (cf. golang.org/x/oauth2's expiryDelta).

Retries after a failed fetch (`retry_delay`):

* the base is exponential backoff with full jitter: uniform in ``[0, min(retry_max,
  retry_initial * 2^(failures-1))]``, never under `RETRY_FLOOR`, and never before a
  ``Retry-After`` (capped at `RETRY_AFTER_MAX`);
* while a valid token is held, the delay is fitted to what is left of it: capped at
  `FIT_FRACTION` of the time the token may still be sent, never under `FIT_FLOOR`, so
  that several attempts fit before it expires. A ``Retry-After`` is honoured when it
  ends before the token does; one that does not fit gives way to the cap, the longest
  delay that keeps attempts fitting.
  When less than `FIT_FLOOR` is left, nothing fits and the base applies;
* once no valid token is held, the base applies unchanged.
"""

from __future__ import annotations

import random

__all__ = [
    "FIT_FLOOR",
    "FIT_FRACTION",
    "MIN_REFRESH_DELAY",
    "REFRESH_JITTER_FRACTION",
    "RETRY_AFTER_MAX",
    "RETRY_FLOOR",
    "expiry_leeway",
    "refresh_margin",
    "refresh_time",
    "retry_delay",
]

DEFAULT_MARGIN_MAX = 300.0
DEFAULT_MARGIN_FRACTION = 0.2
# A configured margin longer than the token's life would renew it continuously.
MARGIN_MAX_FRACTION = 0.5
REFRESH_JITTER_FRACTION = 0.05
# Even an absurdly short-lived token is not renewed in a tight loop.
MIN_REFRESH_DELAY = 0.5
EXPIRY_LEEWAY_MAX = 5.0
EXPIRY_LEEWAY_FRACTION = 0.05
RETRY_FLOOR = 0.1
RETRY_AFTER_MAX = 600.0
# While a token is held, no retry waits longer than this share of its remaining
# validity: after n failures at most (3/4)^n of it is gone, so with a refresh margin
# of a few seconds three or four attempts still fit before the token expires.
FIT_FRACTION = 0.25
# ... nor less than this: a token endpoint in trouble is not hammered at the end.
FIT_FLOOR = 0.25


def expiry_leeway(lifetime: float) -> float:
    """How long before its expiry a token of `lifetime` is no longer handed out."""
    return min(EXPIRY_LEEWAY_MAX, lifetime * EXPIRY_LEEWAY_FRACTION)


def refresh_margin(lifetime: float, configured: float | None) -> float:
    """How long before expiry a token of `lifetime` is renewed (never within the leeway)."""
    if configured is None:
        margin = min(DEFAULT_MARGIN_MAX, DEFAULT_MARGIN_FRACTION * lifetime)
    else:
        margin = configured
    return max(min(margin, MARGIN_MAX_FRACTION * lifetime), expiry_leeway(lifetime))


def refresh_time(expires_at: float, now: float, margin: float, jitter: float) -> float:
    """When a token expiring at `expires_at` is renewed (same clock as `now`).

    `jitter` is drawn by the caller from ``[0, REFRESH_JITTER_FRACTION * margin]``.
    """
    return max(expires_at - margin - jitter, now + MIN_REFRESH_DELAY)


def retry_delay(
    failures: int,
    *,
    retry_initial: float,
    retry_max: float,
    retry_after: float | None,
    token_left: float | None,
    rng: random.Random,
) -> float:
    """Seconds until the next attempt after `failures` consecutive failed fetches.

    `token_left` is how long the held token may still be sent (None: no valid token).
    """
    exponent = min(failures - 1, 62)
    ceiling = min(retry_max, retry_initial * 2.0**exponent)
    delay = max(RETRY_FLOOR, rng.uniform(0.0, ceiling))
    after = None if retry_after is None else min(retry_after, RETRY_AFTER_MAX)
    if token_left is None or token_left <= FIT_FLOOR:
        return delay if after is None else max(delay, after)
    cap = max(FIT_FLOOR, FIT_FRACTION * token_left)
    delay = min(delay, cap)
    if after is not None:
        # Honoured where it ends before the token does; otherwise the longest that fits.
        delay = max(delay, after if after < token_left else cap)
    return delay
