"""``AsyncEngine``: the asyncio client of one engine replica (the worker and frontend use it).

The engine loop runs in its own thread (``loop.py``); the event loop never runs a forward.
Each step's outputs cross to the event loop in ONE ``call_soon_threadsafe`` per event loop
and are fanned out to per-request ``asyncio.Queue``s there.

Contracts:
- ``generate`` validates synchronously (``InvalidRequestError`` / ``ContextLengthExceededError``
  raised to the caller before anything is queued), then yields ``RequestOutput``s until one
  has ``finish_reason`` set. Leaving the iteration early (``break``, cancellation,
  ``aclose()``, GeneratorExit) aborts the request: its blocks are freed at the loop's next turn,
  before its next step.
- If the loop dies, every open stream raises ``EngineDeadError`` at its next ``await`` and
  every later ``generate`` raises it at once; ``is_healthy()`` turns False.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from tokenmill.core.errors import EngineDeadError, InvalidRequestError
from tokenmill.core.request import EngineRequest, RequestOutput
from tokenmill.engine.core import EngineCore
from tokenmill.engine.loop import EngineLoop

_Stream = tuple[asyncio.AbstractEventLoop, asyncio.Queue]


class AsyncEngine:
    """Owns the loop thread over ``core``; call ``shutdown()`` (or use ``async with``)."""

    def __init__(self, core: EngineCore, clock: Callable[[], float] = time.monotonic):
        self.core = core
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._loop = EngineLoop(core, self._on_outputs, self._on_dead, clock).start()

    @classmethod
    def from_loaded(cls, loaded, cache_config, scheduler_config, **runner_kwargs) -> AsyncEngine:
        from tokenmill.engine.core import build_engine_core

        return cls(build_engine_core(loaded, cache_config, scheduler_config, **runner_kwargs))

    async def __aenter__(self) -> AsyncEngine:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.shutdown()

    # ------------------------------------------------------------------ client API

    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        rid = request.request_id
        self._check_alive()
        self.core.validate(request)
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if rid in self._streams:
                raise InvalidRequestError(f"duplicate request id {rid!r}", param="request_id")
            self._streams[rid] = (asyncio.get_running_loop(), queue)
        finished = False
        try:
            self._loop.add(request)
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            with self._lock:
                self._streams.pop(rid, None)
            if not finished and self._loop.alive:
                self._loop.abort([rid])

    def abort(self, request_id: str) -> None:
        """Aborts a request; its stream ends with a finish_reason ABORT output."""
        if self._loop.alive:
            self._loop.abort([request_id])

    def is_healthy(self) -> bool:
        return self._loop.alive

    def stats(self) -> dict[str, float | int]:
        """Running, waiting, kv usage, prefix hit rate, num_blocks (a racy but safe snapshot:
        plain attribute reads of the loop's state)."""
        stats = self.core.stats()
        stats["last_step_s"] = self._loop.last_step_s
        return stats

    def shutdown(self) -> None:
        self._loop.shutdown()
        self._on_dead(EngineDeadError("engine shut down"))

    # ------------------------------------------------------------------ loop thread side

    def _check_alive(self) -> None:
        if not self._loop.alive:
            raise EngineDeadError(f"engine is not running: {self._loop.error!r}")

    def _on_outputs(self, outputs: list[RequestOutput]) -> None:
        """Loop thread: one hand-off per event loop per step."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Any]]] = {}
        with self._lock:
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    by_loop.setdefault(stream[0], []).append((stream[1], out))
        for event_loop, items in by_loop.items():
            _post(event_loop, items)

    def _on_dead(self, error: BaseException) -> None:
        dead = error if isinstance(error, EngineDeadError) else EngineDeadError(repr(error))
        with self._lock:
            streams = list(self._streams.values())
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Any]]] = {}
        for event_loop, queue in streams:
            by_loop.setdefault(event_loop, []).append((queue, dead))
        for event_loop, items in by_loop.items():
            _post(event_loop, items)


def _post(event_loop: asyncio.AbstractEventLoop, items: list[tuple[asyncio.Queue, Any]]) -> None:
    try:
        event_loop.call_soon_threadsafe(_deliver, items)
    except RuntimeError:  # the event loop is closed: nobody is listening
        pass


def _deliver(items: list[tuple[asyncio.Queue, Any]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)
