"""The client connection's transition table (`proxy.datapath.states`)."""

from __future__ import annotations

import itertools

import pytest

from proxy.datapath import states
from proxy.datapath.states import (
    AWAITING_REQUEST,
    CLIENT_EVENT_NAMES,
    CLIENT_STATE_NAMES,
    CLIENT_TRANSITIONS,
    HEAD_COMPLETE,
    IN_BODY,
    IN_HEAD,
    IN_TRAILERS,
    MESSAGE_BEGIN,
    MESSAGE_COMPLETE,
    STOP_PARSING,
    STOPPED,
    TAKE_OVER,
    TAKEN_OVER,
    TRAILER_FIELD,
    ConnectionStateError,
    client_next,
)


def run(*events: int) -> int:
    state = AWAITING_REQUEST
    for event in events:
        state = client_next(state, event)
    return state


def test_requests_follow_one_another() -> None:
    one = (MESSAGE_BEGIN, HEAD_COMPLETE, MESSAGE_COMPLETE)
    with_trailers = (MESSAGE_BEGIN, HEAD_COMPLETE, TRAILER_FIELD, MESSAGE_COMPLETE)
    assert run(*one, *with_trailers, *one) == AWAITING_REQUEST
    assert run(MESSAGE_BEGIN) == IN_HEAD
    assert run(MESSAGE_BEGIN, HEAD_COMPLETE) == IN_BODY
    assert run(MESSAGE_BEGIN, HEAD_COMPLETE, TRAILER_FIELD) == IN_TRAILERS


def test_parsing_stops_anywhere_and_only_a_stopped_connection_is_taken_over() -> None:
    for prefix in ((), (MESSAGE_BEGIN,), (MESSAGE_BEGIN, HEAD_COMPLETE)):
        assert run(*prefix, STOP_PARSING, STOP_PARSING) == STOPPED
        assert run(*prefix, STOP_PARSING, TAKE_OVER) == TAKEN_OVER
    with pytest.raises(ConnectionStateError, match="TAKE_OVER in client state IN_HEAD"):
        run(MESSAGE_BEGIN, TAKE_OVER)


@pytest.mark.parametrize(
    ("state", "event"),
    [
        (state, event)
        for state, event in itertools.product(
            range(len(CLIENT_STATE_NAMES)), range(len(CLIENT_EVENT_NAMES))
        )
        if (state, event) not in CLIENT_TRANSITIONS
    ],
)
def test_every_event_the_table_has_no_row_for_is_an_error(state: int, event: int) -> None:
    with pytest.raises(ConnectionStateError):
        client_next(state, event)


def test_the_flat_table_is_the_table() -> None:
    for (state, event), new in CLIENT_TRANSITIONS.items():
        assert states.CLIENT_NEXT[state * states.CLIENT_EVENTS + event] == new
    unused = states.CLIENT_NEXT.count(bytes([states._NO_ROW]))
    assert unused == len(states.CLIENT_NEXT) - len(CLIENT_TRANSITIONS)
