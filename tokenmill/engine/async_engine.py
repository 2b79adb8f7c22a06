"""``AsyncEngine``: the asyncio client of one engine replica (the worker and frontend use it).

The engine loop runs in its own thread (``loop.py``); the event loop never runs a forward.
Outputs cross to the event loop through one inbox per event loop: the loop thread appends
each step's outputs and wakes the event loop (``call_soon_threadsafe``) only when no drain is
scheduled. A drain that found outputs schedules the next one ``output_interval_s`` later, so
while outputs keep coming the event loop takes them once per interval (one wake-up, and one
item per request, for all the steps in between) instead of once per step; the first output
after a quiet interval is delivered at once. Steps longer than the interval (a real model)
are delivered one by one as before; a fast engine (the mocker) gets its outputs batched.

Contracts:
- ``generate`` validates synchronously (``InvalidRequestError`` / ``ContextLengthExceededError``
  raised to the caller before anything is queued), then yields ``RequestOutput``s until one
  has ``finish_reason`` set. Outputs that queued up for a request while its consumer was busy
  are merged into one (``merge_outputs``: token ids, text and logprobs concatenated, the last
  counts and finish), so a slow consumer takes one item per wake-up, not one per token; a
  consumer that keeps up gets one output per step.
- Leaving the iteration early (``break``, cancellation, ``aclose()``, GeneratorExit) aborts the
  request: its blocks are freed at the loop's next turn, before its next step.
- If the loop dies, every open stream raises ``EngineDeadError`` (after the outputs that came
  before it) and every later ``generate`` raises it at once; ``is_healthy()`` turns False.
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

DEFAULT_OUTPUT_INTERVAL_S = 0.001


class _Inbox:
    """Outputs handed from the loop thread to one event loop (guarded by the engine's lock).
    ``posted``: a drain is scheduled and will take everything appended until it runs."""

    __slots__ = ("loop", "lock", "interval_s", "items", "posted", "num_streams")

    def __init__(self, loop: asyncio.AbstractEventLoop, lock: threading.Lock, interval_s: float):
        self.loop, self.lock, self.interval_s = loop, lock, interval_s
        self.items: list[tuple[_RequestStream, Any]] = []
        self.posted = False
        self.num_streams = 0


class _RequestStream:
    """One request's outputs on its event loop, and the consumer waiting for them."""

    __slots__ = ("inbox", "outputs", "error", "waiter")

    def __init__(self, inbox: _Inbox):
        self.inbox = inbox
        self.outputs: list[RequestOutput] = []
        self.error: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None

    def put(self, item: RequestOutput | BaseException) -> None:
        if isinstance(item, BaseException):
            self.error = item
        else:
            self.outputs.append(item)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        self.waiter = self.inbox.loop.create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None


class AsyncEngine:
    """Owns the loop thread over ``core``; call ``shutdown()`` (or use ``async with``).
    ``output_interval_s``: how long outputs that follow a delivered one may wait to be
    delivered together (0: every step's outputs at once)."""

    def __init__(
        self,
        core: EngineCore,
        clock: Callable[[], float] = time.monotonic,
        output_interval_s: float = DEFAULT_OUTPUT_INTERVAL_S,
    ):
        self.core = core
        self.output_interval_s = output_interval_s
        self._streams: dict[str, _RequestStream] = {}
        self._inboxes: dict[asyncio.AbstractEventLoop, _Inbox] = {}
        self._lock = threading.Lock()
        self._loop = EngineLoop(core, self._on_outputs, self._on_dead, clock).start()

    async def __aenter__(self) -> AsyncEngine:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.shutdown()

    # ------------------------------------------------------------------ client API

    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        rid = request.request_id
        self._check_alive()
        self.core.validate(request)
        pending = self.core.executor.prepare(request)
        if pending is not None:  # e.g. a grammar compiling, off the engine thread
            await asyncio.wrap_future(pending)
        stream = self._register(rid, asyncio.get_running_loop())
        finished = False
        try:
            self._loop.add(request)
            while not finished:
                if not stream.outputs:
                    if stream.error is not None:
                        raise stream.error
                    await stream.wait()
                    continue
                outputs, stream.outputs = stream.outputs, []
                out = outputs[0] if len(outputs) == 1 else merge_outputs(outputs)
                finished = out.finished
                yield out
        finally:
            self._unregister(rid, stream)
            if not finished and self._loop.alive:
                self._loop.abort([rid])

    def _register(self, rid: str, loop: asyncio.AbstractEventLoop) -> _RequestStream:
        with self._lock:
            if rid in self._streams:
                raise InvalidRequestError(f"duplicate request id {rid!r}", param="request_id")
            inbox = self._inboxes.get(loop)
            if inbox is None:
                inbox = self._inboxes[loop] = _Inbox(loop, self._lock, self.output_interval_s)
            inbox.num_streams += 1
            stream = self._streams[rid] = _RequestStream(inbox)
        return stream

    def _unregister(self, rid: str, stream: _RequestStream) -> None:
        with self._lock:
            del self._streams[rid]
            inbox = stream.inbox
            inbox.num_streams -= 1
            if inbox.num_streams == 0:  # a drain still posted keeps its own reference
                del self._inboxes[inbox.loop]

    def abort(self, request_id: str) -> None:
        """Aborts a request; its stream ends with a finish_reason ABORT output."""
        if self._loop.alive:
            self._loop.abort([request_id])

    def release_transfers(self, request_ids: list[str]) -> None:
        """Frees the blocks held for these finished requests' KV transfers at the loop's next
        turn (their consumer will not read them). Unknown ids are ignored."""
        if self._loop.alive:
            self._loop.call(lambda core: core.release_transfers(request_ids))

    def is_healthy(self) -> bool:
        return self._loop.alive

    def stats(self) -> dict[str, float | int]:
        """Running, waiting, kv usage, prefix hit rate, num_blocks (a racy but safe snapshot:
        plain attribute reads of the loop's state)."""
        stats = self.core.stats()
        stats["last_step_s"] = self._loop.last_step_s
        stats["step_time_ms"] = self._loop.step_time_ms
        return stats

    def shutdown(self) -> None:
        self._loop.shutdown()
        self._on_dead(EngineDeadError("engine shut down"))

    # ------------------------------------------------------------------ loop thread side

    def _check_alive(self) -> None:
        if not self._loop.alive:
            raise EngineDeadError(f"engine is not running: {self._loop.error!r}")

    def _on_outputs(self, outputs: list[RequestOutput]) -> None:
        """Loop thread: appends to the inboxes; wakes an event loop only if its inbox was idle."""
        with self._lock:
            streams = self._streams
            post = [
                self._append(stream, out)
                for out in outputs
                if (stream := streams.get(out.request_id)) is not None
            ]
        for inbox in post:
            if inbox is not None:
                _post(inbox)

    def _append(self, stream: _RequestStream, item: Any) -> _Inbox | None:
        """Under the lock; returns the inbox when it needs a drain posted."""
        inbox = stream.inbox
        inbox.items.append((stream, item))
        if inbox.posted:
            return None
        inbox.posted = True
        return inbox

    def _on_dead(self, error: BaseException) -> None:
        dead = error if isinstance(error, EngineDeadError) else EngineDeadError(repr(error))
        with self._lock:
            post = [self._append(stream, dead) for stream in self._streams.values()]
        for inbox in post:
            if inbox is not None:
                _post(inbox)


def merge_outputs(outputs: list[RequestOutput]) -> RequestOutput:
    """One output equivalent to ``outputs`` (consecutive, of one request) in order: new token
    ids, text and logprobs concatenated; finish, stop reason, error and the cumulative counts
    of the last; the queue time of the first."""
    last = outputs[-1]
    logprobs = None
    if any(o.logprobs is not None for o in outputs):
        logprobs = [lp for o in outputs if o.logprobs for lp in o.logprobs]
    return RequestOutput(
        request_id=last.request_id,
        new_token_ids=[t for o in outputs for t in o.new_token_ids],
        text_delta="".join(o.text_delta for o in outputs),
        logprobs=logprobs,
        finish_reason=last.finish_reason,
        stop_reason=last.stop_reason,
        error=last.error,
        num_prompt_tokens=last.num_prompt_tokens,
        num_output_tokens=last.num_output_tokens,
        num_cached_tokens=last.num_cached_tokens,
        queue_time_s=outputs[0].queue_time_s,
        kv_transfer_params=last.kv_transfer_params,
        kv_transfer=next((o.kv_transfer for o in outputs if o.kv_transfer), None),
    )


def _post(inbox: _Inbox) -> None:
    try:
        inbox.loop.call_soon_threadsafe(_drain, inbox)
    except RuntimeError:  # the event loop is closed: nobody is listening
        pass


def _drain(inbox: _Inbox) -> None:
    """Event loop: moves everything in the inbox to its request streams; when there was
    something, the next drain is scheduled (more outputs are likely on their way)."""
    with inbox.lock:
        items, inbox.items = inbox.items, []
        inbox.posted = bool(items) and inbox.interval_s > 0
    if inbox.posted:
        inbox.loop.call_later(inbox.interval_s, _drain, inbox)
    for stream, item in items:
        stream.put(item)
