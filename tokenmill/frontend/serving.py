"""Runs a prepared request: one engine request per (prompt, choice), routed through the
dispatcher (migrated to another worker if its worker fails: ``migration.py``), detokenized
incrementally with stop strings, merged into one ``EventSource`` of ``ChoiceEvent``s in
arrival order.

Everything moves in batches: when several worker outputs are ready at once (a loaded
frontend, or a worker that sent several tokens), they are detokenized in one pass and the
app writes their SSE chunks in one send. Under light load a batch is one token.

Closing the merged source (client gone, deadline, stop string) closes every worker stream,
which aborts the engine requests and frees their blocks. Engine outputs with finish reason
ABORT or ERROR end the stream with ``RequestAbortedError`` / ``EngineError`` (both in
``core.errors``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec

from tokenmill.core.detokenize import IncrementalDetokenizer
from tokenmill.core.errors import EngineError, RequestAbortedError, TokenmillError
from tokenmill.core.request import EngineRequest, FinishReason, RequestOutput, TokenLogprob
from tokenmill.frontend.metrics import FrontendMetrics, ModelMetrics
from tokenmill.frontend.migration import DEFAULT_MIGRATION_LIMIT, MigratingStream
from tokenmill.frontend.preprocess import PreparedRequest, ServedModel
from tokenmill.routing.dispatch import Dispatcher


@dataclass(slots=True)
class ChoiceEvent:
    """New text of one choice; ``finish_reason`` is set on the choice's last event, with the
    final token counts."""

    index: int
    text: str
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0


class MemoDecoder:
    """``tokenizer.decode(ids, skip_special_tokens)`` with one-id results memoized: in steady
    state half of an incremental detokenizer's decodes are of the last token alone."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool, maxsize: int = 65536):
        self._decode = functools.partial(tokenizer.decode, skip_special_tokens=skip_special_tokens)
        self.one: Callable[[int], str] = functools.lru_cache(maxsize=maxsize)(
            lambda t: self._decode([t])
        )  # the text of one token id

    def __call__(self, ids: Sequence[int]) -> str:
        return self.one(ids[0]) if len(ids) == 1 else self._decode(ids)


@dataclass(frozen=True)
class ServeContext:
    model: ServedModel
    dispatcher: Dispatcher
    metrics: FrontendMetrics
    request_timeout_s: float | None = None
    migration_limit: int = DEFAULT_MIGRATION_LIMIT
    decoders: dict[bool, MemoDecoder] = field(init=False)  # by skip_special_tokens
    observed: ModelMetrics = field(init=False)  # this model's request metrics

    def __post_init__(self) -> None:
        decoders = {skip: MemoDecoder(self.model.tokenizer, skip) for skip in (False, True)}
        object.__setattr__(self, "decoders", decoders)
        object.__setattr__(self, "observed", self.metrics.for_model(self.model.name))
        bind = getattr(self.dispatcher, "bind_metrics", None)  # a DisaggDispatcher's
        if bind is not None:
            bind(self.observed)


def engine_requests(prepared: PreparedRequest, base_id: str) -> list[EngineRequest]:
    """Choice ``p * n + j`` is prompt ``p``, sample ``j`` (seeded ``seed + j``)."""
    now = time.time()
    out = []
    for p, prompt in enumerate(prepared.prompts):
        for j in range(prepared.n):
            seed = None if prepared.params.seed is None else prepared.params.seed + j
            params = msgspec.structs.replace(prepared.params, n=1, seed=seed)
            out.append(
                EngineRequest(
                    request_id=f"{base_id}-{p * prepared.n + j}",
                    prompt_token_ids=prompt,
                    params=params,
                    cache_salt=prepared.cache_salt,
                    priority=prepared.priority,
                    arrival_time=now,
                )
            )
    return out


async def open_streams(
    ctx: ServeContext, requests: list[EngineRequest], arrival: float, router: Any = None
) -> list[ChoiceStream]:
    """Routes every request now (so shedding happens before any response is sent);
    ``router``: per-request router options (``options.RouterOptions``) for the policy."""
    streams: list[ChoiceStream] = []
    try:
        for index, request in enumerate(requests):
            stream = MigratingStream(
                ctx.dispatcher, request, ctx.request_timeout_s, ctx.migration_limit, router
            )
            await stream.open()
            opened_s = time.monotonic() - arrival
            streams.append(ChoiceStream(ctx, index, request, stream, arrival, opened_s))
    except BaseException:
        for s in streams:
            await s.aclose()
        raise
    return streams


class EventSource(Protocol):
    """Batches of ``ChoiceEvent``s (one choice or several merged). ``next_batch()`` waits until
    at least one event is ready and returns every event ready now, in order (never empty);
    ``StopAsyncIteration`` once every choice has ended. An error is raised by the call after
    the one that returned the events before it. ``aclose()`` (idempotent) closes the worker
    streams, aborting what still runs."""

    async def next_batch(self) -> list[ChoiceEvent]: ...

    async def aclose(self) -> None: ...


