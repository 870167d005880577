"""A real OAuth 2.0 token endpoint on 127.0.0.1 for the tests.

It knows three grants: client credentials (RFC 6749 §4.4), token exchange (RFC 8693)
and JWT bearer (RFC 7523 §2.1). It authenticates clients and checks every grant
parameter as strictly as the RFCs say, so a test passing against it means the client
is right, not that the fake is lenient:

* ``client_secret_basic`` (RFC 6749 §2.3.1): the Basic credentials are base64-decoded,
  then client id and secret are each form-urldecoded;
* ``client_secret_post``: ``client_id`` and ``client_secret`` in the body;
* ``private_key_jwt`` (RFC 7523 §3): the assertion's signature is checked with the
  client's key in ``jwt_keys``, ``iss == sub == client_id``, ``aud`` is the token URL,
  ``exp`` in the future, and a ``jti`` is accepted once only;
* ``tls_client_auth`` (RFC 8705 §2): the TLS client certificate names the client;
* more than one method in a request is refused (RFC 6749 §2.3), as is a repeated
  parameter other than ``resource`` (RFC 6749 §3.2, RFC 8707) and, in a token
  exchange, ``audience`` (RFC 8693 §2.1); so is a parameter of another grant;
* token exchange (RFC 8693 §2.1, §2.2): ``subject_token`` must be one the server knows
  (`subject_tokens`, token -> type) with its ``subject_token_type``; ``actor_token``
  and ``actor_token_type`` come together or not at all and must match `actor_tokens`;
  ``requested_token_type`` must be one it issues (access token or JWT); an ``audience``
  or ``resource`` outside `audiences` is ``invalid_target``. The answer carries
  ``issued_token_type``. Unauthenticated clients are served only with
  `allow_unauthenticated`, and only for token exchange and JWT bearer;
* JWT bearer (RFC 7523 §2.1, §3): one ``assertion``, a JWT signed with the key of its
  ``iss`` in ``jwt_keys``, with ``sub``, ``exp`` (in the future, at most an hour away),
  ``aud`` naming the token URL (or `assertion_audience`), ``nbf`` respected and a
  ``jti`` accepted once; anything else is ``invalid_grant``.

Tests make it misbehave with `fail_next()` / `set_failing()`, hold answers back with
`hold`, and synchronise on `wait_for_requests()` instead of sleeping. It also serves
OpenID Connect and RFC 8414 discovery documents for its `issuer`.

Given a `DpopAuthority` (`dpop`), it checks the DPoP proofs of token requests and issues
DPoP-bound tokens (RFC 9449 §5, §8); see tests/support/dpop_servers.py.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import math
import secrets
import ssl
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import parse_qs, unquote_plus

import jwt
from aiohttp import web

from tests.support.dpop_servers import DpopRefusal, add_dpop_response_headers

if TYPE_CHECKING:
    from tests.support.dpop_servers import DpopAuthority

__all__ = [
    "ACCESS_TOKEN_TYPE",
    "FAILURES",
    "JWT_BEARER",
    "JWT_BEARER_GRANT",
    "JWT_TOKEN_TYPE",
    "OMIT",
    "TOKEN_EXCHANGE_GRANT",
    "Failure",
    "ReceivedTokenRequest",
    "TokenServer",
]

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
TOKEN_EXCHANGE_GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"
# The parameters that belong to one grant only (RFC 8693 §2.1, RFC 7523 §2.1).
_GRANT_PARAMS = {
    "client_credentials": frozenset(),
    TOKEN_EXCHANGE_GRANT: frozenset(
        {
            "subject_token",
            "subject_token_type",
            "actor_token",
            "actor_token_type",
            "requested_token_type",
        }
    ),
    JWT_BEARER_GRANT: frozenset({"assertion"}),
}
ASSERTION_ALGORITHMS = ["RS256", "RS384", "RS512", "ES256", "ES384", "ES512"]


class _Omit:
    def __repr__(self) -> str:
        return "OMIT"


OMIT: Any = _Omit()
"""In `TokenServer.response_overrides`: leave this field out of the token response."""


@dataclass
class ReceivedTokenRequest:
    """One request the token endpoint received, whatever became of it."""

    form: dict[str, list[str]]
    auth_method: str  # client_secret_basic, client_secret_post, private_key_jwt,
    # tls_client_auth, none, or "multiple"
    client_id: str
    headers: dict[str, str]
    outcome: str = "pending"  # "issued", "error:<code>" or "failure:<name>"
    body: bytes = b""  # exactly as received
    received_at: float = field(default_factory=time.monotonic)  # its body read

    def param(self, name: str) -> str | None:
        """The single value of form parameter `name`, or None."""
        values = self.form.get(name)
        return values[0] if values else None


@dataclass(frozen=True)
class Failure:
    """How the server misbehaves for one request."""

    name: str = "custom"
    status: int = 500
    body: bytes | str | Mapping[str, Any] | list[Any] | None = None  # mapping/list: JSON
    headers: Mapping[str, str] = field(default_factory=dict)
    action: Literal["respond", "hang", "drop"] = "respond"
    delay: float = 0.0  # seconds before answering (a slow server)


def _json_error(code: str, description: str | None = None) -> dict[str, str]:
    body = {"error": code}
    if description:
        body["error_description"] = description
    return body


FAILURES: dict[str, Failure] = {
    failure.name: failure
    for failure in (
        Failure("500", 500, _json_error("server_error")),
        Failure("502", 502, "<html>Bad Gateway</html>", {"Content-Type": "text/html"}),
        Failure("504", 504, "Gateway Timeout", {"Content-Type": "text/plain"}),
        Failure("503", 503, _json_error("temporarily_unavailable"), {"Retry-After": "1"}),
        Failure("429", 429, _json_error("slow_down"), {"Retry-After": "1"}),
        Failure("403", 403, "Forbidden", {"Content-Type": "text/plain"}),
        Failure("404", 404, "Not Found", {"Content-Type": "text/plain"}),
        Failure(
            "invalid_client",
            401,
            _json_error("invalid_client", "Client authentication failed"),
            {"WWW-Authenticate": 'Basic realm="token-server"'},
        ),
        Failure("invalid_scope", 400, _json_error("invalid_scope", "scope not allowed")),
        Failure("unauthorized_client", 400, _json_error("unauthorized_client")),
        Failure("invalid_grant", 400, _json_error("invalid_grant")),
        Failure("hang", action="hang"),
        Failure("drop", action="drop"),
        Failure(
            "bad_json", 200, b'{"access_token": "tok-broken', {"Content-Type": "application/json"}
        ),
        Failure("not_object", 200, ["tok-in-a-list"]),
        Failure("no_token", 200, {"token_type": "Bearer", "expires_in": 3600}),
        Failure("empty_token", 200, {"access_token": "", "token_type": "Bearer"}),
        Failure("bad_type", 200, {"access_token": "tok-mac-1", "token_type": "mac"}),
        Failure("bad_chars", 200, {"access_token": "tok with\nnewline", "token_type": "Bearer"}),
        Failure("non_ascii_token", 200, {"access_token": "tok-é", "token_type": "Bearer"}),
        Failure("html", 200, "<html><body>Login</body></html>", {"Content-Type": "text/html"}),
        Failure("redirect", 302, b"", {"Location": "http://127.0.0.1:9/elsewhere"}),
        Failure(
            "huge",
            200,
            b'{"access_token": "tok-huge", "token_type": "Bearer", "pad": "'
            + b"x" * (2 << 20)
            + b'"}',
            {"Content-Type": "application/json"},
        ),
    )
}
"""The named failures that `fail_next()` and `set_failing()` accept."""


class TokenServer:
    """A real OAuth 2.0 token endpoint on 127.0.0.1: checks client auth exactly as RFC 6749 says."""

    def __init__(
        self,
        *,
        clients: Mapping[str, str] | None = None,
        expires_in: float | None = 3600,
        jwt_keys: Mapping[str, Any] | None = None,
        tls_clients: Mapping[str, str] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        host: str = "127.0.0.1",
        issuer_path: str = "",
        token_path: str = "/oauth/token",
        token_format: Literal["opaque", "jwt"] = "opaque",
        jwt_lifetime: float | None = None,
        jwt_iat: bool = True,
        allowed_scopes: Iterable[str] | None = None,
        subject_tokens: Mapping[str, str] | None = None,
        actor_tokens: Mapping[str, str] | None = None,
        audiences: Iterable[str] | None = None,
        assertion_audience: str | None = None,
        allow_unauthenticated: bool = False,
        dpop: DpopAuthority | None = None,
    ) -> None:
        """`clients`: client_id -> secret; `jwt_keys`: client_id -> public key (object or
        PEM) for private_key_jwt; `tls_clients`: client_id -> a name its TLS client
        certificate carries (subject CN or subjectAltName). `token_format="jwt"` issues
        HS256 JWTs whose `exp` is `jwt_lifetime` (default: `expires_in`) from now, with an
        `iat` claim unless `jwt_iat` is false. JWT claims use this process's real wall
        clock (`time.time`), whatever clock the proxy is given.

        Token exchange: `subject_tokens` and `actor_tokens` map the tokens it accepts to
        their type URIs (settable, to rotate them); `audiences` limits `audience` and
        `resource`. JWT bearer: `assertion_audience` is the `aud` an assertion must name
        (default: the token URL). `allow_unauthenticated` serves those two grants to a
        client that does not authenticate.

        `dpop`: check DPoP proofs and bind tokens to their keys (settable); the
        authority's `token_valid` becomes this server's `is_valid` unless already set."""
        self.clients: dict[str, str] = (
            dict(clients) if clients is not None else {"order-service": "s3cret"}
        )
        self.jwt_keys: dict[str, Any] = dict(jwt_keys or {})
        self.tls_clients: dict[str, str] = dict(tls_clients or {})
        self.expires_in: Any = expires_in  # settable; also a string or anything, to test clients
        self.token_format = token_format
        self.jwt_lifetime = jwt_lifetime
        self.jwt_iat = jwt_iat
        self.allowed_scopes = set(allowed_scopes) if allowed_scopes is not None else None
        self.subject_tokens: dict[str, str] = dict(subject_tokens or {})
        self.actor_tokens: dict[str, str] = dict(actor_tokens or {})
        self.audiences = set(audiences) if audiences is not None else None
        self.assertion_audience = assertion_audience
        self.allow_unauthenticated = allow_unauthenticated
        # Fields merged into every token response; a value of OMIT removes the field.
        self.response_overrides: dict[str, Any] = {}
        # Discovery: which documents exist, and what to change in them.
        self.discovery: set[str] = {"oidc", "oauth"}
        self.metadata_overrides: dict[str, Any] = {}
        self.discovery_failure: Failure | str | None = None
        self.hold: asyncio.Event | None = None
        self.dpop = dpop
        if dpop is not None and dpop.token_valid is None:
            dpop.token_valid = self.is_valid

        self.requests: list[ReceivedTokenRequest] = []
        self.discovery_requests: list[str] = []
        self.issued: list[str] = []
        self.fetch_count = 0

        self._ssl_context = ssl_context
        self._host = host
        self._issuer_path = issuer_path.rstrip("/")
        self._token_path = token_path
        self._queue: list[Failure] = []
        self._failing: Failure | None = None
        self._expiry: dict[str, float] = {}  # token -> monotonic expiry
        self._revoked: set[str] = set()
        self._seen_jti: set[str] = set()
        self._jwt_signing_key = secrets.token_bytes(32)
        self._changed = asyncio.Condition()
        self._closing = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._port = 0

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        app.on_response_prepare.append(add_dpop_response_headers)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, 0, ssl_context=self._ssl_context)
        await site.start()
        self._port = self._runner.addresses[0][1]

    async def close(self) -> None:
        self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> TokenServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- addresses ---------------------------------------------------------------

    @property
    def origin(self) -> str:
        scheme = "https" if self._ssl_context is not None else "http"
        return f"{scheme}://{self._host}:{self._port}"

    @property
    def url(self) -> str:
        """The token endpoint."""
        return self.origin + self._token_path

    @property
    def issuer(self) -> str:
        """The issuer identifier; its metadata is served at the well-known URLs."""
        return self.origin + self._issuer_path

    @property
    def port(self) -> int:
        return self._port

    # -- behaviour control -------------------------------------------------------

    def fail_next(self, *failures: str | Failure) -> None:
        """Answer the next token requests with these failures, in order."""
        self._queue.extend(_failure(f) for f in failures)

    def set_failing(self, failure: str | Failure | None) -> None:
        """Answer every token request with `failure` until called with None."""
        self._failing = _failure(failure) if failure is not None else None

    def is_valid(self, token: str) -> bool:
        """Issued here, not revoked and not expired (server-side, monotonic clock)."""
        expiry = self._expiry.get(token)
        return expiry is not None and token not in self._revoked and time.monotonic() < expiry

    def expiry(self, token: str) -> float:
        """When `token`, issued here, expires (server-side, monotonic clock)."""
        return self._expiry[token]

    def revoke(self, token: str) -> None:
        self._revoked.add(token)

    # `timeout` is this helper's documented API; it wraps asyncio.timeout itself.
    async def wait_for_requests(self, n: int, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Until at least `n` token requests have arrived (failed ones included)."""
        await self._wait_until(lambda: len(self.requests) >= n, timeout)

    async def wait_for_issued(self, n: int, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Until at least `n` tokens have been issued."""
        await self._wait_until(lambda: self.fetch_count >= n, timeout)

    async def wait_for(
        self,
        predicate: Callable[[ReceivedTokenRequest], bool],
        after: int = 0,
        timeout: float = 10.0,  # noqa: ASYNC109
    ) -> None:
        """Until a request from index `after` on matches `predicate` (failed ones included)."""
        await self._wait_until(
            lambda: any(predicate(received) for received in self.requests[after:]), timeout
        )

    async def _wait_until(self, predicate: Any, seconds: float) -> None:
        async with asyncio.timeout(seconds), self._changed:
            await self._changed.wait_for(predicate)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # -- HTTP ----------------------------------------------------------------------

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        if request.path == self._token_path:
            if request.method != "POST":
                return _json(405, _json_error("invalid_request", "use POST"))
            return await self._token(request)
        if request.method == "GET":
            oidc = f"{self._issuer_path}/.well-known/openid-configuration"
            oauth = f"/.well-known/oauth-authorization-server{self._issuer_path}"
            if (request.path == oidc and "oidc" in self.discovery) or (
                request.path == oauth and "oauth" in self.discovery
            ):
                return await self._metadata(request)
        return web.Response(status=404, text="Not Found")

    async def _metadata(self, request: web.Request) -> web.StreamResponse:
        self.discovery_requests.append(request.path)
        if self.discovery_failure is not None:
            response = await self._misbehave(request, _failure(self.discovery_failure))
            return response
        document: dict[str, Any] = {
            "issuer": self.issuer,
            "token_endpoint": self.url,
            "grant_types_supported": ["client_credentials", TOKEN_EXCHANGE_GRANT, JWT_BEARER_GRANT],
            "token_endpoint_auth_methods_supported": [
                "client_secret_basic",
                "client_secret_post",
                "private_key_jwt",
                "tls_client_auth",
                *(["none"] if self.allow_unauthenticated else []),
            ],
            "token_endpoint_auth_signing_alg_values_supported": ASSERTION_ALGORITHMS,
        }
        if self.dpop is not None:
            document.update(self.dpop.metadata())
        _apply_overrides(document, self.metadata_overrides)
        return _json(200, document)

    async def _token(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        try:
            form = parse_qs(body.decode("ascii"), keep_blank_values=True, strict_parsing=True)
        except (UnicodeDecodeError, ValueError):
            form = {}
        received = ReceivedTokenRequest(
            form=form,
            auth_method="none",
            client_id="",
            headers=dict(request.headers),
            body=body,
        )
        auth_error = self._authenticate(request, form, received)
        self.requests.append(received)
        await self._notify()

        if self.hold is not None:
            await self._until(self.hold)
        failure = self._queue.pop(0) if self._queue else self._failing
        if failure is not None:
            received.outcome = f"failure:{failure.name}"
            return await self._misbehave(request, failure)

        problem = self._check_request(request, body, form)
        if problem is None and received.auth_method == "multiple":
            # RFC 6749 §5.2 lists this case under invalid_request.
            problem = _json_error("invalid_request", auth_error)
        if problem is not None:
            received.outcome = f"error:{problem['error']}"
            return _json(400, problem)
        dpop_jkt: str | None = None
        if self.dpop is not None:
            checked = self.dpop.check_token_request(request, self.url)
            if isinstance(checked, DpopRefusal):
                received.outcome = f"error:{checked.error}"
                return checked.response()
            if checked is not None and self.dpop.token_type == "DPoP":
                dpop_jkt = checked.jkt
        grant_type = received.param("grant_type")
        unauthenticated_ok = (
            self.allow_unauthenticated
            and received.auth_method == "none"
            and grant_type in (TOKEN_EXCHANGE_GRANT, JWT_BEARER_GRANT)
        )
        if auth_error is not None and not unauthenticated_ok:
            received.outcome = "error:invalid_client"
            headers = {}
            if received.auth_method in ("client_secret_basic", "none"):
                headers["WWW-Authenticate"] = 'Basic realm="token-server"'
            return _json(401, _json_error("invalid_client", auth_error), headers)
        if grant_type not in _GRANT_PARAMS:
            received.outcome = "error:unsupported_grant_type"
            return _json(400, _json_error("unsupported_grant_type"))
        foreign = sorted(
            name
            for other, names in _GRANT_PARAMS.items()
            if other != grant_type
            for name in names
            if name in form
        )
        if foreign:
            received.outcome = "error:invalid_request"
            return _json(
                400,
                _json_error("invalid_request", f"{foreign[0]} is not a parameter of this grant"),
            )
        subject = received.client_id
        issued_token_type: str | None = None
        if grant_type == TOKEN_EXCHANGE_GRANT:
            outcome = self._check_exchange(form)
            if isinstance(outcome, dict):
                received.outcome = f"error:{outcome['error']}"
                return _json(400, outcome)
            issued_token_type = outcome
            # Never the subject token itself: issued JWTs are read in tests and logs.
            subject = f"exchanged-for:{received.client_id or 'anonymous'}"
        elif grant_type == JWT_BEARER_GRANT:
            outcome = self._check_grant_assertion(form)
            if isinstance(outcome, dict):
                received.outcome = f"error:{outcome['error']}"
                return _json(400, outcome)
            subject = outcome
        scope = received.param("scope")
        if (
            scope is not None
            and self.allowed_scopes is not None
            and not set(scope.split(" ")) <= self.allowed_scopes
        ):
            received.outcome = "error:invalid_scope"
            return _json(400, _json_error("invalid_scope"))

        token = self._issue(subject, dpop_jkt)
        received.outcome = "issued"
        document: dict[str, Any] = {"access_token": token, "token_type": "Bearer"}
        if dpop_jkt is not None:
            assert self.dpop is not None
            self.dpop.bind(token, dpop_jkt)
            document["token_type"] = "DPoP"
        if issued_token_type is not None:
            # RFC 8693 §2.2.1: REQUIRED in a token exchange answer.
            document["issued_token_type"] = issued_token_type
        if self.expires_in is not None:
            document["expires_in"] = self.expires_in
        if scope is not None:
            document["scope"] = scope
        _apply_overrides(document, self.response_overrides)
        response = _json(200, document, {"Cache-Control": "no-store", "Pragma": "no-cache"})
        await self._notify()
        return response

    def _check_request(
        self, request: web.Request, body: bytes, form: dict[str, list[str]]
    ) -> dict[str, str] | None:
        """RFC 6749 §3.2 / §4.4.2 shape of the request; an error body if it is wrong."""
        content_type = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type != "application/x-www-form-urlencoded":
            return _json_error("invalid_request", "body must be application/x-www-form-urlencoded")
        if body and not form:
            return _json_error("invalid_request", "body is not a form")
        repeatable = {"resource"}
        if form.get("grant_type") == [TOKEN_EXCHANGE_GRANT]:
            repeatable.add("audience")  # RFC 8693 §2.1: several audiences may be named
        repeated = [
            name for name, values in form.items() if len(values) > 1 and name not in repeatable
        ]
        if repeated:
            return _json_error("invalid_request", f"repeated parameter {repeated[0]}")
        return None

    def _authenticate(
        self, request: web.Request, form: dict[str, list[str]], received: ReceivedTokenRequest
    ) -> str | None:
        """Fill in how the client authenticated; a description of the problem, or None."""
        authorization = request.headers.get("Authorization")
        body_client_id = (form.get("client_id") or [""])[0]
        methods = []
        if authorization is not None:
            methods.append("client_secret_basic")
        if "client_secret" in form:
            methods.append("client_secret_post")
        if "client_assertion" in form or "client_assertion_type" in form:
            methods.append("private_key_jwt")
        if len(methods) > 1:
            received.auth_method = "multiple"
            return "more than one client authentication method (RFC 6749 §2.3)"
        if not methods:
            peercert = request.transport.get_extra_info("peercert") if request.transport else None
            received.client_id = body_client_id
            if peercert:
                received.auth_method = "tls_client_auth"
                return self._check_tls_client(body_client_id, peercert)
            return "no client authentication"
        method = received.auth_method = methods[0]
        if method == "client_secret_basic":
            assert authorization is not None
            return self._check_basic(authorization, body_client_id, received)
        if method == "client_secret_post":
            received.client_id = body_client_id
            secret = form["client_secret"][0]
            if body_client_id not in self.clients or self.clients[body_client_id] != secret:
                return "unknown client or wrong secret"
            return None
        return self._check_assertion(form, body_client_id, received)

    def _check_basic(
        self, authorization: str, body_client_id: str, received: ReceivedTokenRequest
    ) -> str | None:
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() != "basic":
            return "Authorization scheme is not Basic"
        try:
            decoded = base64.b64decode(credentials.strip(), validate=True).decode("ascii")
        except (binascii.Error, UnicodeDecodeError):
            return "Basic credentials are not base64 of ASCII (RFC 6749 §2.3.1 form-urlencodes)"
        if ":" not in decoded:
            return "Basic credentials lack ':'"
        raw_id, _, raw_secret = decoded.partition(":")
        client_id, secret = unquote_plus(raw_id), unquote_plus(raw_secret)
        received.client_id = client_id
        if body_client_id and body_client_id != client_id:
            return "client_id in the body differs from the Basic credentials"
        if client_id not in self.clients or self.clients[client_id] != secret:
            return "unknown client or wrong secret"
        return None

    def _check_assertion(
        self, form: dict[str, list[str]], body_client_id: str, received: ReceivedTokenRequest
    ) -> str | None:
        if (form.get("client_assertion_type") or [""])[0] != JWT_BEARER:
            return "client_assertion_type is not jwt-bearer"
        assertion = (form.get("client_assertion") or [""])[0]
        try:
            unverified = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.PyJWTError:
            return "client_assertion is not a JWT"
        issuer = unverified.get("iss")
        received.client_id = issuer if isinstance(issuer, str) else ""
        key = self.jwt_keys.get(received.client_id)
        if key is None:
            return "no key registered for the assertion's issuer"
        try:
            claims = jwt.decode(
                assertion,
                key,
                algorithms=ASSERTION_ALGORITHMS,
                audience=self.url,
                options={"require": ["iss", "sub", "aud", "exp", "jti"]},
            )
        except jwt.PyJWTError as exc:
            return f"client_assertion rejected: {exc}"
        if claims["sub"] != claims["iss"]:
            return "assertion sub differs from iss"
        if body_client_id and body_client_id != claims["iss"]:
            return "client_id differs from the assertion's iss"
        if claims["exp"] - time.time() > 3600:
            return "assertion lives longer than an hour"
        if claims["jti"] in self._seen_jti:
            return "assertion jti was already used (RFC 7523 §3 item 7)"
        self._seen_jti.add(claims["jti"])
        return None

    def _check_exchange(self, form: dict[str, list[str]]) -> dict[str, str] | str:
        """RFC 8693 §2.1: an error body (§2.2.2), or the type of the token to issue."""

        def one(name: str) -> str | None:
            values = form.get(name)
            return values[0] if values else None

        subject, subject_type = one("subject_token"), one("subject_token_type")
        if not subject:
            return _json_error("invalid_request", "subject_token is missing")
        if not subject_type:
            return _json_error("invalid_request", "subject_token_type is missing")
        if self.subject_tokens.get(subject) != subject_type:
            # §2.2.2: an invalid subject token is invalid_request.
            return _json_error("invalid_request", "subject_token is not valid for its type")
        actor, actor_type = one("actor_token"), one("actor_token_type")
        if (actor is None) != (actor_type is None):
            return _json_error(
                "invalid_request", "actor_token and actor_token_type come together or not at all"
            )
        if actor is not None and self.actor_tokens.get(actor) != actor_type:
            return _json_error("invalid_request", "actor_token is not valid for its type")
        requested = one("requested_token_type")
        if requested is not None and requested not in (ACCESS_TOKEN_TYPE, JWT_TOKEN_TYPE):
            return _json_error("invalid_request", "requested_token_type cannot be issued")
        if self.audiences is not None:
            targets = form.get("audience", []) + form.get("resource", [])
            if any(target not in self.audiences for target in targets):
                return _json_error("invalid_target", "audience or resource not served here")
        if self.token_format == "jwt" and requested is None:
            return JWT_TOKEN_TYPE
        return requested or ACCESS_TOKEN_TYPE

    def _check_grant_assertion(self, form: dict[str, list[str]]) -> dict[str, str] | str:
        """RFC 7523 §2.1 and §3: an error body, or the assertion's subject."""
        assertion = (form.get("assertion") or [""])[0]
        if not assertion:
            return _json_error("invalid_request", "assertion is missing")
        try:
            unverified = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.PyJWTError:
            return _json_error("invalid_grant", "assertion is not a JWT")
        key = self.jwt_keys.get(unverified.get("iss"))  # type: ignore[arg-type]
        if key is None:
            return _json_error("invalid_grant", "no key registered for the assertion's issuer")
        try:
            claims = jwt.decode(
                assertion,
                key,
                algorithms=ASSERTION_ALGORITHMS,
                audience=self.assertion_audience or self.url,
                options={"require": ["iss", "sub", "aud", "exp"]},
            )
        except jwt.PyJWTError as exc:
            return _json_error("invalid_grant", f"assertion rejected: {exc}")
        if claims["exp"] - time.time() > 3600:
            return _json_error("invalid_grant", "assertion lives longer than an hour")
        jti = claims.get("jti")
        if jti is not None:
            if jti in self._seen_jti:
                return _json_error("invalid_grant", "assertion jti was already used")
            self._seen_jti.add(jti)
        return str(claims["sub"])

    def _check_tls_client(self, client_id: str, peercert: Mapping[str, Any]) -> str | None:
        expected = self.tls_clients.get(client_id)
        if expected is None:
            return "client is not registered for tls_client_auth"
        names = {value for rdn in peercert.get("subject", ()) for key, value in rdn}
        names |= {value for _, value in peercert.get("subjectAltName", ())}
        if expected not in names:
            return "TLS client certificate does not name this client"
        return None

    def _issue(self, client_id: str, jkt: str | None = None) -> str:
        self.fetch_count += 1
        lifetime = _float_or(self.expires_in, 3600.0)
        if self.token_format == "jwt":
            jwt_lifetime = self.jwt_lifetime if self.jwt_lifetime is not None else lifetime
            issued_at = int(time.time())
            claims: dict[str, Any] = {
                "sub": client_id,
                "exp": issued_at + math.ceil(jwt_lifetime),
                "jti": f"tok-{self.fetch_count}",
            }
            if self.jwt_iat:
                claims["iat"] = issued_at
            if jkt is not None:
                claims["cnf"] = {"jkt": jkt}  # RFC 9449 §6.1
            token = jwt.encode(claims, self._jwt_signing_key, algorithm="HS256")
            lifetime = min(lifetime, jwt_lifetime)
        else:
            token = f"tok-{self.fetch_count}-{secrets.token_hex(8)}"
        self.issued.append(token)
        self._expiry[token] = time.monotonic() + (lifetime if lifetime > 0 else 3600.0)
        return token

    async def _misbehave(self, request: web.Request, failure: Failure) -> web.StreamResponse:
        if failure.delay:
            try:
                async with asyncio.timeout(failure.delay):
                    await self._closing.wait()
            except TimeoutError:
                pass
        if failure.action == "hang":
            await self._closing.wait()
            return web.Response(status=503)
        if failure.action == "drop":
            if request.transport is not None:
                request.transport.close()
            return web.Response(status=204)
        body = failure.body
        headers = dict(failure.headers)
        if isinstance(body, Mapping | list):
            headers.setdefault("Content-Type", "application/json")
            payload = json.dumps(body).encode()
        elif isinstance(body, str):
            payload = body.encode()
        else:
            payload = body or b""
        return web.Response(status=failure.status, body=payload, headers=headers)

    async def _until(self, event: asyncio.Event) -> None:
        """Wait for `event`, or for the server closing."""
        waiters = {asyncio.ensure_future(event.wait()), asyncio.ensure_future(self._closing.wait())}
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)


def _failure(failure: str | Failure) -> Failure:
    return failure if isinstance(failure, Failure) else FAILURES[failure]


def _apply_overrides(document: dict[str, Any], overrides: Mapping[str, Any]) -> None:
    for key, value in overrides.items():
        if value is OMIT:
            document.pop(key, None)
        else:
            document[key] = value


def _float_or(value: Any, default: float) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _json(
    status: int, body: Mapping[str, Any], headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(body).encode(),
        content_type="application/json",
        headers=dict(headers or {}),
    )
