"""Log lines that a client or an attacker can cause, at most one per key per interval.

A refused CONNECT, a failed accept or a flood of bad requests must be visible in the
log, but must not let whoever causes them write the log full: each key (a reason) logs
its first occurrence at once, then at most one line per `interval`, saying how many
were left out in between.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

__all__ = ["ThrottledLog"]


class ThrottledLog:
    """Logs through `logger` at most once per `interval` seconds for each key."""

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = 10.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 256,
    ) -> None:
        self._logger = logger
        self._interval = interval
        self._clock = clock
        self._max_keys = max_keys
        # key -> (time of the last line, occurrences left out since)
        self._seen: dict[str, tuple[float, int]] = {}

    def admit(self, key: str) -> int | None:
        """None if `key` logged within the interval; else how many were left out since."""
        now = self._clock()
        last = self._seen.get(key)
        if last is not None and now - last[0] < self._interval:
            self._seen[key] = (last[0], last[1] + 1)
            return None
        if last is None and len(self._seen) >= self._max_keys:
            self._forget_old(now)
        self._seen[key] = (now, 0)
        return last[1] if last is not None else 0

    def log(self, level: int, key: str, message: str, *args: object) -> bool:
        """Log `message % args` unless `key` logged within the interval; True if logged."""
        suppressed = self.admit(key)
        if suppressed is None:
            return False
        if suppressed:
            message += " (%d more like this since the last such line)"
            args = (*args, suppressed)
        self._logger.log(level, message, *args)
        return True

    def loop_exception_handler(
        self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]
    ) -> None:
        """An event loop exception handler that passes each kind of error on at most once
        per interval: a failing `accept()` under a descriptor flood is reported per
        attempt, which would write the log full (and the disk with it)."""
        kind = str(context.get("message", "")) + type(context.get("exception")).__name__
        suppressed = self.admit(kind)
        if suppressed is None:
            return
        if suppressed:
            context = {
                **context,
                "message": f"{context.get('message')} ({suppressed} more like "
                "this since the last such line)",
            }
        loop.default_exception_handler(context)

    def _forget_old(self, now: float) -> None:
        expired = [k for k, (at, _) in self._seen.items() if now - at >= self._interval]
        for key in expired or list(self._seen)[: len(self._seen) // 2]:
            del self._seen[key]
