"""``AsyncEngine`` over the real ``ModelRunner`` (tiny fp32 model on ``TEST_DEVICE``): the
engine loop thread runs the model while the event loop streams; concurrent streams carry the
reference's greedy tokens. (test_async_engine.py covers the engine's API with a fake
executor.)"""

from __future__ import annotations

import asyncio

from helpers.tiny_models import TEST_DEVICE

from tokenmill.core.request import EngineRequest, FinishReason
from tokenmill.core.sampling import SamplingParams
from tokenmill.engine.builder import build_async_engine, build_real_core
from tokenmill.engine.config import CacheConfig, SchedulerConfig
from tokenmill.engine.loader import load_model
from tokenmill.engine.reference import greedy_generate


async def test_concurrent_streams_equal_reference_greedy(tiny_model_dir):
    loaded = load_model(tiny_model_dir("smollm2"), dtype="fp32", device=TEST_DEVICE)
    prompts = [[10, 11, 12], list(range(20, 37)), [5] * 9, [7]]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    cache, sched = CacheConfig(4, 64), SchedulerConfig(max_model_len=64)

    async def stream(engine, i):
        request = EngineRequest(request_id=f"r{i}", prompt_token_ids=prompts[i], params=params)
        return [out async for out in engine.generate(request)]

    async with build_async_engine(build_real_core(loaded, sched, cache=cache)) as engine:
        outs = await asyncio.gather(*(stream(engine, i) for i in range(len(prompts))))
    got = [[t for o in out for t in o.new_token_ids] for out in outs]
    assert got == greedy_generate(loaded.model, prompts, 6, eos_token_ids=())
    assert all(out[-1].finish_reason == FinishReason.LENGTH for out in outs)
