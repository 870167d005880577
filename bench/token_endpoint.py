"""The benchmark's token endpoint: client credentials in, short-lived tokens out, all counted.

Run as `python -m bench.token_endpoint PORT LIFETIME` with the client secret in
`BENCH_CLIENT_SECRET`. Any client id is accepted with that secret (client_secret_basic),
so each upstream can use its own name as client id and `GET /counts` can say how many
tokens each upstream fetched and when: the token economy part of the report. A token
request that carries a `DPoP` header gets `"token_type": "DPoP"` (the proof is not
checked): `bench.dpop` measures the proxy's side of DPoP.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
import sys
import time
from collections import defaultdict
from urllib.parse import unquote_plus

from aiohttp import web

SECRET_ENV = "BENCH_CLIENT_SECRET"


class TokenEndpoint:
    """Issues opaque bearer tokens and remembers when each client asked."""

    def __init__(self, secret: str, lifetime: int) -> None:
        self._secret = secret
        self._lifetime = lifetime
        self.fetches: defaultdict[str, list[float]] = defaultdict(list)

    def app(self) -> web.Application:
        app = web.Application()
        app.add_routes([web.post("/oauth/token", self.token), web.get("/counts", self.counts)])
        return app

    async def token(self, request: web.Request) -> web.Response:
        form = await request.post()
        client_id = self._client_id(request.headers.get("Authorization", ""))
        if client_id is None:
            return web.json_response({"error": "invalid_client"}, status=401)
        if form.get("grant_type") != "client_credentials":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        self.fetches[client_id].append(time.time())
        return web.json_response(
            {
                "access_token": secrets.token_urlsafe(24),
                "token_type": "DPoP" if "DPoP" in request.headers else "Bearer",
                "expires_in": self._lifetime,
            },
            headers={"Cache-Control": "no-store"},
        )

    async def counts(self, request: web.Request) -> web.Response:
        return web.json_response(dict(self.fetches))

    def _client_id(self, header: str) -> str | None:
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            client_id, _, secret = base64.b64decode(encoded).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        if not secrets.compare_digest(unquote_plus(secret), self._secret):
            return None
        return unquote_plus(client_id)


def main() -> None:
    port, lifetime = int(sys.argv[1]), int(sys.argv[2])
    endpoint = TokenEndpoint(os.environ[SECRET_ENV], lifetime)
    web.run_app(endpoint.app(), host="127.0.0.1", port=port, access_log=None, print=None)


if __name__ == "__main__":
    main()
