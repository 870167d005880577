"""The proxy's logging: one line per event, text or JSON, with secrets masked.

Every module logs through a logger named ``token_proxy.<area>`` and passes
structured fields with ``extra=``; `configure_logging()` installs the one handler
that renders them, on Python's root logger so that aiohttp's and asyncio's own
errors come out in the same format.

A line is either JSON::

    {"ts":"2024-05-01T12:00:00.123Z","level":"info","logger":"token_proxy.tokens",
     "msg":"token fetched","upstream":"inventory","duration_ms":12.3}

or text (logfmt-like fields after the message)::

    2024-05-01T12:00:00.123Z INFO token_proxy.tokens token fetched upstream=inventory ms=12.3

Tracebacks are rendered on the same line (``exc``), so one event is one line.

Secrets are kept out by the code that logs; this module is the defence in depth.
Everything that ends up in a line (the formatted message, every field value and
the exception text) is passed through `redact()` after formatting and before it
is escaped for the output format, so masking never breaks JSON escaping. It masks
``Bearer``/``Basic`` credentials, the values of secret-named keys in JSON-like and
form-like text, JWT-looking strings and values of fields whose *name* is secret-like,
in every line: these are recognised by their form, so masking them tells a reader
nothing about a secret's value.

Exact strings registered with `register_secret()` (client secrets) are masked only in
lines of the loggers in `SECRET_BEARING_LOGGERS`: the token code, which reports what
token endpoints answer, the one place such a string can legitimately turn up (an
endpoint echoing the request). Masking an exact string everywhere would confirm a
guess: with the secret ``proxy``, "token-proxy started" would read "token-*** started".
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
import threading
import time
from collections.abc import Mapping
from typing import TextIO
from urllib.parse import urlsplit, urlunsplit

from proxy.config import LogFormat

ROOT_LOGGER_NAME = "token_proxy"
access_logger = logging.getLogger("token_proxy.access")

MASK = "***"

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

# Keys whose values are credentials wherever they appear: the RFC 6749 token
# response (access_token, refresh_token), OIDC (id_token), client authentication
# (client_secret, RFC 7523 client_assertion / assertion) and the generic password.
SECRET_KEYS = frozenset(
    {
        "access_token",
        "refresh_token",
        "id_token",
        "client_secret",
        "client_assertion",
        "assertion",
        "password",
    }
)
_KEYS = "|".join(sorted(SECRET_KEYS, key=len, reverse=True))
# A quote, possibly backslash-escaped (JSON text logged inside another string).
_QUOTE = r"\\*[\"']"

_SECRET_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # RFC 9110 §11: `Bearer <token68>` / `Basic <token68>`; the scheme stays readable.
    # A challenge's auth-params (`WWW-Authenticate: Bearer error="invalid_token"`,
    # RFC 6750 §3) are no credential and stay readable too.
    (
        re.compile(
            r"(?i)(?<![\w-])(bearer|basic)([ \t]+)"
            r"(?!(?:realm|error|error_description|error_uri|scope|charset)=)"
            r"[A-Za-z0-9\-._~+/]+=*"
        ),
        rf"\1\2{MASK}",
    ),
    # JSON-like: "access_token": "value" (or 'value', or a bare value up to , } ]).
    (
        re.compile(
            rf"(?i)(?P<kq>{_QUOTE})(?P<key>{_KEYS})(?P=kq)(?P<sep>\s*:\s*)"
            rf"(?:(?P<q>{_QUOTE})(?:(?!(?<!\\)(?P=q)).)*|(?!(?:null|true|false)\b)[^\s,}}\]\"'\\]+)"
        ),
        rf"\g<kq>\g<key>\g<kq>\g<sep>\g<q>{MASK}",
    ),
    # Form-like: access_token=value (URL query, form body, key=value logs).
    (
        re.compile(
            rf"(?i)(?<![\w-])(?P<key>{_KEYS})=(?!\s)"
            rf"(?:(?P<q>{_QUOTE})(?:(?!(?<!\\)(?P=q)).)*|[^\s&,;\"'\\]+)"
        ),
        rf"\g<key>=\g<q>{MASK}",
    ),
    # JWTs (RFC 7519) and JWEs: base64url segments, the header starting with `{"`.
    (re.compile(r"(?<![A-Za-z0-9_\-])eyJ[A-Za-z0-9_\-]*(?:\.[A-Za-z0-9_\-]*){2,}"), MASK),
)
# Cheap test before running the patterns: nearly all log text has none of these.
_TRIGGER = re.compile(rf"(?i)bearer|basic|{_KEYS}|eyJ")

# The loggers (and their children) whose lines carry token-endpoint answers and errors:
# the only lines in which registered strings are masked.
SECRET_BEARING_LOGGERS = ("token_proxy.tokens",)

# Exact strings to mask, e.g. client secrets and issued tokens, registered by the
# code that knows them. Reference-counted (two upstreams may share a secret) and
# bounded, since every registered string costs a scan of every logged string.
MAX_REGISTERED_SECRETS = 64
_registered: dict[str, int] = {}
_registered_longest_first: tuple[str, ...] = ()
_registered_lock = threading.Lock()


def register_secret(value: str) -> None:
    """Mask `value` from now on in the lines of `SECRET_BEARING_LOGGERS`.

    Each call should be matched by one `forget_secret()`. When more than
    `MAX_REGISTERED_SECRETS` distinct strings are registered the oldest is dropped.
    """
    global _registered_longest_first
    if not value:
        return
    with _registered_lock:
        _registered[value] = _registered.get(value, 0) + 1
        while len(_registered) > MAX_REGISTERED_SECRETS:
            del _registered[next(iter(_registered))]
        _registered_longest_first = tuple(sorted(_registered, key=len, reverse=True))


def forget_secret(value: str) -> None:
    """Undo one `register_secret(value)`; unknown values are ignored."""
    global _registered_longest_first
    with _registered_lock:
        count = _registered.get(value)
        if count is None:
            return
        if count > 1:
            _registered[value] = count - 1
            return
        del _registered[value]
        _registered_longest_first = tuple(sorted(_registered, key=len, reverse=True))


def redact(text: str, *, registered: bool = True) -> str:
    """`text` with every credential form this module knows replaced by ``***``, and the
    registered strings too unless `registered` is false."""
    if registered:
        for secret in _registered_longest_first:
            if secret in text:
                text = text.replace(secret, MASK)
    if _TRIGGER.search(text) is None:
        return text
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


FieldValue = str | int | float | bool | None | list["FieldValue"] | dict[str, "FieldValue"]


def _clean_value(value: object, registered: bool) -> FieldValue:
    """A JSON-safe, redacted copy of a field value; unknown objects become their `str`."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        # NaN/Infinity are not JSON; keep the line parseable.
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return redact(value, registered=registered)
    if isinstance(value, Mapping):
        return {str(k): _clean_field(str(k), v, registered) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_clean_value(item, registered) for item in value]
    return redact(str(value), registered=registered)