class ChoiceStream:
    """One choice (an ``EventSource``): its worker outputs detokenized into events, a batch
    of outputs at a time. The choice's last event has ``finish_reason`` set; outputs after it
    are dropped. ``aclose()`` closes the worker stream, releases the request from the
    dispatcher and records its E2E latency. Its queue time (``opened_s``, arrival to the
    worker stream's opening, plus the engine's ``queue_time_s``) is recorded with its first
    outputs, or when it closes without any."""

    def __init__(
        self,
        ctx: ServeContext,
        index: int,
        request: EngineRequest,
        stream: MigratingStream,
        arrival: float,
        opened_s: float = 0.0,
    ):
        decode = ctx.decoders[request.params.skip_special_tokens]
        self._detok = IncrementalDetokenizer(decode, request.params.stop, request.prompt_token_ids)
        self._timer = _TokenTimer(ctx.observed, arrival)
        self._opened_s: float | None = opened_s  # None: its queue time is recorded
        self._ctx, self._index, self._request_id = ctx, index, request.request_id
        self._stream, self._arrival = stream, arrival
        self._finished = self._closed = False
        self._error: TokenmillError | None = None

    @property
    def instances(self) -> list[str]:
        """The instances that served this choice, in order (a migration appends)."""
        return self._stream.instances

    async def next_batch(self) -> list[ChoiceEvent]:
        while True:
            if self._error is not None:
                raise self._error
            if self._finished:
                raise StopAsyncIteration
            events = self._events(await self._stream.next_batch())
            if events:
                return events

    def _events(self, outs: list[RequestOutput]) -> list[ChoiceEvent]:
        if self._opened_s is not None:
            queued = next((o.queue_time_s for o in outs if o.queue_time_s is not None), 0.0)
            self._observe_queue_time(queued)
        num_tokens = sum(len(out.new_token_ids) for out in outs)
        if num_tokens and self._timer.first:
            self._ctx.dispatcher.prefill_done(self._request_id)
        self._timer.tick(num_tokens)
        events = []
        for out in outs:
            try:
                event = _event(self._index, out, self._detok)
            except TokenmillError as exc:  # raised by the next call, after these events
                self._error = exc
                self._ctx.observed.finished(str(out.finish_reason or "error"))
                break
            if event is not None:
                events.append(event)
                if event.finish_reason is not None:
                    self._finished = True
                    self._ctx.observed.finished(event.finish_reason)
                    break
        return events

    def _observe_queue_time(self, engine_queue_s: float) -> None:
        if self._opened_s is not None:
            self._ctx.observed.queue_time.observe(self._opened_s + engine_queue_s)
            self._opened_s = None

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._observe_queue_time(0.0)  # no output came: the engine's part is unknown
        if not self._finished and self._error is None:  # closed early: client gone, deadline
            self._ctx.observed.finished("abort")
        try:
            await self._stream.aclose()
        finally:
            self._ctx.dispatcher.finished(self._request_id)
            self._ctx.observed.e2e.observe(time.monotonic() - self._arrival)


def _event(index: int, out: RequestOutput, detok: IncrementalDetokenizer) -> ChoiceEvent | None:
    text = detok.push(out.new_token_ids)
    finish = "stop" if detok.stopped else None
    if finish is None and out.finish_reason is not None:
        finish = _finish_reason(out)
        text += detok.flush()
    if not text and not out.logprobs and finish is None:
        return None
    return ChoiceEvent(
        index,
        text,
        out.logprobs,
        finish,
        out.num_prompt_tokens,
        out.num_output_tokens,
        out.num_cached_tokens,
    )


def _finish_reason(out: RequestOutput) -> str:
    if out.finish_reason is FinishReason.ABORT:
        raise RequestAbortedError(f"request {out.request_id} was aborted by the worker")
    if out.finish_reason is FinishReason.ERROR:
        raise EngineError(f"request {out.request_id} failed in the engine: {out.error}")
    return str(out.finish_reason)


class _TokenTimer:
    """TTFT for the first token, then inter-token latency per token: a batch of ``k`` tokens
    that arrived ``gap`` seconds after the previous one counts ``k`` tokens of ``gap / k``
    (the first batch's tokens after the first count as 0: they came with it)."""

    def __init__(self, metrics: ModelMetrics, arrival: float):
        self.metrics, self.last, self.first = metrics, arrival, True

    def tick(self, num_tokens: int) -> None:
        if num_tokens == 0:
            return
        now = time.monotonic()
        if self.first:
            self.metrics.ttft.observe(now - self.last)
            self.first = False
            if num_tokens > 1:
                self.metrics.itl.observe(0.0, num_tokens - 1)
        else:
            self.metrics.itl.observe((now - self.last) / num_tokens, num_tokens)
        self.last = now


def merge(streams: list[ChoiceStream]) -> EventSource:
    """The events of all choices as they come: one choice is its own source (no task)."""
    return streams[0] if len(streams) == 1 else MergedStream(streams)


_DONE = object()


class MergedStream:
    """Several choices as one ``EventSource``: a task per choice moves its batches into a
    queue; ``next_batch()`` returns every event queued (arrival order). The first error of
    any choice is raised (once the events before it were returned) and ends the stream."""

    def __init__(self, streams: list[ChoiceStream]):
        self._streams = streams
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._tasks = [asyncio.create_task(self._pump(s)) for s in streams]
        self._remaining = len(streams)
        self._error: BaseException | None = None

    async def next_batch(self) -> list[ChoiceEvent]:
        while True:
            if self._error is not None:
                raise self._error
            if not self._remaining:
                raise StopAsyncIteration
            events = self._drain(await self._queue.get())
            if events:
                return events

    def _drain(self, item: Any) -> list[ChoiceEvent]:
        events: list[ChoiceEvent] = []
        while True:
            if item is _DONE:
                self._remaining -= 1
            elif isinstance(item, BaseException):
                self._error = item
                return events
            else:
                events.extend(item)
            if self._queue.empty():
                return events
            item = self._queue.get_nowait()

    async def _pump(self, stream: ChoiceStream) -> None:
        try:
            while True:
                self._queue.put_nowait(await stream.next_batch())
        except StopAsyncIteration:
            pass
        except Exception as e:  # handed to the consumer, which raises it
            self._queue.put_nowait(e)
        finally:
            await stream.aclose()
            self._queue.put_nowait(_DONE)

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for stream in self._streams:  # a task cancelled before it started closed nothing
            await stream.aclose()
