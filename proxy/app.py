"""Wiring and lifecycle: build the proxy from a config, start it, reload it, drain it.

`ProxyApp` owns the long-lived pieces (metrics, token providers, upstream pool,
listeners, admin server) and the three lifecycle moves Kubernetes asks for:

* start: providers begin fetching first tokens at once; ports listen straight away
  and `/readyz` says when every required token is there;
* reload (SIGHUP or a changed config file): validate, then swap the whole runtime in
  one assignment; unchanged upstreams keep their cached token;
* shutdown (SIGTERM): `/readyz` turns 503 at once, listeners stop accepting, idle
  keep-alive connections close, in-flight requests get the grace period, exit 0.

`run_proxy()` is what `token-proxy run` calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from proxy.config import ConfigError, ProxyConfig, TokenConfig, UpstreamConfig, load_config
from proxy.datapath.forward import Forwarder
from proxy.datapath.http2.front import Http2Front
from proxy.datapath.http2.upstream import Http2Upstreams
from proxy.datapath.listener import Listener
from proxy.datapath.runtime import Runtime, RuntimeHolder
from proxy.datapath.tunnel import TunnelHandler
from proxy.datapath.upstream_pool import UpstreamPool
from proxy.ops.admin import AdminServer, UpstreamHealth, create_admin_app
from proxy.ops.allocator import tune_for_streaming
from proxy.ops.logs import configure_logging, forget_secret, register_secret
from proxy.ops.metrics import Metrics
from proxy.ops.throttled_log import ThrottledLog
from proxy.tls.intercept import TlsInterceptor
from proxy.tokens import TokenProvider
from proxy.tokens.cache_crypto import CacheKeys
from proxy.tokens.endpoint import SessionPool
from proxy.tokens.shared_cache import SharedSlot

if TYPE_CHECKING:
    from proxy.tokens.redis_backend import CacheBackend

log = logging.getLogger("token_proxy.app")

CONFIG_POLL_INTERVAL = 2.0


@dataclass(frozen=True)
class _FileIdentity:
    """What changes when a config file (or the ConfigMap symlink behind it) is replaced."""

    real_path: str
    inode: int
    mtime_ns: int
    size: int


def _identify(path: str) -> _FileIdentity | None:
    try:
        real = os.path.realpath(path)
        st = os.stat(real)
    except OSError:
        return None
    return _FileIdentity(real, st.st_ino, st.st_mtime_ns, st.st_size)


class ProxyApp:
    """The running proxy: its ports, its token providers and its lifecycle."""

    def __init__(self, config: ProxyConfig, *, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics if metrics is not None else Metrics()
        self.pool = UpstreamPool()
        self.providers: dict[str, TokenProvider] = {}
        self._holder: RuntimeHolder | None = None
        self.forward_listener: Listener | None = None
        self.reverse_listeners: dict[str, Listener] = {}
        self._admin: AdminServer | None = None
        self._draining = False
        self._reload_lock = asyncio.Lock()
        self.tunnels: TunnelHandler | None = None
        self.forwarder: Forwarder | None = None
        # HTTP/2 from the application: intercepted sessions that chose h2, h2c on
        # upstreams' own ports.
        self.http2: Http2Front | None = None
        # The fleet token cache (token_cache), if configured; fixed until a restart.
        self.token_cache: CacheBackend | None = None
        self._cache_keys: CacheKeys | None = None
        # One semaphore per token endpoint, shared by the providers that use it, and the
        # sessions to token endpoints, shared by providers with the same TLS settings.
        self._fetch_slots: dict[str, asyncio.Semaphore] = {}
        self._token_sessions = SessionPool(config.token_endpoint_concurrency)

    # -- HealthSource (read by the admin endpoints) --------------------------

    @property
    def draining(self) -> bool:
        return self._draining

    def upstreams(self) -> Mapping[str, UpstreamHealth]:
        return {
            u.name: UpstreamHealth(provider=self.providers[u.name], required=u.required)
            for u in self.config.upstreams
            if u.name in self.providers
        }

    # -- start ---------------------------------------------------------------

    @property
    def holder(self) -> RuntimeHolder:
        assert self._holder is not None, "start() first"
        return self._holder

    async def start(self) -> None:
        config = self.config
        self._open_token_cache()
        for upstream in config.upstreams:
            self.providers[upstream.name] = await self._start_provider(upstream)
        self._holder = RuntimeHolder(Runtime.build(config, self.providers))
        self.tunnels = TunnelHandler(self._holder, self.metrics)
        http2_upstreams = Http2Upstreams()
        self.forwarder = Forwarder(
            self._holder, self.pool, self.metrics, self.tunnels, http2=http2_upstreams
        )
        self.tunnels.handlers = self.forwarder
        self.http2 = Http2Front(self._holder, self.metrics, http2_upstreams)
        if config.tls_intercept is not None:
            # Before any port listens: a CA that cannot be loaded or written stops start-up.
            self.tunnels.interceptor = TlsInterceptor.from_config(
                config.tls_intercept, self.forwarder, source=config.source, http2=self.http2
            )
        self.forward_listener = Listener(
            "forward", config.listen, self.forwarder.forward_handler(), config.limits, self.metrics
        )
        await self.forward_listener.start()
        for upstream in config.upstreams:
            if upstream.listen is not None:
                await self._start_reverse_listener(upstream)
        await self._start_admin()
        log.info(
            "token-proxy started",
            extra={
                "event": "start",
                "listen": f"{config.listen.host}:{self.forward_listener.port}",
                "admin_listen": f"{config.admin_listen.host}:{self.admin_port}",
                "upstreams": len(config.upstreams),
            },
        )

    async def _start_provider(self, upstream: UpstreamConfig) -> TokenProvider:
        self.metrics.register_upstream(upstream.name)
        if upstream.token.client_secret is not None:
            # Defence in depth: the log formatter masks this exact string in the token
            # code's lines, where a token endpoint might echo it (see proxy/logs.py).
            register_secret(upstream.token.client_secret.reveal())
        shared = None
        cache, keys = self.token_cache, self._cache_keys
        dpop = upstream.token.dpop
        # A DPoP-bound token is of use only with its key: shared only when every replica
        # reads the same key file, never with a key generated by one replica.
        shareable = dpop is None or dpop.key_file is not None
        if (
            cache is not None
            and keys is not None
            and upstream.token.cache == "shared"
            and shareable
        ):
            shared = SharedSlot(cache, keys, upstream.name, upstream.token, self.metrics)
        provider = TokenProvider(
            upstream.name,
            upstream.token,
            self.metrics,
            allow_insecure_http=upstream.allow_insecure_http,
            shared=shared,
            fetch_slots=self._fetch_slots_for(upstream.token),
            sessions=self._token_sessions,
        )
        await provider.start()
        return provider

    def _open_token_cache(self) -> None:
        """The Redis client of `token_cache` (it connects at its first use)."""
        cache = self.config.token_cache
        if cache is None:
            return
        try:
            self._cache_keys = CacheKeys.from_file(cache.encryption_key_file)
        except (OSError, ValueError) as error:
            detail = error.strerror if isinstance(error, OSError) else str(error)
            raise ConfigError(
                self.config.source, "token_cache.encryption_key_file", str(detail)
            ) from None
        # Here, not at the top: redis-py is loaded only by a proxy that uses it.
        from proxy.tokens.redis_backend import CacheBackend

        self.token_cache = CacheBackend(cache, self.metrics)
        self.token_cache.start()

    def _fetch_slots_for(self, token: TokenConfig) -> asyncio.Semaphore:
        endpoint = token.token_url or f"issuer:{token.issuer}"
        slots = self._fetch_slots.get(endpoint)
        if slots is None:
            slots = self._fetch_slots[endpoint] = asyncio.Semaphore(
                self.config.token_endpoint_concurrency
            )
        return slots

    async def _start_reverse_listener(self, upstream: UpstreamConfig) -> None:
        assert upstream.listen is not None
        assert self.forwarder is not None
        listener = Listener(
            f"reverse:{upstream.name}",
            upstream.listen,
            self.forwarder.reverse_handler(upstream.name),
            self.config.limits,
            self.metrics,
        )
        await listener.start()
        self.reverse_listeners[upstream.name] = listener
        if self.http2 is not None:
            self.http2.attach_reverse(listener, upstream.name)

    async def _start_admin(self) -> None:
        cache = self.token_cache
        app = create_admin_app(
            self.metrics, self, token_cache=cache.status if cache is not None else None
        )
        self._admin = AdminServer(app, self.config.admin_listen, self.config.limits)
        await self._admin.start()

    @property
    def admin_port(self) -> int:
        assert self._admin is not None, "start() first"
        return self._admin.port

    @property
    def port(self) -> int:
        assert self.forward_listener is not None
        return self.forward_listener.port

    # -- reload --------------------------------------------------------------

    async def reload(self, config: ProxyConfig) -> None:
        """Swap in `config`: keep unchanged tokens, start and stop what changed."""
        async with self._reload_lock:
            old = self.config
            if config.listen != old.listen or config.admin_listen != old.admin_listen:
                log.warning(
                    "listen and admin_listen changes take effect only after a restart",
                    extra={"event": "reload_partial"},
                )
            if config.token_cache != old.token_cache:
                log.warning(
                    "token_cache changes take effect only after a restart",
                    extra={"event": "reload_partial"},
                )
            if config.tls_intercept != old.tls_intercept:
                log.warning(
                    "tls_intercept changes take effect only after a restart",
                    extra={"event": "reload_partial"},
                )
            old_by_name = {u.name: u for u in old.upstreams}
            providers: dict[str, TokenProvider] = {}
            retired: list[TokenProvider] = []
            kept: set[str] = set()
            for upstream in config.upstreams:
                previous = old_by_name.get(upstream.name)
                current = self.providers.get(upstream.name)
                if (
                    previous is not None
                    and current is not None
                    and previous.token == upstream.token
                    and previous.allow_insecure_http == upstream.allow_insecure_http
                ):
                    providers[upstream.name] = current
                    kept.add(upstream.name)
                else:
                    providers[upstream.name] = await self._start_provider(upstream)
                    if current is not None:
                        retired.append(current)
            for name, provider in self.providers.items():
                if name not in providers:
                    retired.append(provider)
            self.config = config
            self.providers = providers
            self.holder.current = Runtime.build(config, providers)
            await self._reconcile_reverse_listeners(old, config)
            for provider in retired:
                await provider.close()
            for upstream in old.upstreams:
                if upstream.token.client_secret is not None and upstream.name not in kept:
                    forget_secret(upstream.token.client_secret.reveal())
            for name in old_by_name.keys() - providers.keys():
                self.metrics.forget_upstream(name)
            self.metrics.config_reloads.labels(outcome="success").inc()
            log.info(
                "configuration reloaded",
                extra={"event": "reload", "outcome": "success", "upstreams": len(config.upstreams)},
            )

    async def _reconcile_reverse_listeners(self, old: ProxyConfig, new: ProxyConfig) -> None:
        old_listen = {u.name: u.listen for u in old.upstreams if u.listen is not None}
        for upstream in new.upstreams:
            if upstream.listen is None or old_listen.get(upstream.name) == upstream.listen:
                continue
            await self._stop_reverse_listener(upstream.name)
            await self._start_reverse_listener(upstream)
        wanted = {u.name for u in new.upstreams if u.listen is not None}
        for name in list(self.reverse_listeners):
            if name not in wanted:
                await self._stop_reverse_listener(name)

    async def _stop_reverse_listener(self, name: str) -> None:
        listener = self.reverse_listeners.pop(name, None)
        if listener is not None:
            if self.http2 is not None:
                self.http2.detach_reverse(listener)
            await listener.stop_accepting()
            await listener.drain(self.config.shutdown_grace_period)
            await listener.close()

    async def reload_from_file(self) -> bool:
        """Load `config.source` again and apply it; an invalid file keeps the old config."""
        try:
            config = await asyncio.to_thread(load_config, self.config.source)
        except ConfigError as error:
            self.metrics.config_reloads.labels(outcome="failure").inc()
            log.error(
                "configuration reload rejected; still serving the previous configuration",
                extra={"event": "reload", "outcome": "failure", "error": str(error)},
            )
            return False
        await self.reload(config)
        return True

    async def watch_config(self, interval: float = CONFIG_POLL_INTERVAL) -> None:
        """Reload when the config file changes (including a ConfigMap's symlink swap)."""
        path = self.config.source
        seen = _identify(path)
        while True:
            await asyncio.sleep(interval)
            now = _identify(path)
            if now is not None and now != seen:
                seen = now
                await self.reload_from_file()

    # -- shutdown ------------------------------------------------------------

    async def shutdown(self) -> None:
        """Drain and stop: readiness off, stop accepting, finish in-flight work, close."""
        self._draining = True
        log.info(
            "shutting down",
            extra={"event": "shutdown", "grace_seconds": self.config.shutdown_grace_period},
        )
        listeners = [self.forward_listener, *self.reverse_listeners.values()]
        active = [listener for listener in listeners if listener is not None]
        for listener in active:
            await listener.stop_accepting()
        results = await asyncio.gather(
            *(listener.drain(self.config.shutdown_grace_period) for listener in active)
        )
        if not all(results):
            log.warning(
                "grace period over; closing the remaining connections", extra={"event": "shutdown"}
            )
        for listener in active:
            await listener.close()
        if self.http2 is not None:
            await self.http2.close()
        for provider in self.providers.values():
            await provider.close()
        if self.token_cache is not None:
            await self.token_cache.close()
        self.pool.close()
        if self._admin is not None:
            await self._admin.close()
        log.info("stopped", extra={"event": "stopped"})


async def serve(config: ProxyConfig) -> int:
    """Run until SIGTERM/SIGINT; SIGHUP reloads. Returns the exit code."""
    app = ProxyApp(config)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    background: set[asyncio.Task[object]] = set()

    def reload_soon() -> None:
        task: asyncio.Task[object] = loop.create_task(app.reload_from_file())
        background.add(task)
        task.add_done_callback(background.discard)

    loop.set_exception_handler(ThrottledLog(log).loop_exception_handler)
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload_soon)
    try:
        await app.start()
    except (OSError, ConfigError) as error:
        log.error("cannot start: %s", error, extra={"event": "start_failed"})
        await app.shutdown()
        return 2 if isinstance(error, ConfigError) else 1
    watcher = loop.create_task(app.watch_config())
    await stop.wait()
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher
    await app.shutdown()
    return 0


def run_proxy(config: ProxyConfig) -> int:
    """`token-proxy run`: configure logging and the allocator, pick the fastest loop, serve."""
    configure_logging(config.log_level, config.log_format)
    tune_for_streaming()
    try:
        import uvloop
    except ImportError:
        return asyncio.run(serve(config))
    return int(uvloop.run(serve(config)))
