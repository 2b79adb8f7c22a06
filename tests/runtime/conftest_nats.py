"""Fixtures for the NATS runtime tests: a real nats-server on a free loopback port per test,
and a factory of runtimes connected to it (all shut down after the test)."""

from __future__ import annotations

import pytest
import pytest_asyncio
from runtime_handlers import Recorder

from tokenmill.runtime.nats_runtime import NatsRuntime, NatsRuntimeConfig
from tokenmill.runtime.nats_server import NatsServer


@pytest.fixture
def nats_server():
    server = NatsServer().start()
    yield server
    server.stop()


@pytest_asyncio.fixture
async def make_runtime(nats_server):
    made: list[NatsRuntime] = []

    async def make(**config) -> NatsRuntime:
        rt = await NatsRuntime.connect(nats_server.url, NatsRuntimeConfig(**config))
        made.append(rt)
        return rt

    yield make
    for rt in made:
        await rt.shutdown()


__all__ = ["Recorder", "make_runtime", "nats_server"]
