"""Fixtures for the runtime tests: a factory of NATS runtimes connected to the test's
nats-server (``tests/conftest.py``), all shut down after the test."""

from __future__ import annotations

import pytest_asyncio

from tokenmill.runtime.nats_runtime import NatsRuntime, NatsRuntimeConfig


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