def _clean_field(name: str, value: object, registered: bool) -> FieldValue:
    if value is not None and name.lower() in SECRET_KEYS:
        return MASK
    return _clean_value(value, registered)


def _bears_secrets(logger_name: str) -> bool:
    """Whether lines of `logger_name` may carry token-endpoint text (see the module doc)."""
    return any(
        logger_name == name or logger_name.startswith(name + ".") for name in SECRET_BEARING_LOGGERS
    )


# Everything a LogRecord carries by itself; any other attribute came from `extra=`.
_RECORD_ATTRIBUTES = frozenset(
    logging.LogRecord("", logging.INFO, "", 0, "", (), None).__dict__
) | {"message", "asctime", "taskName"}
# Names of the line's own keys; a field with one of these names gets a `_` suffix.
_LINE_KEYS = frozenset({"ts", "level", "logger", "msg", "exc", "stack"})


def _timestamp(record: logging.LogRecord) -> str:
    """RFC 3339, UTC, millisecond precision."""
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{seconds}.{int(record.msecs):03d}Z"


class LineFormatter(logging.Formatter):
    """Renders a record as one line of JSON or text, fields included, secrets masked."""

    def __init__(self, fmt: LogFormat) -> None:
        super().__init__()
        if fmt not in ("text", "json"):
            raise ValueError(f"unknown log format {fmt!r}: expected 'text' or 'json'")
        self.line_format = fmt

    def format(self, record: logging.LogRecord) -> str:
        registered = _bears_secrets(record.name)
        message = redact(record.getMessage(), registered=registered)
        fields: dict[str, FieldValue] = {}
        for name, value in record.__dict__.items():
            if name in _RECORD_ATTRIBUTES or name.startswith("_"):
                continue
            key = f"{name}_" if name in _LINE_KEYS else name
            fields[key] = _clean_field(name, value, registered)
        exc: str | None = None
        if record.exc_info:
            exc = redact(self.formatException(record.exc_info), registered=registered)
        elif record.exc_text:
            exc = redact(record.exc_text, registered=registered)
        stack = (
            redact(self.formatStack(record.stack_info), registered=registered)
            if record.stack_info
            else None
        )
        if self.line_format == "json":
            return self._json_line(record, message, fields, exc, stack)
        return self._text_line(record, message, fields, exc, stack)

    @staticmethod
    def _json_line(
        record: logging.LogRecord,
        message: str,
        fields: dict[str, FieldValue],
        exc: str | None,
        stack: str | None,
    ) -> str:
        line: dict[str, FieldValue] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": message,
            **fields,
        }
        if exc is not None:
            line["exc"] = exc
        if stack is not None:
            line["stack"] = stack
        # json escapes newlines inside strings, so the event stays on one line.
        return json.dumps(line, ensure_ascii=False, separators=(",", ":"))

    @staticmethod
    def _text_line(
        record: logging.LogRecord,
        message: str,
        fields: dict[str, FieldValue],
        exc: str | None,
        stack: str | None,
    ) -> str:
        parts = [_timestamp(record), record.levelname, record.name, _escape_controls(message)]
        parts.extend(f"{_text_key(key)}={_text_value(value)}" for key, value in fields.items())
        if exc is not None:
            parts.append(f"exc={_quote(exc)}")
        if stack is not None:
            parts.append(f"stack={_quote(stack)}")
        return " ".join(parts)


