"""The Redis side of the fleet token cache: one client and connection pool per process.

Imported only when `token_cache` is configured (redis-py costs a proxy that does not
use it some 10 MiB). Every Redis call can fail, and a failure only ever means "no
cache this time" (`proxy.tokens.shared_cache.CacheUnavailable`):

* each operation has a short timeout (socket timeouts under an overall deadline) and
  redis-py's own retries are off, so a slow or silent Redis costs one refresh at most
  `OPERATION_TIMEOUT`, and never blocks the event loop;
* after a failure the backend is *down*: further operations fail at once, without I/O,
  until a retry time that backs off exponentially (with jitter) up to `RETRY_MAX`;
  then one operation probes, and success makes it *up* again. Each change of state is
  logged once and shown by the ``token_proxy_token_cache_up`` gauge and ``/status``.
  A background task (`CacheBackend.start`) pings at each retry time while down and
  every `HEALTH_INTERVAL` while up, so the state is current between refreshes too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.credentials import CredentialProvider
from redis.exceptions import (
    AskError,
    AuthenticationError,
    AuthorizationError,
    ClusterError,
    NoPermissionError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError
from yarl import URL

from proxy.config import RedisConfig, TokenCacheConfig
from proxy.ops.metrics import Metrics
from proxy.tokens.clock import wall_time
from proxy.tokens.shared_cache import CacheUnavailable

__all__ = ["CacheBackend", "display_redis_url", "failure_reason", "redis_client"]

log = logging.getLogger("token_proxy.tokens.cache")

T = TypeVar("T")

# One Redis round trip on a healthy network takes a millisecond; a second is broken.
SOCKET_TIMEOUT: Final = 0.5
OPERATION_TIMEOUT: Final = 1.0
RETRY_INITIAL: Final = 0.5
RETRY_MAX: Final = 30.0
# While up, a PING this often keeps the state (and the gauge an alert reads) current
# between refreshes, which may be an hour apart.
HEALTH_INTERVAL: Final = 30.0
# Connections to Redis per process, however many upstreams refresh at once.
MAX_CONNECTIONS: Final = 8
# KEYS[1]: a lock or an entry; ARGV[1]: the value it must still hold to be deleted.
COMPARE_AND_DELETE: Final = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('del', KEYS[1])
end
return 0
"""


class _PasswordFile(CredentialProvider):
    """AUTH credentials with the password read from its file at each (re)connection."""

    def __init__(self, username: str | None, password_file: Any) -> None:
        self._username = username
        self._password_file = password_file

    def get_credentials(self) -> tuple[str] | tuple[str, str]:
        with open(self._password_file, encoding="utf-8") as file:
            password = file.read().rstrip("\r\n")
        return (self._username, password) if self._username else (password,)

    async def get_credentials_async(self) -> tuple[str] | tuple[str, str]:
        return self.get_credentials()


def redis_client(config: RedisConfig) -> aioredis.Redis:
    """A client for `config` with short timeouts, no retries of its own and a bounded pool."""
    options: dict[str, Any] = {
        "socket_timeout": SOCKET_TIMEOUT,
        "socket_connect_timeout": SOCKET_TIMEOUT,
        "retry": Retry(NoBackoff(), 0),
        "max_connections": MAX_CONNECTIONS,
    }
    if config.password_file is not None:
        options["credential_provider"] = _PasswordFile(config.username, config.password_file)
    elif config.username is not None:
        options["username"] = config.username
    if URL(config.url).scheme == "rediss" and config.ca_file is not None:
        options["ssl_ca_certs"] = str(config.ca_file)
    return aioredis.Redis.from_url(config.url, **options)


def display_redis_url(url: str) -> str:
    """`url` without credentials, for logs and /status."""
    try:
        parsed = URL(url)
        return str(parsed.with_user(None).with_query(None).with_fragment(None))
    except (ValueError, TypeError):
        return "<unparseable url>"


def failure_reason(error: BaseException) -> str:
    """A short, fixed name for what went wrong with Redis: one of
    `proxy.ops.metrics.TOKEN_CACHE_ERROR_REASONS` (a metric label value)."""
    message = str(error).upper()
    if isinstance(error, AuthenticationError | AuthorizationError | NoPermissionError) or (
        isinstance(error, ResponseError) and message.startswith(("NOAUTH", "WRONGPASS", "NOPERM"))
    ):
        return "auth"
    if isinstance(error, OutOfMemoryError) or message.startswith("OOM"):
        return "out_of_memory"
    if isinstance(error, ReadOnlyError) or message.startswith("READONLY"):
        return "read_only"
    if isinstance(error, AskError | ClusterError | TryAgainError) or message.startswith(
        ("MOVED", "ASK", "CLUSTERDOWN")
    ):
        return "cluster_redirect"
    if isinstance(error, RedisTimeoutError | TimeoutError):
        return "timeout"
    if isinstance(error, ResponseError):
        return "error_reply"
    return "unreachable"


