"""Connection states and the one table of their transitions.

python-hyper/h11's `_state.py` is the model: a connection is in one named state, each
event moves it along one row of a table, and an event the table has no row for is an
error where it happens instead of a flag read wrongly later.

The client connection's state is where its request stream is: between requests, in a
head, in a body (or its trailers), stopped (no more requests are parsed: an upgrade or
CONNECT pending, a parse error, a half-close, an HTTP/2 preface) or taken over (its
bytes go to a tunnel or an upgraded connection). Whether a request is being answered
(`busy`) is the other side, and the header and idle deadlines are times the listener's
sweeper compares, not states.

The states are plain integers: the compiled build compares them as machine words,
where an `enum` member would be an object looked up and compared through the C API.
"""

from __future__ import annotations

from typing import Final

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


_NO_ROW: Final = 255


def _flat(table: dict[tuple[int, int], int], states: int, events: int) -> bytes:
    """`table` as bytes indexed by ``state * events + event``, `_NO_ROW` where it has no
    row: indexing bytes gives a native integer in the compiled build, where a dict
    would hash a tuple and a list would box and unbox."""
    flat = bytearray([_NO_ROW]) * (states * events)
    for (state, event), new in table.items():
        flat[state * events + event] = new
    return bytes(flat)


CLIENT_EVENTS: Final = len(CLIENT_EVENT_NAMES)
CLIENT_NEXT: Final = _flat(CLIENT_TRANSITIONS, len(CLIENT_STATE_NAMES), CLIENT_EVENTS)


class ConnectionStateError(Exception):
    """An event the transition table has no row for: a bug, not a client's fault."""


def client_next(state: int, event: int) -> int:
    """The client connection's state after `event` in `state`."""
    new = CLIENT_NEXT[state * CLIENT_EVENTS + event]
    if new == _NO_ROW:
        raise ConnectionStateError(
            f"{CLIENT_EVENT_NAMES[event]} in client state {CLIENT_STATE_NAMES[state]}"
        )
    return new
