"""`token-proxy demo`: the whole picture on loopback, with nothing to configure.

Starts three things in one process and prints a curl line to try:

* a development OAuth 2.0 token endpoint (client-credentials grant, client_secret_basic,
  short-lived opaque tokens) - for demos only, it keeps tokens in memory;
* a sample protected API, "inventory", that answers 401 without a valid bearer token;
* token-proxy itself, configured to add inventory's token to requests for
  `http://inventory.demo/...` sent through it as HTTP_PROXY.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import secrets
import signal
import sys
import time
from urllib.parse import unquote_plus

from aiohttp import web

from proxy.app import ProxyApp
from proxy.config import (
    Address,
    HostMatch,
    MatchConfig,
    ProxyConfig,
    Secret,
    TargetUrl,
    TokenConfig,
    UpstreamConfig,
)
from proxy.ops.logs import configure_logging

DEMO_CLIENT_ID = "demo-client"
DEMO_HOST = "inventory.demo"


class DemoAuthorizationServer:
    """A tiny in-memory token endpoint for the demo (never for production)."""

    def __init__(self, client_secret: str, lifetime: int) -> None:
        self._secret = client_secret
        self._lifetime = lifetime
        self._tokens: dict[str, float] = {}
        self.issued = 0

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/oauth/token", self._token)]

    async def _token(self, request: web.Request) -> web.Response:
        form = await request.post()
        if not self._authenticated(request.headers.get("Authorization", "")):
            return web.json_response(
                {"error": "invalid_client"},
                status=401,
                headers={"WWW-Authenticate": 'Basic realm="demo"'},
            )
        if form.get("grant_type") != "client_credentials":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        token = secrets.token_urlsafe(24)
        self._tokens[token] = time.monotonic() + self._lifetime
        self.issued += 1
        return web.json_response(
            {"access_token": token, "token_type": "Bearer", "expires_in": self._lifetime},
            headers={"Cache-Control": "no-store"},
        )

    def _authenticated(self, header: str) -> bool:
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            client_id, _, secret = base64.b64decode(encoded).decode().partition(":")
        except ValueError:
            return False
        # RFC 6749 §2.3.1: both parts are form-urlencoded before base64.
        return unquote_plus(client_id) == DEMO_CLIENT_ID and secrets.compare_digest(
            unquote_plus(secret), self._secret
        )

    def valid(self, token: str) -> bool:
        expiry = self._tokens.get(token)
        return expiry is not None and expiry > time.monotonic()


def inventory_api(auth: DemoAuthorizationServer) -> list[web.RouteDef]:
    async def stock(request: web.Request) -> web.Response:
        header = request.headers.get("Authorization", "")
        if not header.startswith("Bearer ") or not auth.valid(header[7:]):
            return web.json_response({"error": "invalid_token"}, status=401)
        return web.json_response(
            {
                "item": request.match_info["item"],
                "in_stock": 42,
                "note": "this request carried a valid bearer token added by token-proxy",
            }
        )

    return [web.get("/api/stock/{item}", stock)]


async def _serve_routes(routes: list[web.RouteDef], port: int) -> web.AppRunner:
    app = web.Application()
    app.add_routes(routes)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


def demo_config(
    token_port: int, api_port: int, proxy_port: int, admin_port: int, secret: str
) -> ProxyConfig:
    token = TokenConfig(
        client_id=DEMO_CLIENT_ID,
        token_url=f"http://127.0.0.1:{token_port}/oauth/token",
        client_secret=Secret(secret),
        scope=("inventory:read",),
    )
    upstream = UpstreamConfig(
        name="inventory",
        match=MatchConfig((HostMatch(DEMO_HOST),)),
        token=token,
        url=TargetUrl("http", "127.0.0.1", api_port),
    )
    return ProxyConfig(
        upstreams=(upstream,),
        listen=Address("127.0.0.1", proxy_port),
        admin_listen=Address("127.0.0.1", admin_port),
        access_log=True,
        source="<demo>",
    )


async def run_demo(args: argparse.Namespace) -> int:
    secret = secrets.token_urlsafe(16)
    auth = DemoAuthorizationServer(secret, lifetime=args.token_lifetime)
    runners = [
        await _serve_routes(auth.routes(), args.token_port),
        await _serve_routes(inventory_api(auth), args.api_port),
    ]
    config = demo_config(args.token_port, args.api_port, args.port, args.admin_port, secret)
    app = ProxyApp(config)
    await app.start()
    proxy = f"http://127.0.0.1:{app.port}"
    print(
        f"""
token-proxy demo is running (Ctrl-C to stop)
  proxy (HTTP_PROXY)   {proxy}
  admin                http://127.0.0.1:{app.admin_port}/status  /metrics  /readyz
  token endpoint       http://127.0.0.1:{args.token_port}/oauth/token
  inventory API        http://127.0.0.1:{args.api_port}  (401 without a token)

Try it - the request gains its token on the way:
  curl -x {proxy} http://{DEMO_HOST}/api/stock/1
or, as an unmodified service would (curl reads the lower-case variable):
  http_proxy={proxy} curl http://{DEMO_HOST}/api/stock/1
Without the proxy the API refuses:
  curl http://127.0.0.1:{args.api_port}/api/stock/1
""",
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await app.shutdown()
    for runner in runners:
        await runner.cleanup()
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="token-proxy demo", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=15080, help="forward-proxy port")
    parser.add_argument("--admin-port", type=int, default=15090)
    parser.add_argument("--token-port", type=int, default=15081)
    parser.add_argument("--api-port", type=int, default=15082)
    parser.add_argument("--token-lifetime", type=int, default=120, help="seconds")
    args = parser.parse_args(argv)
    configure_logging("info", "text")
    with contextlib.suppress(KeyboardInterrupt):
        try:
            return asyncio.run(run_demo(args))
        except OSError as error:
            print(f"token-proxy demo: {error}", file=sys.stderr)
            return 1
    return 0
