"""The way to one upstream's token endpoint: its HTTP session, token client and address.

`TokenProvider` (`proxy.tokens.provider`) makes its token requests through an
`EndpointAccess`, which owns:

* the aiohttp session, taken at the first request: the token settings' TLS trust and
  client certificate, their timeouts, no cookies, and never through ``HTTP(S)_PROXY``
  (in a sidecar's pod that may be this very proxy). With a `SessionPool` (what the
  proxy uses) upstreams whose settings give the same session share one, with its
  keep-alive connections: a thousand upstreams on one token endpoint hold a handful of
  connections to it, not a thousand. Without one, the upstream has a session of its own;
* the `TokenClient` over it (one token request each);
* the token endpoint's address: ``token_url``, or with ``issuer`` the endpoint
  discovered before the first request, and again before the attempt that follows a
  failed one (`rediscover_next`); a failed rediscovery keeps the last known endpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import aiohttp

from proxy import __version__
from proxy.config import TlsClientConfig, TokenConfig
from proxy.errors import TokenEndpointUnreachable, TokenFetchError
from proxy.tls.client_context import client_ssl_context
from proxy.tokens.client import TokenClient, display_url
from proxy.tokens.discovery import discover_token_endpoint
from proxy.tokens.dpop import DpopSession

__all__ = ["EndpointAccess", "SessionPool"]

log = logging.getLogger("token_proxy.tokens")

# Connections a session of one upstream's own may keep open.
OWN_SESSION_CONNECTIONS = 4


def _new_session(config: TokenConfig, *, limit: int, per_host: int) -> aiohttp.ClientSession:
    """A session for `config`'s TLS settings and timeouts; raises if TLS is unusable."""
    try:
        ssl_context = client_ssl_context(config.tls)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise TokenEndpointUnreachable(f"TLS settings unusable: {detail}") from None
    timeout = aiohttp.ClientTimeout(total=config.timeout, sock_connect=config.connect_timeout)
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=ssl_context, limit=limit, limit_per_host=per_host),
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=timeout,
        headers={"User-Agent": f"token-proxy/{__version__}"},
        # Never through HTTP(S)_PROXY: in a sidecar's pod that may be this very proxy.
        trust_env=False,
    )


SessionKey = tuple[TlsClientConfig, float, float]


class SessionPool:
    """Token endpoint sessions shared by the upstreams whose settings give the same one
    (TLS settings and timeouts); each is closed when its last user lets it go."""

    def __init__(self, connections_per_host: int) -> None:
        self._per_host = max(1, connections_per_host)
        self._sessions: dict[SessionKey, tuple[aiohttp.ClientSession, int]] = {}

    def acquire(self, config: TokenConfig) -> aiohttp.ClientSession:
        key = (config.tls, config.timeout, config.connect_timeout)
        found = self._sessions.get(key)
        if found is None:
            session, users = _new_session(config, limit=0, per_host=self._per_host), 0
        else:
            session, users = found
        self._sessions[key] = (session, users + 1)
        return session

    async def release(self, config: TokenConfig, session: aiohttp.ClientSession) -> None:
        key = (config.tls, config.timeout, config.connect_timeout)
        found = self._sessions.get(key)
        if found is None or found[0] is not session:
            await session.close()
            return
        if found[1] > 1:
            self._sessions[key] = (session, found[1] - 1)
            return
        del self._sessions[key]
        await session.close()

    def __len__(self) -> int:
        return len(self._sessions)


class EndpointAccess:
    """One upstream's session to its token endpoint, and where that endpoint is."""

    def __init__(
        self,
        upstream: str,
        config: TokenConfig,
        *,
        allow_insecure_http: bool,
        wall_clock: Callable[[], float],
        sessions: SessionPool | None = None,
        dpop: DpopSession | None = None,
        on_nonce_retry: Callable[[], None] | None = None,
    ) -> None:
        self.upstream = upstream
        self._dpop = dpop
        self._on_nonce_retry = on_nonce_retry
        self._config = config
        self._allow_insecure_http = allow_insecure_http
        self._wall_clock = wall_clock
        self.token_endpoint: str | None = config.token_url
        self._rediscover = False
        self._sessions = sessions
        self._session: aiohttp.ClientSession | None = None
        self._client: TokenClient | None = None

    def display(self) -> str | None:
        """The token endpoint for /status (no credentials, no query)."""
        return display_url(self.token_endpoint) if self.token_endpoint else None

    def rediscover_next(self, rediscover: bool) -> None:
        """Whether the next attempt discovers the token endpoint again first."""
        self._rediscover = rediscover and self._config.issuer is not None

    def client(self) -> TokenClient:
        """The token client, with its session taken at the first call."""
        if self._client is not None:
            return self._client
        if self._sessions is not None:
            self._session = self._sessions.acquire(self._config)
        else:
            self._session = _new_session(self._config, limit=OWN_SESSION_CONNECTIONS, per_host=0)
        self._client = TokenClient(
            self._config,
            self._session,
            upstream=self.upstream,
            wall_clock=self._wall_clock,
            dpop=self._dpop,
            on_nonce_retry=self._on_nonce_retry,
        )
        return self._client

    async def endpoint_for_attempt(self) -> str:
        """The token endpoint to send the next request to (discovered if need be)."""
        issuer = self._config.issuer
        if issuer is None:
            if self.token_endpoint is None:
                raise TokenFetchError("neither token_url nor issuer is configured")
            return self.token_endpoint
        if self.token_endpoint is None or self._rediscover:
            assert self._session is not None
            try:
                self.token_endpoint = await discover_token_endpoint(
                    self._session, issuer, allow_insecure_http=self._allow_insecure_http
                )
                self._rediscover = False
            except TokenFetchError as error:
                if self.token_endpoint is None:
                    raise
                log.warning(
                    "rediscovery for %s failed (%s); using the last known token endpoint",
                    self.upstream,
                    error.message,
                    extra={"event": "token_discovery", "upstream": self.upstream},
                )
        return self.token_endpoint

    async def close(self) -> None:
        session, self._session, self._client = self._session, None, None
        if session is None:
            return
        if self._sessions is not None:
            await self._sessions.release(self._config, session)
        else:
            await session.close()
