"""`FrameGuard` on its own: what it passes on to h2, byte for byte, however the client's
bytes are cut into reads, and the bounds it counts."""

from __future__ import annotations

import pytest
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
)

from proxy.datapath.http2.guards import PREFACE, Flood, FrameGuard

FRAMES = [
    SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 1000}),
    HeadersFrame(1, b"\x82\x84", flags=["END_HEADERS"]),
    DataFrame(1, b"body" * 10, flags=["END_STREAM"]),
]
GOAWAY = GoAwayFrame(0, last_stream_id=0, error_code=0, additional_data=b"bye now")


def guard(**bounds: int) -> FrameGuard:
    return FrameGuard(max_header_block=bounds.pop("max_header_block", 1000), now=0.0, **bounds)


def fed(data: bytes, cuts: list[int]) -> tuple[bytes, FrameGuard]:
    """What `guard` passes on when `data` arrives cut at `cuts`."""
    checker = guard()
    passed = b""
    for start, end in zip([0, *cuts], [*cuts, len(data)], strict=True):
        passed += checker.inspect(data[start:end], 0.0)
    return passed, checker


def test_the_clients_goaway_is_kept_from_h2_wherever_the_reads_are_cut() -> None:
    before = PREFACE + b"".join(frame.serialize() for frame in FRAMES[:2])
    after = FRAMES[2].serialize()
    data = before + GOAWAY.serialize() + after
    for cut in range(1, len(data)):
        passed, checker = fed(data, [cut])
        assert passed == before + after, cut
        assert checker.goaway == (0, 0), cut
    passed, checker = fed(data, list(range(1, len(data))))  # a byte at a time
    assert passed == before + after
    assert checker.goaway == (0, 0)


def test_frames_pass_unchanged() -> None:
    data = PREFACE + b"".join(frame.serialize() for frame in FRAMES)
    passed, checker = fed(data, [5, 30, 31, 60])
    assert passed == data
    assert checker.goaway is None


def test_a_header_block_is_bounded_before_it_ends() -> None:
    checker = guard(max_header_block=100)
    checker.inspect(PREFACE + HeadersFrame(1, b"\x82" * 60).serialize(), 0.0)
    assert checker.header_block_since == 0.0
    with pytest.raises(Flood, match="header block too large"):
        checker.inspect(ContinuationFrame(1, b"\x00" * 60).serialize(), 0.0)


def test_a_complete_header_block_starts_the_count_again() -> None:
    checker = guard(max_header_block=100)
    checker.inspect(PREFACE, 0.0)
    for stream_id in range(1, 20, 2):
        checker.inspect(HeadersFrame(stream_id, b"\x82" * 30).serialize(), 0.0)
        checker.inspect(
            ContinuationFrame(stream_id, b"\x82" * 30, flags=["END_HEADERS"]).serialize(), 0.0
        )
    assert checker.header_block_since is None


def test_counts_start_again_each_window() -> None:
    checker = FrameGuard(max_header_block=1000, now=0.0, control_frames=10, resets=5, window=10.0)
    checker.inspect(PREFACE, 0.0)
    for second in range(0, 100, 10):  # at the bound in every window, never past it
        checker.inspect(PingFrame(0, b"12345678").serialize() * 10, float(second))
        checker.inspect(RstStreamFrame(1, error_code=8).serialize() * 5, float(second))
    with pytest.raises(Flood, match="too many control frames"):
        checker.inspect(PingFrame(0, b"12345678").serialize(), 95.0)


def test_acknowledgements_are_not_counted() -> None:
    checker = FrameGuard(max_header_block=1000, now=0.0, control_frames=1)
    checker.inspect(PREFACE, 0.0)
    checker.inspect(PingFrame(0, b"12345678", flags=["ACK"]).serialize() * 50, 0.0)
    checker.inspect(SettingsFrame(0, flags=["ACK"]).serialize() * 50, 0.0)
    with pytest.raises(Flood):
        checker.inspect(SettingsFrame(0).serialize() * 2, 0.0)
