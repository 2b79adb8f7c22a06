"""AsyncEngine: streaming, abort on cancellation, dead-loop fail-fast, and the event loop
staying responsive while the engine thread runs 50 ms steps. A fake executor (no torch
model) stands in for the model: it is the plug the mocker uses too."""

from __future__ import annotations

import asyncio
import threading
import time

import msgspec
import pytest

from tokenmill.core.errors import EngineDeadError, InvalidRequestError
from tokenmill.core.request import EngineRequest, FinishReason, RequestOutput, TokenLogprob
from tokenmill.core.sampling import SamplingParams
from tokenmill.engine.async_engine import AsyncEngine, merge_outputs
from tokenmill.engine.config import CacheConfig, SchedulerConfig
from tokenmill.engine.core import EngineCore
from tokenmill.engine.executor.base import Executor, ExecutorOutput
from tokenmill.engine.scheduler import Scheduler

VOCAB = 100


class FakeExecutor(Executor):
    """Samples ``(num_tokens % 50) + 10`` for each sampling request; sleeps ``step_s``."""

    def __init__(self, step_s: float = 0.0, gate: threading.Event | None = None):
        self.num_blocks, self.block_size = 64, 4
        self.step_s = step_s
        self.gate = gate
        self.released: list[str] = []

    def execute(self, sched) -> ExecutorOutput:
        if self.gate is not None:
            self.gate.wait(5)
        if self.step_s:
            time.sleep(self.step_s)  # like a forward: releases the GIL
        out = ExecutorOutput()
        for s in sched.scheduled:
            if s.samples:
                out.sampled[s.request_id] = [s.request.num_tokens % 50 + 10]
        return out

    def release(self, request_ids) -> None:
        self.released.extend(request_ids)


def make_engine(executor: Executor, **kwargs) -> AsyncEngine:
    scheduler = Scheduler(SchedulerConfig(max_model_len=128), CacheConfig(4, 64))
    return AsyncEngine(EngineCore(scheduler, executor, VOCAB), **kwargs)


def req(rid, n=5, **kw):
    params = SamplingParams(max_tokens=n, ignore_eos=True, **kw)
    return EngineRequest(request_id=rid, prompt_token_ids=[1, 2, 3], params=params)


async def collect(engine, request):
    return [out async for out in engine.generate(request)]


async def on_loop(engine, fn):
    """Runs ``fn(core)`` in the engine thread and awaits its result."""
    fut = asyncio.get_running_loop().create_future()
    loop = asyncio.get_running_loop()
    engine._loop.call(lambda core: loop.call_soon_threadsafe(fut.set_result, fn(core)))
    return await fut


async def test_streams_tokens_and_counts():
    engine = make_engine(FakeExecutor())
    try:
        a, b = await asyncio.gather(collect(engine, req("a")), collect(engine, req("b", 3)))
        assert [t for o in a for t in o.new_token_ids] == [13, 14, 15, 16, 17]
        assert a[-1].finish_reason == FinishReason.LENGTH and not any(o.finished for o in a[:-1])
        assert (b[-1].num_prompt_tokens, b[-1].num_output_tokens) == (3, 3)
        stats = engine.stats()
        assert (stats["num_running"], stats["num_waiting"], stats["num_blocks"]) == (0, 0, 64)
        assert engine.is_healthy()
    finally:
        engine.shutdown()
    assert not engine.is_healthy()


async def test_outputs_queued_while_the_consumer_is_busy_arrive_merged():
    # interval 0: every step's outputs are posted at once, so when on_loop returns (posted
    # after the last step) they are all in the request's buffer
    engine = make_engine(FakeExecutor(), output_interval_s=0.0)
    try:
        stream = engine.generate(req("m", 6))
        first = await stream.__anext__()
        while await on_loop(engine, lambda c: c.has_unfinished_requests()):
            pass  # the rest is generated while this consumer reads nothing
        rest = [out async for out in stream]
        assert len(rest) <= 1  # whatever was left came as one item
        outs = [first, *rest]
        assert [t for o in outs for t in o.new_token_ids] == [13, 14, 15, 16, 17, 18]
        assert outs[-1].finish_reason == FinishReason.LENGTH
        assert outs[-1].num_output_tokens == 6
    finally:
        engine.shutdown()


