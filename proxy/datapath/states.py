"""Connection states and the one table of their transitions, per side.

python-hyper/h11's `_state.py` is the model: a connection is in one named state, each
event moves it along one row of a table, and an event the table has no row for is an
error where it happens instead of a flag read wrongly later.

The client connection's state is where its request stream is: between requests, in a
head, in a body (or its trailers), stopped (no more requests are parsed: an upgrade or
CONNECT pending, a parse error, a half-close, an HTTP/2 preface) or taken over (its
bytes go to a tunnel or an upgraded connection). Whether a request is being answered
(`busy`) is the other side, and the header and idle deadlines are times the listener's
sweeper compares, not states.

The upstream connection's state is where the response to its request in flight is:
none due, awaited, in a head (interim 1xx heads come and go before the final one), in
a body framed by its length or chunks, in a body that ends when the connection closes,
or switched to another protocol by a 101. Whether the connection may carry another
exchange also depends on facts beside the state (the response's keep-alive, a verdict
that it must not be reused), which `UpstreamConnection` keeps as fields.

The states are plain integers: the compiled build compares them as machine words,
where an `enum` member would be an object looked up and compared through the C API.
"""

from __future__ import annotations

from typing import Final, NoReturn

# -- the client connection's request stream ----------------------------------------------

AWAITING_REQUEST: Final = 0  # before the first request, or after one ended
IN_HEAD: Final = 1  # a request head has begun and not yet ended
IN_BODY: Final = 2  # the head is complete; its body (if any) is being read
IN_TRAILERS: Final = 3  # the body's trailer fields are being read (and dropped)
STOPPED: Final = 4  # no further request is parsed; bytes that come are kept
TAKEN_OVER: Final = 5  # bytes go to the `RawSink` of a tunnel or an upgraded connection

CLIENT_STATE_NAMES: Final = (
    "AWAITING_REQUEST",
    "IN_HEAD",
    "IN_BODY",
    "IN_TRAILERS",
    "STOPPED",
    "TAKEN_OVER",
)

# Events, from the parser's callbacks and from whoever answers.
MESSAGE_BEGIN: Final = 0
HEAD_COMPLETE: Final = 1
TRAILER_FIELD: Final = 2
MESSAGE_COMPLETE: Final = 3
STOP_PARSING: Final = 4  # upgrade or CONNECT, parse error, half-close, HTTP/2 preface
TAKE_OVER: Final = 5  # a tunnel or an upgrade takes the connection's bytes

CLIENT_EVENT_NAMES: Final = (
    "MESSAGE_BEGIN",
    "HEAD_COMPLETE",
    "TRAILER_FIELD",
    "MESSAGE_COMPLETE",
    "STOP_PARSING",
    "TAKE_OVER",
)

_PARSING: Final = (AWAITING_REQUEST, IN_HEAD, IN_BODY, IN_TRAILERS)

# (state, event) -> next state. Nothing else may happen.
CLIENT_TRANSITIONS: Final[dict[tuple[int, int], int]] = {
    (AWAITING_REQUEST, MESSAGE_BEGIN): IN_HEAD,
    (IN_HEAD, HEAD_COMPLETE): IN_BODY,
    (IN_BODY, TRAILER_FIELD): IN_TRAILERS,
    (IN_BODY, MESSAGE_COMPLETE): AWAITING_REQUEST,
    (IN_TRAILERS, MESSAGE_COMPLETE): AWAITING_REQUEST,
    **{(state, STOP_PARSING): STOPPED for state in (*_PARSING, STOPPED)},
    # A tunnel or an upgrade takes over once parsing stopped at its request.
    (STOPPED, TAKE_OVER): TAKEN_OVER,
}


# -- the upstream connection's response ------------------------------------------------

# Ordered so that the states before `IN_RESPONSE_BODY` are those awaiting the final head.
AWAITING_RESPONSE: Final = 0  # a request went out; no head of its response has begun
IN_RESPONSE_HEAD: Final = 1  # a response head (interim or final) has begun, not ended
IN_INTERIM: Final = 2  # an interim (1xx) head has ended, its message not yet
IN_RESPONSE_BODY: Final = 3  # the final head has ended; its body, if any, is framed
IN_BODY_UNTIL_CLOSE: Final = 4  # the final head has ended; its body ends at the close
IDLE: Final = 5  # no response due: a new connection, or the last response ended
SWITCHED: Final = 6  # a 101 ended the response: what follows is another protocol

