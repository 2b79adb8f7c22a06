"""Fixtures for the KV storage tests: a real redis-server per test (loopback, free port)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from helpers.redis_server import RedisServer


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.close()
