"""Fixtures of the fleet token cache tests: a real redis-server and an encryption key."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support import tools
from tests.support.redis_server import RedisServer
from tests.tokens.fleet import write_key_file


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    """redis-server on a free loopback port, installed first if this machine lacks it."""
    try:
        tools.redis()
    except tools.ToolUnavailable as unavailable:
        pytest.skip(f"!!! redis-server unavailable, fleet cache NOT tested: {unavailable}")
    directory = tmp_path / "redis"
    directory.mkdir()
    async with RedisServer(directory) as server:
        yield server


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    return write_key_file(tmp_path / "cache-key")
