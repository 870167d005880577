"""The connections' transition tables (`proxy.datapath.states`)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import NamedTuple

import pytest

from proxy.datapath import states
from proxy.datapath.states import (
    AWAITING_REQUEST,
    AWAITING_RESPONSE,
    CLIENT_EVENT_NAMES,
    CLIENT_STATE_NAMES,
    CLIENT_TRANSITIONS,
    FINAL_HEAD_END,
    FINAL_HEAD_END_UNTIL_CLOSE,
    HEAD_COMPLETE,
    IDLE,
    IN_BODY,
    IN_BODY_UNTIL_CLOSE,
    IN_HEAD,
    IN_INTERIM,
    IN_RESPONSE_BODY,
    IN_RESPONSE_HEAD,
    IN_TRAILERS,
    INTERIM_HEAD_END,
    MESSAGE_BEGIN,
    MESSAGE_COMPLETE,
    RESPONSE_BEGIN,
    RESPONSE_END,
    SEND_REQUEST,
    STOP_PARSING,
    STOPPED,
    SWITCH_PROTOCOLS,
    SWITCHED,
    TAKE_OVER,
    TAKEN_OVER,
    TRAILER_FIELD,
    UPSTREAM_EVENT_NAMES,
    UPSTREAM_STATE_NAMES,
    UPSTREAM_TRANSITIONS,
    ConnectionStateError,
    client_next,
    upstream_next,
)


class Side(NamedTuple):
    table: dict[tuple[int, int], int]
    flat: bytes
    states: int
    events: int
    next_state: Callable[[int, int], int]


SIDES = {
    "client": Side(
        CLIENT_TRANSITIONS,
        states.CLIENT_NEXT,
        len(CLIENT_STATE_NAMES),
        len(CLIENT_EVENT_NAMES),
        client_next,
    ),
    "upstream": Side(
        UPSTREAM_TRANSITIONS,
        states.UPSTREAM_NEXT,
        len(UPSTREAM_STATE_NAMES),
        len(UPSTREAM_EVENT_NAMES),
        upstream_next,
    ),
}


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


def upstream_run(*events: int) -> int:
    state = IDLE
    for event in events:
        state = upstream_next(state, event)
    return state


def test_responses_follow_their_requests_with_interim_heads_first() -> None:
    head = (RESPONSE_BEGIN, FINAL_HEAD_END)
    interim = (RESPONSE_BEGIN, INTERIM_HEAD_END, RESPONSE_END)
    assert upstream_run(SEND_REQUEST) == AWAITING_RESPONSE
    assert upstream_run(SEND_REQUEST, RESPONSE_BEGIN) == IN_RESPONSE_HEAD
    assert upstream_run(SEND_REQUEST, RESPONSE_BEGIN, INTERIM_HEAD_END) == IN_INTERIM
    assert upstream_run(SEND_REQUEST, *interim, *interim) == AWAITING_RESPONSE
    assert upstream_run(SEND_REQUEST, *interim, *head) == IN_RESPONSE_BODY
    exchange = (SEND_REQUEST, *head, RESPONSE_END)
    assert upstream_run(*exchange, *exchange) == IDLE
    until_close = (SEND_REQUEST, RESPONSE_BEGIN, FINAL_HEAD_END_UNTIL_CLOSE)
    assert upstream_run(*until_close) == IN_BODY_UNTIL_CLOSE


def test_only_an_ended_response_switches_protocols_and_nothing_follows() -> None:
    head = (SEND_REQUEST, RESPONSE_BEGIN, FINAL_HEAD_END)
    assert upstream_run(*head, RESPONSE_END, SWITCH_PROTOCOLS) == SWITCHED
    with pytest.raises(ConnectionStateError, match="SWITCH_PROTOCOLS in upstream state IN_"):
        upstream_run(*head, SWITCH_PROTOCOLS)
    with pytest.raises(ConnectionStateError, match="SEND_REQUEST in upstream state SWITCHED"):
        upstream_run(*head, RESPONSE_END, SWITCH_PROTOCOLS, SEND_REQUEST)


def test_a_body_that_ends_at_the_close_ends_no_other_way() -> None:
    with pytest.raises(
        ConnectionStateError, match="RESPONSE_END in upstream state IN_BODY_UNTIL_CLOSE"
    ):
        upstream_run(SEND_REQUEST, RESPONSE_BEGIN, FINAL_HEAD_END_UNTIL_CLOSE, RESPONSE_END)


@pytest.mark.parametrize(
    ("side", "state", "event"),
    [
        (name, state, event)
        for name, side in SIDES.items()
        for state, event in itertools.product(range(side.states), range(side.events))
        if (state, event) not in side.table
    ],
)
def test_every_event_the_table_has_no_row_for_is_an_error(
    side: str, state: int, event: int
) -> None:
    with pytest.raises(ConnectionStateError, match=f"in {side} state"):
        SIDES[side].next_state(state, event)


@pytest.mark.parametrize("name", SIDES)
def test_the_flat_table_is_the_table(name: str) -> None:
    side = SIDES[name]
    assert len(side.flat) == side.states * side.events
    for (state, event), new in side.table.items():
        assert side.flat[state * side.events + event] == new
    unused = side.flat.count(bytes([states._NO_ROW]))
    assert unused == len(side.flat) - len(side.table)