UPSTREAM_STATE_NAMES: Final = (
    "AWAITING_RESPONSE",
    "IN_RESPONSE_HEAD",
    "IN_INTERIM",
    "IN_RESPONSE_BODY",
    "IN_BODY_UNTIL_CLOSE",
    "IDLE",
    "SWITCHED",
)

# Events, from the forwarder and from the response parser's callbacks.
SEND_REQUEST: Final = 0
RESPONSE_BEGIN: Final = 1
INTERIM_HEAD_END: Final = 2  # a 1xx head other than 101
FINAL_HEAD_END: Final = 3  # its body framed by Content-Length or chunks, or none
FINAL_HEAD_END_UNTIL_CLOSE: Final = 4  # its body delimited by the close (RFC 9112 §6.3)
RESPONSE_END: Final = 5
SWITCH_PROTOCOLS: Final = 6

UPSTREAM_EVENT_NAMES: Final = (
    "SEND_REQUEST",
    "RESPONSE_BEGIN",
    "INTERIM_HEAD_END",
    "FINAL_HEAD_END",
    "FINAL_HEAD_END_UNTIL_CLOSE",
    "RESPONSE_END",
    "SWITCH_PROTOCOLS",
)

# (state, event) -> next state. Nothing else may happen.
UPSTREAM_TRANSITIONS: Final[dict[tuple[int, int], int]] = {
    (IDLE, SEND_REQUEST): AWAITING_RESPONSE,
    (AWAITING_RESPONSE, RESPONSE_BEGIN): IN_RESPONSE_HEAD,
    (IN_RESPONSE_HEAD, INTERIM_HEAD_END): IN_INTERIM,
    (IN_INTERIM, RESPONSE_END): AWAITING_RESPONSE,
    (IN_RESPONSE_HEAD, FINAL_HEAD_END): IN_RESPONSE_BODY,
    (IN_RESPONSE_HEAD, FINAL_HEAD_END_UNTIL_CLOSE): IN_BODY_UNTIL_CLOSE,
    (IN_RESPONSE_BODY, RESPONSE_END): IDLE,
    # llhttp ends a 101's message before it stops at the switch.
    (IDLE, SWITCH_PROTOCOLS): SWITCHED,
}


_NO_ROW: Final = 255


def _flat(table: dict[tuple[int, int], int], states: int, events: int) -> bytes:
    """`table` as bytes indexed by ``state * events + event``, `_NO_ROW` where it has no
    row: indexing bytes gives a native integer in the compiled build, where a dict
    would hash a tuple and a list would box and unbox."""
    flat = bytearray([_NO_ROW]) * (states * events)
    for (state, event), new in table.items():
        flat[state * events + event] = new
    return bytes(flat)


# How many events each side has, as literals: the compiled build multiplies by a
# constant instead of loading a global (tests check them against the names).
CLIENT_EVENTS: Final = 6
CLIENT_NEXT: Final = _flat(CLIENT_TRANSITIONS, len(CLIENT_STATE_NAMES), CLIENT_EVENTS)
UPSTREAM_EVENTS: Final = 7
UPSTREAM_NEXT: Final = _flat(UPSTREAM_TRANSITIONS, len(UPSTREAM_STATE_NAMES), UPSTREAM_EVENTS)


class ConnectionStateError(Exception):
    """An event the transition table has no row for: a bug, not the peer's fault."""


def client_next(state: int, event: int) -> int:
    """The client connection's state after `event` in `state`."""
    new = CLIENT_NEXT[state * CLIENT_EVENTS + event]
    return new if new != _NO_ROW else _no_row(_CLIENT, state, event)


def upstream_next(state: int, event: int) -> int:
    """The upstream connection's state after `event` in `state`."""
    new = UPSTREAM_NEXT[state * UPSTREAM_EVENTS + event]
    return new if new != _NO_ROW else _no_row(_UPSTREAM, state, event)


_Side = tuple[str, tuple[str, ...], tuple[str, ...]]  # its name, its states', its events'
_CLIENT: Final[_Side] = ("client", CLIENT_STATE_NAMES, CLIENT_EVENT_NAMES)
_UPSTREAM: Final[_Side] = ("upstream", UPSTREAM_STATE_NAMES, UPSTREAM_EVENT_NAMES)


def _no_row(side: _Side, state: int, event: int) -> NoReturn:
    name, state_names, event_names = side
    raise ConnectionStateError(f"{event_names[event]} in {name} state {state_names[state]}")