_CONTROL_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_NEEDS_QUOTES = re.compile(r"[\s\"=\\\x00-\x1f\x7f]")


def _escape_control(match: re.Match[str]) -> str:
    char = match.group()
    return _CONTROL_ESCAPES.get(char, f"\\x{ord(char):02x}")


def _escape_controls(text: str) -> str:
    return _CONTROL.sub(_escape_control, text)


def _quote(text: str) -> str:
    return '"' + _escape_controls(text.replace("\\", "\\\\").replace('"', '\\"')) + '"'


def _text_key(key: str) -> str:
    return _CONTROL.sub("_", key.replace(" ", "_").replace("=", "_"))


def _text_value(value: FieldValue) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    if text == "" or _NEEDS_QUOTES.search(text):
        return _quote(text)
    return text


class _ProxyLogHandler(logging.StreamHandler[TextIO]):
    """The one handler `configure_logging` installs (its type marks it for replacement)."""


def configure_logging(level: str, fmt: LogFormat, *, stream: TextIO | None = None) -> None:
    """Send all logging to `stream` (default stderr) as `fmt` lines, at `level` for the proxy.

    Idempotent: a second call replaces the handler of the first, never adds one.
    Third-party loggers (aiohttp, asyncio) share the handler but only report
    warnings and worse, unless `level` is stricter still.
    """
    try:
        proxy_level = _LEVELS[level.lower()]
    except KeyError:
        raise ValueError(
            f"unknown log level {level!r}: expected one of {', '.join(_LEVELS)}"
        ) from None
    handler = _ProxyLogHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(LineFormatter(fmt))

    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _ProxyLogHandler)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(max(proxy_level, logging.WARNING))
    logging.getLogger(ROOT_LOGGER_NAME).setLevel(proxy_level)
    # The proxy writes its own access log (`log_access`); aiohttp's would only ever
    # describe admin requests (probes, scrapes), one line every few seconds.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def _path_without_query(path: str) -> str:
    """`path` without query, fragment or userinfo: those can carry credentials."""
    path = path.split("#", 1)[0].split("?", 1)[0]
    if "@" in path and "://" in path:
        parts = urlsplit(path)
        host = parts.netloc.rpartition("@")[2]
        path = urlunsplit((parts.scheme, host, parts.path, "", ""))
    return path


def log_access(
    *,
    upstream: str | None,
    method: str,
    host: str,
    path: str,
    status: int,
    duration_s: float,
    bytes_out: int,
    client: str,
) -> None:
    """Log one handled request on ``token_proxy.access``; the query string is dropped."""
    access_logger.info(
        "request",
        extra={
            "event": "access",
            "upstream": upstream,
            "method": method,
            "host": host,
            "path": _path_without_query(path),
            "status": status,
            "duration_ms": round(duration_s * 1000.0, 3),
            "bytes_out": bytes_out,
            "client": client,
        },
    )