class CacheBackend:
    """The process's Redis client and what it knows of the server's health."""

    def __init__(
        self,
        config: TokenCacheConfig,
        metrics: Metrics,
        *,
        client: aioredis.Redis | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = wall_time,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self._metrics = metrics
        self._client = client if client is not None else redis_client(config.redis)
        self._clock = clock
        self._wall_clock = wall_clock
        self._rng = rng if rng is not None else random.Random()
        self._compare_and_delete = self._client.register_script(COMPARE_AND_DELETE)
        self._state = "unknown"  # until the first operation answers
        self._since = wall_clock()
        self._failures = 0
        self._retry_at = -math.inf
        self._reason: str | None = None
        self._detail: str | None = None
        self.display_url = display_redis_url(config.redis.url)
        self._watch: asyncio.Task[None] | None = None
        metrics.enable_token_cache()

    @property
    def state(self) -> str:
        """``unknown`` before the first answer, then ``up`` or ``down``."""
        return self._state

    def start(self) -> None:
        """Keep the state current in the background: ping now, then as it says."""
        if self._watch is None:
            self._watch = asyncio.create_task(self._keep_watch(), name="token-cache-health")

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
            self._watch = None
        with contextlib.suppress(RedisError, OSError):
            await self._client.aclose()

    async def _keep_watch(self) -> None:
        while True:
            with contextlib.suppress(CacheUnavailable):
                await self._call(lambda client: client.ping())
            if self._state == "down":
                delay = max(0.0, self._retry_at - self._clock())
            else:
                delay = self._rng.uniform(0.8, 1.2) * HEALTH_INTERVAL
            await asyncio.sleep(delay)

    def status(self) -> dict[str, object]:
        """JSON-safe state for /status (never the password or a token)."""
        return {
            "backend": self.display_url,
            "state": self._state,
            "since": self._since,
            "last_error": None
            if self._reason is None
            else {"reason": self._reason, "message": self._detail},
            "consecutive_failures": self._failures,
            "retry_in_seconds": round(max(0.0, self._retry_at - self._clock()), 3)
            if self._state == "down"
            else None,
        }

    # -- operations ------------------------------------------------------------------

    async def get(self, name: str) -> bytes | None:
        value = await self._call(lambda client: client.get(name))
        return value if isinstance(value, bytes) else None

    async def set(self, name: str, value: bytes, ttl: float) -> None:
        await self._call(lambda client: client.set(name, value, px=max(1, int(ttl * 1000))))

    async def set_if_absent(self, name: str, value: bytes, ttl: float) -> bool:
        ms = max(1, int(ttl * 1000))
        return bool(await self._call(lambda client: client.set(name, value, nx=True, px=ms)))

    async def delete_if_equal(self, name: str, value: bytes) -> bool:
        script = self._compare_and_delete
        return bool(await self._call(lambda client: script(keys=[name], args=[value])))

    async def _call(self, operation: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
        if self._state == "down" and self._clock() < self._retry_at:
            raise CacheUnavailable(self._detail or "token cache unavailable")
        try:
            async with asyncio.timeout(OPERATION_TIMEOUT):
                result = await operation(self._client)
        except (RedisError, OSError) as error:  # builtin TimeoutError is an OSError
            self._failed(error)
            raise CacheUnavailable(self._detail or "token cache unavailable") from None
        self._answered()
        return result

    def _failed(self, error: BaseException) -> None:
        reason = failure_reason(error)
        # Never the URL's credentials: redis-py names host and port, and the server's
        # replies (OOM, READONLY, NOAUTH...) name no secret.
        detail = f"{type(error).__name__}: {str(error)[:200]}" if str(error) else reason
        self._failures += 1
        ceiling = min(RETRY_MAX, RETRY_INITIAL * 2.0 ** min(self._failures - 1, 30))
        self._retry_at = self._clock() + self._rng.uniform(ceiling / 2, ceiling)
        self._metrics.token_cache_errors.labels(reason=reason).inc()
        self._metrics.token_cache_up.set(0)
        changed = self._state != "down" or reason != self._reason
        if self._state != "down":
            self._since = self._wall_clock()
        self._state, self._reason, self._detail = "down", reason, detail
        if changed:
            log.warning(
                "token cache at %s unavailable (%s): tokens are fetched without it until "
                "it answers again",
                self.display_url,
                detail,
                extra={"event": "token_cache", "state": "down", "reason": reason},
            )

    def _answered(self) -> None:
        if self._state == "up":
            return
        if self._state == "down":
            log.info(
                "token cache at %s answers again after %.0f s; sharing tokens again",
                self.display_url,
                self._wall_clock() - self._since,
                extra={"event": "token_cache", "state": "up"},
            )
        self._state, self._since, self._failures = "up", self._wall_clock(), 0
        self._metrics.token_cache_up.set(1)
