"""Fixtures for the NATS runtime tests: a real nats-server on a free loopback port per test,
and a factory of runtimes connected to it (all shut down after the test)."""

from __future__ import annotations

import asyncio

import pytest
import pytest_asyncio

from tokenmill.runtime.interface import RequestContext
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


class Recorder:
    """A handler yielding ``count`` items (each after ``step`` when gated); records how it
    ended and signals ``finished`` from its ``finally``."""

    def __init__(self, count: int = 3, gated: bool = False):
        self.count, self.gated = count, gated
        self.step = asyncio.Event()
        self.ended: list[str] = []
        self.contexts: list[RequestContext] = []
        self.finished = asyncio.Event()

    async def __call__(self, request, ctx: RequestContext):
        self.contexts.append(ctx)
        try:
            for i in range(self.count):
                if self.gated:
                    await self.step.wait()
                    self.step.clear()
                yield f"{request}-{i}"
            self.ended.append("done")
        except (GeneratorExit, asyncio.CancelledError):
            self.ended.append("cancelled")
            raise
        finally:
            self.finished.set()
