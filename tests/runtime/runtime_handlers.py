"""The stream handler the runtime tests serve (in-process and NATS alike)."""

from __future__ import annotations

import asyncio

from tokenmill.runtime.interface import RequestContext


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
