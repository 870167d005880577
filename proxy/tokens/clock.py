"""The wall clock the token code reads, kept in one place.

Token expiry is decided on the monotonic clock only. Wall-clock time is read for what
is wall-clock time by nature: a JWT's ``iat``/``exp`` claims, a client assertion's
claims, an HTTP-date ``Retry-After``, and the timestamps shown in ``/status`` and the
expiry gauge. All of those come from `wall_time()`, which reads `wall_clock` at each
call, so a test can replace `wall_clock` to step the wall clock while the monotonic
clock runs on.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["wall_clock", "wall_time"]

wall_clock: Callable[[], float] = time.time


def wall_time() -> float:
    """Seconds since the epoch, from `wall_clock`."""
    return wall_clock()
