"""The HTTP server of ``serve`` and ``frontend``: uvicorn (httptools, no loop of its own: it
runs on the loop ``event_loop.run`` made) with a drain on SIGINT/SIGTERM, and the serve loop
that prints the ready line once the socket listens.

SIGINT/SIGTERM: stop accepting connections, close idle keep-alive ones, ``await
stack.drain(timeout)`` (in-flight requests finish or are aborted), then uvicorn's own
shutdown (a backstop that cancels what is still running). Signals are not re-raised
afterwards: the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from tokenmill.launch.gc_tuning import freeze_startup_heap
from tokenmill.launch.specs import HttpSpec

SHUTDOWN_BACKSTOP_S = 5.0  # after the drain: how long uvicorn waits before cancelling

Drain = Callable[[float], Awaitable[None]]


def make_server(app: Any, http: HttpSpec, drain: Drain | None = None) -> Any:
    """A uvicorn server for ``app`` on ``http.host:http.port`` (see the module docstring)."""
    import uvicorn

    class _Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self.handle_exit, sig, None)
            try:
                yield
            finally:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(sig)

        async def shutdown(self, sockets=None) -> None:
            for server in self.servers:
                server.close()
            for connection in list(self.server_state.connections):
                connection.shutdown()  # idle keep-alive connections close; streams go on
            if drain is not None:
                await drain(http.shutdown_timeout_s)
            await super().shutdown(sockets)

    config = uvicorn.Config(
        app,
        host=http.host,
        port=http.port,
        loop="none",
        http="httptools",
        lifespan="on",
        log_level="warning",
        access_log=False,
        timeout_keep_alive=http.timeout_keep_alive_s,
        timeout_graceful_shutdown=SHUTDOWN_BACKSTOP_S,
    )
    return _Server(config)


async def serve_stack(stack: Any, http: HttpSpec, start: float, note: str = "",
                      fatal: asyncio.Future[str] | None = None) -> int:  # fmt: skip
    """Serves ``stack.app`` until SIGINT/SIGTERM (or until ``fatal`` resolves: the server
    shuts down as on SIGTERM and the reason goes to stderr), then ``stack.close()``. Prints
    ``tokenmill: serving 'MODEL' at URL (started in S s{note})`` once listening. Returns 0
    after a signal, 1 when the server never started (the port is taken, ...) or on ``fatal``."""
    server = make_server(stack.app, http, stack.drain)
    task = asyncio.create_task(server.serve())
    while not server.started and not task.done():
        await asyncio.sleep(0.01)
    if server.started:
        freeze_startup_heap()
        print(f"tokenmill: serving {stack.model.name!r} at http://{http.host}:{http.port}/v1 "
              f"(started in {time.monotonic() - start:.2f} s{note})", flush=True)  # fmt: skip
    try:
        if fatal is not None:
            await asyncio.wait([task, fatal], return_when=asyncio.FIRST_COMPLETED)
        if fatal is not None and fatal.done():
            print(f"tokenmill: error: {fatal.result()}; stopping", file=sys.stderr, flush=True)
            server.should_exit = True
        await task
    finally:
        await stack.close()
    return 0 if server.started and not (fatal is not None and fatal.done()) else 1