def test_merge_outputs_concatenates_increments_and_keeps_the_last_counts():
    lp = [TokenLogprob(7, -0.5, []), TokenLogprob(8, -1.0, [(9, -2.0)])]
    outs = [
        RequestOutput(
            request_id="r",
            new_token_ids=[7],
            text_delta="a",
            logprobs=lp[:1],
            num_prompt_tokens=3,
            num_output_tokens=1,
            num_cached_tokens=2,
        ),
        RequestOutput(
            request_id="r",
            new_token_ids=[8],
            text_delta="b",
            logprobs=lp[1:],
            num_prompt_tokens=3,
            num_output_tokens=2,
            num_cached_tokens=2,
        ),
        RequestOutput(
            request_id="r",
            new_token_ids=[],
            text_delta="c",
            finish_reason=FinishReason.STOP,
            stop_reason="x",
            num_prompt_tokens=3,
            num_output_tokens=2,
            num_cached_tokens=2,
        ),
    ]
    merged = merge_outputs(outs)
    assert merged == RequestOutput(
        request_id="r",
        new_token_ids=[7, 8],
        text_delta="abc",
        logprobs=lp,
        finish_reason=FinishReason.STOP,
        stop_reason="x",
        num_prompt_tokens=3,
        num_output_tokens=2,
        num_cached_tokens=2,
    )
    assert merge_outputs(outs[1:]).logprobs == lp[1:]
    plain = [msgspec.structs.replace(o, logprobs=None) for o in outs]
    assert merge_outputs(plain).logprobs is None


async def test_invalid_request_raises_before_queueing():
    engine = make_engine(FakeExecutor())
    try:
        with pytest.raises(InvalidRequestError) as e:
            await collect(engine, EngineRequest(request_id="x", prompt_token_ids=[1, VOCAB]))
        assert e.value.param == "prompt"
    finally:
        engine.shutdown()


async def test_leaving_the_stream_aborts_and_frees_blocks():
    engine = make_engine(FakeExecutor(step_s=0.005))
    try:
        stream = engine.generate(req("long", 100))
        async for out in stream:
            if out.num_output_tokens >= 2:
                break
        await stream.aclose()  # GeneratorExit inside generate -> abort
        used, unfinished = await on_loop(
            engine, lambda c: (c.scheduler.kv.num_used_blocks, c.has_unfinished_requests())
        )
        assert (used, unfinished) == (0, False)
        await on_loop(engine, lambda c: c.check_integrity())
    finally:
        engine.shutdown()


async def test_cancelled_consumer_aborts_its_request():
    engine = make_engine(FakeExecutor(step_s=0.005))
    try:
        first = asyncio.Event()

        async def consume():
            async for _ in engine.generate(req("c", 100)):
                first.set()

        task = asyncio.create_task(consume())
        await first.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await on_loop(engine, lambda c: c.scheduler.kv.num_used_blocks) == 0
    finally:
        engine.shutdown()


async def test_abort_ends_the_stream_with_abort():
    gate = threading.Event()
    engine = make_engine(FakeExecutor(gate=gate))
    try:
        stream = engine.generate(req("x", 50))
        task = asyncio.create_task(collect_stream(stream))
        await asyncio.sleep(0)  # let generate queue the request
        engine.abort("x")
        gate.set()
        outs = await task
        assert outs[-1].finish_reason == FinishReason.ABORT
    finally:
        engine.shutdown()


async def collect_stream(stream):
    return [o async for o in stream]


async def test_dead_loop_fails_every_caller_fast():
    gate = threading.Event()
    engine = make_engine(FakeExecutor(gate=gate))
    core = engine.core

    def broken_step():
        gate.wait(5)
        raise RuntimeError("scheduler bug")

    core.step = broken_step
    pending = asyncio.create_task(collect(engine, req("p")))
    await asyncio.sleep(0)  # let the task queue its request (the gate holds the step)
    gate.set()
    with pytest.raises(EngineDeadError):
        await asyncio.wait_for(pending, 5)
    assert not engine.is_healthy()
    with pytest.raises(EngineDeadError):
        await collect(engine, req("later"))
    engine.shutdown()


async def test_event_loop_not_blocked_by_50ms_steps():
    engine = make_engine(FakeExecutor(step_s=0.05))
    try:
        gen = asyncio.create_task(collect(engine, req("slow", 8)))
        worst = 0.0
        while not gen.done():
            t = time.perf_counter()
            await asyncio.sleep(0.005)
            worst = max(worst, time.perf_counter() - t - 0.005)
        assert len(await gen) >= 1
        assert worst < 0.04, f"a 5 ms timer fired {worst * 1000:.1f} ms late"
    finally:
        engine.shutdown()
