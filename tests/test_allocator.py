"""The allocator setting `token-proxy run` applies for relaying large bodies."""

from __future__ import annotations

import platform

import pytest

from proxy.allocator import tune_for_streaming


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's")
def test_the_top_pad_is_set_on_glibc() -> None:
    assert tune_for_streaming()


@pytest.mark.skipif(platform.libc_ver()[0] == "glibc", reason="for other C libraries")
def test_other_c_libraries_are_left_alone() -> None:
    assert not tune_for_streaming()
