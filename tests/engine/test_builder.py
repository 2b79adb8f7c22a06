"""``engine.builder``: each builder assembles what its docstring says (scheduler limits, EOS,
event sink, clock, executor kind and sizes, text or ids only), checked on plain data, the
mocker and the tiny model."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
from helpers.tiny_models import TEST_DEVICE

from tokenmill.core.request import EngineRequest
from tokenmill.core.sampling import SamplingParams
from tokenmill.engine.async_engine import AsyncEngine
from tokenmill.engine.builder import (
    DEFAULT_KV_CACHE_MEMORY,
    build_async_engine,
    build_core,
    build_mock_core,
    build_real_core,
)
from tokenmill.engine.config import CacheConfig, SchedulerConfig, num_blocks_for_memory
from tokenmill.engine.executor.base import Executor, ExecutorOutput
from tokenmill.engine.mocker import MockExecutor, PolynomialTiming, StepPacer, TokenSource

CACHE = CacheConfig(block_size=8, num_blocks=32)
SCHED = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=128)


class EchoExecutor(Executor):
    """Samples token 7 for every request that samples."""

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size

    def execute(self, scheduler_output) -> ExecutorOutput:
        return ExecutorOutput({s.request_id: [7] for s in scheduler_output.scheduled if s.samples})


def _req(rid: str, ids=(1, 2, 3), **params) -> EngineRequest:
    return EngineRequest(
        request_id=rid, prompt_token_ids=list(ids), params=SamplingParams(**params)
    )


def test_build_core_wires_limits_eos_sink_and_clock():
    events = []
    core = build_core(
        EchoExecutor(32, 8),
        CACHE,
        SCHED,
        vocab_size=10,
        eos_token_ids=(7,),
        event_sink=events.append,
        clock=lambda: 42.0,
    )
    assert (core.vocab_size, core.max_model_len, core.decode) == (10, 128, None)
    assert core.scheduler.eos_token_ids == frozenset({7})
    assert core.scheduler.config is SCHED and core.scheduler.kv.num_blocks == 32
    core.add_request(_req("a", range(8)))
    assert core.scheduler.requests["a"].arrival_time == 42.0
    outs = core.step()
    assert [(o.new_token_ids, o.finish_reason, o.text_delta) for o in outs] == [([7], "stop", "")]
    assert len(events) == 1  # the prompt's full block was stored


def test_build_core_rejects_an_executor_of_another_pool_size():
    with pytest.raises(ValueError, match="executor holds 16 blocks of 8 tokens"):
        build_core(EchoExecutor(16, 8), CACHE, SCHED, vocab_size=10)


def test_build_mock_core_is_the_mocker_without_eos():
    clock, events = (lambda: 5.0), []
    timing = PolynomialTiming(prefill=(0.0, 1.0, 0.0))
    core = build_mock_core(
        CACHE, SCHED, timing=timing, vocab_size=100, seed=3, event_sink=events.append, clock=clock
    )
    ex = core.executor
    assert isinstance(ex, MockExecutor) and ex.pacer is None and ex.timing is timing
    assert (ex.num_blocks, ex.block_size, ex.tokens.vocab_size, ex.tokens.seed) == (32, 8, 100, 3)
    assert core.scheduler.eos_token_ids == frozenset() and core.clock is clock
    assert core.vocab_size == 100 and core.decode is None
    core.add_request(_req("a", range(16), max_tokens=3))
    outs = [o for _ in range(3) for o in core.step()]
    assert [t for o in outs for t in o.new_token_ids] == TokenSource(100, 3).tokens("a", 16, 19)
    assert outs[-1].finish_reason == "length"
    assert ex.last_step_ms == timing.decode_ms(3 / 32)  # 18 tokens held: 3 blocks
    assert [len(e.blocks) for e in events] == [2]  # one Stored event: the 2 prompt blocks
    core.check_integrity()


def test_build_mock_core_paces_with_the_pacer_given():
    pacer = StepPacer(speedup_ratio=1e9)
    core = build_mock_core(CACHE, SCHED, pacer=pacer)
    core.add_request(_req("a", max_tokens=2))
    while core.has_unfinished_requests():
        core.step()
    assert core.executor.pacer is pacer and pacer.num_steps == 2


def test_build_async_engine_owns_the_core():
    async def run() -> list:
        engine = build_async_engine(build_mock_core(CACHE, SCHED), output_interval_s=0.0)
        assert isinstance(engine, AsyncEngine) and engine.output_interval_s == 0.0
        try:
            return [o async for o in engine.generate(_req("a", max_tokens=3))]
        finally:
            engine.shutdown()

    outs = asyncio.run(run())
    assert sum(len(o.new_token_ids) for o in outs) == 3 and outs[-1].finished


def test_builder_import_pulls_no_torch():
    code = "import sys, tokenmill.engine.builder; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---- the real model ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    from tokenmill.engine.loader import load_model

    return load_model(tiny_model_dir("smollm2"), dtype="fp32", device=TEST_DEVICE)


def test_build_real_core_sizes_the_pool_from_the_memory_budget(loaded):
    core = build_real_core(
        loaded, SCHED, block_size=4, kv_cache_memory=1 << 20, decode_group_size=2
    )
    expected = num_blocks_for_memory(1 << 20, loaded.config, 4, 4)
    runner = core.executor
    assert (runner.num_blocks, runner.block_size, core.scheduler.kv.num_blocks) == (
        expected,
        4,
        expected,
    )
    assert runner.attn.decode_group_size == 2
    assert core.scheduler.eos_token_ids == frozenset(loaded.tokenizer.eos_token_ids)
    assert core.vocab_size == loaded.config.vocab_size and core.decode is not None
    assert DEFAULT_KV_CACHE_MEMORY == 1 << 30


def test_build_real_core_text_or_ids_only(loaded):
    greedy = dict(temperature=0.0, max_tokens=4, ignore_eos=True)
    outs = {}
    for decode in (True, False):
        core = build_real_core(loaded, SCHED, cache=CacheConfig(4, 64), decode=decode)
        core.add_request(_req("a", (10, 11, 12), **greedy))
        outs[decode] = [o for _ in range(4) for o in core.step()]
        core.check_integrity()
    ids = [t for o in outs[True] for t in o.new_token_ids]
    assert ids == [t for o in outs[False] for t in o.new_token_ids]
    assert "".join(o.text_delta for o in outs[True]) == loaded.tokenizer.decode(ids)
    assert all(o.text_delta == "" for o in outs[False])
