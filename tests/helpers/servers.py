"""An in-process stack (from ``stacks.assemble_local_stack``) served by uvicorn in the test's
event loop: ``async with InProcessServer(stack) as server`` serves it on ``server.base``."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from helpers.procs import free_port


class InProcessServer:
    """A stack (from ``stacks.assemble_local_stack``) served by uvicorn in the test's loop;
    leaving the block stops uvicorn, then closes the stack."""

    def __init__(self, stack: Any):
        import uvicorn

        class _Quiet(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):
                yield

        self.stack = stack
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            stack.app,
            port=self.port,
            loop="none",
            http="httptools",
            log_level="warning",
            lifespan="on",
        )
        self.server = _Quiet(config)
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> InProcessServer:
        self._task = asyncio.create_task(self.server.serve())
        while not self.server.started:
            assert not self._task.done(), "uvicorn failed to start"
            await asyncio.sleep(0.01)
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.should_exit = True
        await self._task
        await self.stack.close()
