"""proxy.ops.logs: one line per event in both formats, fields rendered, secrets masked."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import aiohttp
import jwt
import pytest
from aiohttp import web

from proxy.config import LogFormat
from proxy.ops import logs
from proxy.ops.logs import MASK, configure_logging, forget_secret, log_access, register_secret

LOG = logging.getLogger("token_proxy.test")
# The token code's loggers: their lines carry what token endpoints answer.
TOKENS_LOG = logging.getLogger("token_proxy.tokens.client")

TOKEN = "tok-4f9Qx7LmZ2"
CLIENT_SECRET = "s3cr3t-Vb81Kq"
JWT_TOKEN = jwt.encode({"sub": "order-service", "scope": "read"}, "k" * 32, algorithm="HS256")


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """configure_logging changes process-wide state; put it back after each test."""
    root = logging.getLogger()
    names = ("token_proxy", "aiohttp.access")
    saved_handlers = list(root.handlers)
    saved_levels = {name: logging.getLogger(name).level for name in (*names, "")}
    saved_secrets = dict(logs._registered)
    yield
    for handler in list(root.handlers):
        if handler not in saved_handlers:
            root.removeHandler(handler)
    for name, level in saved_levels.items():
        logging.getLogger(name or None).setLevel(level)
    for secret in list(logs._registered):
        for _ in range(logs._registered.get(secret, 0) - saved_secrets.get(secret, 0)):
            forget_secret(secret)


def configured(fmt: LogFormat, level: str = "debug") -> io.StringIO:
    out = io.StringIO()
    configure_logging(level, fmt, stream=out)
    return out


def lines(out: io.StringIO) -> list[str]:
    text = out.getvalue()
    assert text.endswith("\n") or text == ""
    return text.splitlines()


def json_lines(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in lines(out)]


def test_json_line_has_the_fixed_keys_and_every_extra_field() -> None:
    out = configured("json")
    LOG.info(
        "token fetched for %s",
        "inventory",
        extra={
            "event": "token_fetch",
            "upstream": "inventory",
            "outcome": "success",
            "duration_ms": 12.3,
            "expires_in": 3600,
            "scopes": ["a", "b"],
            "cached": False,
            "last_error": None,
        },
    )
    [line] = json_lines(out)
    assert line["level"] == "info"
    assert line["logger"] == "token_proxy.test"
    assert line["msg"] == "token fetched for inventory"
    assert line["event"] == "token_fetch"
    assert line["upstream"] == "inventory"
    assert line["duration_ms"] == 12.3
    assert line["expires_in"] == 3600
    assert line["scopes"] == ["a", "b"]
    assert line["cached"] is False
    assert line["last_error"] is None
    ts = line["ts"]
    assert isinstance(ts, str)
    # RFC 3339 UTC with milliseconds: 2024-05-01T12:00:00.123Z
    assert len(ts) == 24
    assert ts[10] == "T"
    assert ts[19] == "."
    assert ts.endswith("Z")


def test_a_field_named_like_a_line_key_does_not_replace_it() -> None:
    out = configured("json")
    LOG.warning("shadowing", extra={"ts": "not a time", "level": "fake", "logger": "other"})
    [line] = json_lines(out)
    assert line["level"] == "warning"
    assert line["logger"] == "token_proxy.test"
    assert line["ts_"] == "not a time"
    assert line["level_"] == "fake"
    assert line["logger_"] == "other"


def test_text_line_is_ts_level_logger_message_then_fields() -> None:
    out = configured("text")
    LOG.info(
        "token fetched",
        extra={"upstream": "inventory", "note": 'two words "quoted"', "empty": "", "n": 3},
    )
    [line] = lines(out)
    ts, level, logger, rest = line.split(" ", 3)
    assert ts.endswith("Z")
    assert level == "INFO"
    assert logger == "token_proxy.test"
    assert rest == 'token fetched upstream=inventory note="two words \\"quoted\\"" empty="" n=3'


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_multi_line_message_and_traceback_stay_on_one_line(fmt: LogFormat) -> None:
    out = configured(fmt)
    try:
        try:
            raise KeyError("inner")
        except KeyError as inner:
            raise RuntimeError("outer\nsecond line") from inner
    except RuntimeError:
        LOG.exception("request failed\non two lines", extra={"upstream": "inventory"})
    LOG.info("next event")
    first, second = lines(out)
    assert "next event" in second
    for expected in ("Traceback", "KeyError: 'inner'", "RuntimeError: outer", "second line"):
        assert expected in first
    if fmt == "json":
        event = json.loads(first)
        assert event["msg"] == "request failed\non two lines"
        exc = event["exc"]
        assert isinstance(exc, str)
        assert exc.startswith("Traceback")
        assert "\n" in exc
    else:
        assert "request failed\\non two lines" in first
        assert ' exc="Traceback (most recent call last):\\n' in first


# Each form a credential takes in text that could reach a log line, with the
# credential that must not survive.
SECRET_FORMS = [
    pytest.param(f"Authorization: Bearer {TOKEN}", TOKEN, id="bearer"),
    pytest.param(f"authorization: bearer {JWT_TOKEN}", JWT_TOKEN, id="bearer-lowercase-jwt"),
    pytest.param(
        "Authorization: Basic b3JkZXI6czNjcjN0LVZiODFLcQ==", "b3JkZXI6czNjcjN0", id="basic"
    ),
    pytest.param(f'{{"access_token": "{TOKEN}", "expires_in": 3600}}', TOKEN, id="json"),
    pytest.param(f'{{"access_token":"{TOKEN}"}}', TOKEN, id="json-compact"),
    pytest.param(f"{{'client_secret': '{CLIENT_SECRET}'}}", CLIENT_SECRET, id="python-repr"),
    pytest.param(f'{{\\"id_token\\": \\"{TOKEN}\\"}}', TOKEN, id="json-escaped-in-json"),
    pytest.param(f'{{"refresh_token": "{TOKEN}\\"x"}}', TOKEN, id="json-with-escaped-quote"),
    pytest.param(
        f"grant_type=client_credentials&client_secret={CLIENT_SECRET}&scope=read",
        CLIENT_SECRET,
        id="form",
    ),
    pytest.param(
        "client_assertion_type=urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer"
        f"&client_assertion={JWT_TOKEN}",
        JWT_TOKEN,
        id="client-assertion",
    ),
    pytest.param(f"grant_type=jwt-bearer&assertion={TOKEN}", TOKEN, id="assertion"),
    pytest.param(f'password="{CLIENT_SECRET} with spaces"', CLIENT_SECRET, id="quoted-kv"),
    pytest.param(f"PASSWORD={CLIENT_SECRET}", CLIENT_SECRET, id="uppercase-key"),
    pytest.param(f"token was {JWT_TOKEN} today", JWT_TOKEN, id="bare-jwt"),
]


@pytest.mark.parametrize("fmt", ["json", "text"])
@pytest.mark.parametrize(("text", "secret"), SECRET_FORMS)
def test_secret_forms_are_masked_in_message_field_and_traceback(
    fmt: LogFormat, text: str, secret: str
) -> None:
    out = configured(fmt)
    LOG.info("got %s", text)
    LOG.info("a field", extra={"response": text})
    try:
        raise ValueError(f"bad response: {text}")
    except ValueError:
        LOG.exception("fetch failed")
    written = lines(out)
    assert len(written) == 3
    for line in written:
        assert secret not in line
        assert MASK in line
        if fmt == "json":
            json.loads(line)  # masking must keep the line valid JSON


def test_secret_named_fields_are_masked_whatever_their_value() -> None:
    out = configured("json")
    LOG.info(
        "token response",
        extra={
            "client_secret": CLIENT_SECRET,
            "body": {"access_token": TOKEN, "token_type": "Bearer", "nested": [{"password": 42}]},
        },
    )
    [line] = json_lines(out)
    assert line["client_secret"] == MASK
    assert line["body"] == {
        "access_token": MASK,
        "token_type": "Bearer",
        "nested": [{"password": MASK}],
    }


def test_innocent_text_is_left_alone() -> None:
    out = configured("text")
    innocent = (
        "auth_method=client_secret_basic client_assertion_type=urn:x "
        "upstreams.inventory.token.client_secret: missing; AssertionError in test; "
        'WWW-Authenticate: Bearer error="invalid_token", Basic realm="token-server"; '
        '{"password": null}'
    )
    LOG.info(innocent)
    [line] = lines(out)
    assert line.endswith(innocent)


def test_registered_secrets_are_masked_until_forgotten() -> None:
    out = configured("text")
    opaque = "Zq7-opaque-value"  # matches no pattern: only registration can mask it
    register_secret(opaque)
    register_secret(opaque)  # e.g. two upstreams with the same client secret
    TOKENS_LOG.info("one: %s", opaque, extra={"value": f"x{opaque}x"})
    forget_secret(opaque)
    TOKENS_LOG.info("two: %s", opaque)
    forget_secret(opaque)
    TOKENS_LOG.info("three: %s", opaque)
    one, two, three = lines(out)
    assert opaque not in one
    assert "one: ***" in one
    assert "value=x***x" in one
    assert opaque not in two
    assert three.endswith(f"three: {opaque}")


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_registered_secrets_are_masked_only_where_token_endpoints_answer(fmt: LogFormat) -> None:
    """Masking a short secret everywhere would confirm a guess of it to a log reader."""
    out = configured(fmt)
    register_secret("proxy")
    logging.getLogger("token_proxy.app").info(
        "token-proxy started", extra={"listen": "127.0.0.1:15080", "note": "proxy port"}
    )
    try:
        raise RuntimeError("the proxy stopped")
    except RuntimeError:
        logging.getLogger("token_proxy.forward").warning("proxy error", exc_info=True)
    TOKENS_LOG.warning(
        "token endpoint answered HTTP 400: bad secret proxy", extra={"error": "echoed proxy"}
    )
    started, failed, endpoint = lines(out)
    assert "token-proxy started" in started
    assert "proxy port" in started
    assert MASK not in started
    assert "the proxy stopped" in failed
    assert MASK not in failed
    assert "proxy" not in endpoint.replace("token_proxy.tokens", "")
    assert endpoint.count(MASK) == 2


def test_registered_secrets_are_bounded() -> None:
    for i in range(logs.MAX_REGISTERED_SECRETS + 10):
        register_secret(f"bounded-secret-{i}")
    assert len(logs._registered) <= logs.MAX_REGISTERED_SECRETS
    assert logs.redact(f"bounded-secret-{logs.MAX_REGISTERED_SECRETS + 9}") == MASK


def test_log_access_writes_one_line_without_the_query_string() -> None:
    out = configured("json", level="info")
    log_access(
        upstream="inventory",
        method="GET",
        host="inventory.internal",
        path=f"/api/stock/1?api_key={CLIENT_SECRET}&page=2#frag",
        status=200,
        duration_s=0.0123,
        bytes_out=512,
        client="127.0.0.1:50123",
    )
    log_access(
        upstream=None,
        method="GET",
        host="example.com",
        path=f"http://user:{CLIENT_SECRET}@example.com/x?y=1",
        status=502,
        duration_s=1.5,
        bytes_out=0,
        client="127.0.0.1:50124",
    )
    first, second = json_lines(out)
    assert first["logger"] == "token_proxy.access"
    assert {k: first[k] for k in first if k not in ("ts", "level", "logger", "msg")} == {
        "event": "access",
        "upstream": "inventory",
        "method": "GET",
        "host": "inventory.internal",
        "path": "/api/stock/1",
        "status": 200,
        "duration_ms": 12.3,
        "bytes_out": 512,
        "client": "127.0.0.1:50123",
    }
    assert second["path"] == "http://example.com/x"
    assert second["upstream"] is None
    assert CLIENT_SECRET not in out.getvalue()


def test_configure_logging_twice_keeps_one_handler_and_applies_the_last_call() -> None:
    first = configured("text")
    second = configured("json", level="warning")
    configure_logging("warning", "json", stream=second)
    ours = [h for h in logging.getLogger().handlers if isinstance(h, logs._ProxyLogHandler)]
    assert len(ours) == 1
    LOG.info("below the level")
    LOG.warning("at the level")
    assert first.getvalue() == ""
    [line] = json_lines(second)
    assert line["msg"] == "at the level"


def test_bad_level_or_format_is_refused() -> None:
    with pytest.raises(ValueError, match="log level"):
        configure_logging("verbose", "text")
    with pytest.raises(ValueError, match="log format"):
        configure_logging("info", "xml")  # type: ignore[arg-type]


async def test_aiohttp_errors_use_the_formatter_and_its_access_log_is_off() -> None:
    out = configured("json", level="info")

    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError(f"handler broke, Authorization: Bearer {TOKEN}")

    async def fine(request: web.Request) -> web.Response:
        return web.Response(text="fine")

    app = web.Application()
    app.router.add_get("/broken", broken)
    app.router.add_get("/fine", fine)
    runner = web.AppRunner(app)  # aiohttp's default: access log on aiohttp.access
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/broken") as response:
                assert response.status == 500
            async with session.get(f"http://127.0.0.1:{port}/fine") as response:
                assert response.status == 200
    finally:
        await runner.cleanup()
    events = json_lines(out)
    assert [e["logger"] for e in events] == ["aiohttp.server"]
    exc = events[0]["exc"]
    assert isinstance(exc, str)
    assert "RuntimeError: handler broke" in exc
    assert TOKEN not in out.getvalue()
