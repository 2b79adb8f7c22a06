"""Runs a prepared request: one engine request per (prompt, choice), routed through the
dispatcher (migrated to another worker if its worker fails: ``migration.py``), detokenized incrementally with stop strings, merged into one stream of
``ChoiceEvent``s in arrival order.

Closing the merged stream (client gone, deadline, stop string) closes every worker stream,
which aborts the engine requests and frees their blocks. Engine outputs with finish reason
ABORT or ERROR end the stream with ``RequestAbortedError`` / ``EngineError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import msgspec

from tokenmill.core.detokenize import IncrementalDetokenizer
from tokenmill.core.errors import RequestAbortedError, TokenmillError
from tokenmill.core.request import EngineRequest, FinishReason, RequestOutput, TokenLogprob
from tokenmill.frontend.dispatch import Dispatcher
from tokenmill.frontend.metrics import FrontendMetrics
from tokenmill.frontend.migration import DEFAULT_MIGRATION_LIMIT, MigratingStream
from tokenmill.frontend.preprocess import PreparedRequest, ServedModel


class EngineError(TokenmillError):
    """The engine failed the request (not the client's fault: HTTP 500)."""


@dataclass
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


@dataclass(frozen=True)
class ServeContext:
    model: ServedModel
    dispatcher: Dispatcher
    metrics: FrontendMetrics
    request_timeout_s: float | None = None
    migration_limit: int = DEFAULT_MIGRATION_LIMIT


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
) -> list[AsyncIterator[ChoiceEvent]]:
    """Routes every request now (so shedding happens before any response is sent);
    ``router``: per-request router options (``schemas.RouterOptions``) for the policy."""
    streams = []
    try:
        for index, request in enumerate(requests):
            stream = MigratingStream(
                ctx.dispatcher, request, ctx.request_timeout_s, ctx.migration_limit, router
            )
            await stream.open()
            ctx.metrics.queue_time.observe(time.monotonic() - arrival)
            streams.append(_choice_events(ctx, index, request, stream, arrival))
    except BaseException:
        for s in streams:
            await s.aclose()  # type: ignore[attr-defined]
        raise
    return streams


async def _choice_events(
    ctx: ServeContext, index: int, request: EngineRequest, stream, arrival: float
) -> AsyncIterator[ChoiceEvent]:
    decode = functools.partial(
        ctx.model.tokenizer.decode, skip_special_tokens=request.params.skip_special_tokens
    )
    detok = IncrementalDetokenizer(decode, request.params.stop, request.prompt_token_ids)
    timer = _TokenTimer(ctx.metrics, arrival)
    try:
        async for out in stream:
            if timer.first and out.new_token_ids:
                ctx.dispatcher.prefill_done(request.request_id)
            timer.tick(len(out.new_token_ids))
            event = _event(index, out, detok)
            if event is not None:
                yield event
                if event.finish_reason is not None:
                    return
    finally:
        await stream.aclose()
        ctx.dispatcher.finished(request.request_id)
        ctx.metrics.e2e.observe(time.monotonic() - arrival)


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
    """TTFT on the first output with tokens, then inter-token latency per token."""

    def __init__(self, metrics: FrontendMetrics, arrival: float):
        self.metrics, self.last, self.first = metrics, arrival, True

    def tick(self, num_tokens: int) -> None:
        if num_tokens == 0:
            return
        now = time.monotonic()
        if self.first:
            self.metrics.ttft.observe(now - self.last)
            self.first = False
        else:
            self.metrics.itl.observe((now - self.last) / num_tokens)
        self.last = now


_DONE = object()


async def merge(streams: list[AsyncIterator[ChoiceEvent]]) -> AsyncIterator[ChoiceEvent]:
    """Events of all streams as they come. One stream: iterated directly (no task)."""
    if len(streams) == 1:
        try:
            async for event in streams[0]:
                yield event
        finally:
            await streams[0].aclose()  # type: ignore[attr-defined]
        return
    queue: asyncio.Queue[object] = asyncio.Queue()
    tasks = [asyncio.create_task(_pump(s, queue)) for s in streams]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is _DONE:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item  # type: ignore[misc]
    finally:
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)


async def _pump(stream: AsyncIterator[ChoiceEvent], queue: asyncio.Queue[object]) -> None:
    try:
        async for event in stream:
            queue.put_nowait(event)
    except Exception as e:  # handed to the consumer, which raises it
        queue.put_nowait(e)
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
        queue.put_nowait(_DONE)
