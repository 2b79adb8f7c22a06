"""Soak tests (``-m soak``, not in the default run):

- 10,000 streaming requests cancelled at random points against the mocker engine (real
  scheduler and block pool) leave 0 blocks in use, an intact pool, and no growth in tasks or
  traced memory between the first and the last thousand;
- 10,000 requests at concurrency 256 against a `tokenmill serve --engine mocker` process
  finish with 0 errors.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import random
import tracemalloc

import aiohttp
import pytest
from helpers.procs import running_server
from helpers.servers import InProcessServer

from tokenmill.frontend.app import FrontendConfig
from tokenmill.frontend.preprocess import ServedModel
from tokenmill.launch.engines import build_engine
from tokenmill.launch.specs import MOCKER_DEFAULTS, EngineSpec
from tokenmill.launch.stacks import assemble_local_stack as assemble_stack

pytestmark = pytest.mark.soak
NUM_REQUESTS = 10_000


# 1,024 blocks of 64 tokens: the prefix cache (which grows until the pool is full) fills in the
# first thousand requests. With the mocker's default 16,384 blocks it was still filling at the
# end of the run, and its growth (the cached blocks' hash entries) read as a leak.
POOL = dataclasses.replace(MOCKER_DEFAULTS, num_blocks=1024)


def mocker_spec(model_dir, speedup: float) -> EngineSpec:
    return EngineSpec("mocker", str(model_dir), settings=POOL, mocker_speedup=speedup)


async def stream_and_cancel(session, url: str, i: int, rng: random.Random) -> None:
    body = {
        "prompt": f"request {i} " + "word " * rng.randint(1, 60),
        "max_tokens": 64,
        "stream": True,
        "ignore_eos": True,
    }
    stop_after = rng.randint(0, 70)  # > 64 chunks: runs to the end
    async with session.post(url, json=body) as r:
        seen = 0
        async for _ in r.content:
            seen += 1
            if seen >= stop_after:
                break


async def test_random_cancellations_leak_nothing(tiny_model_dir):
    built = build_engine(mocker_spec(tiny_model_dir, 200.0))
    model = ServedModel("tiny", built.tokenizer, built.context_length)
    stack = await assemble_stack(built.engine, model, FrontendConfig())
    rng = random.Random(0)
    tracemalloc.start()
    async with InProcessServer(stack) as server:
        url = server.base + "/v1/completions"
        conn = aiohttp.TCPConnector(limit=64, force_close=True)
        async with aiohttp.ClientSession(connector=conn) as session:
            snapshots = []
            sem = asyncio.Semaphore(64)

            async def one(i: int) -> None:
                async with sem:
                    await stream_and_cancel(session, url, i, rng)

            for batch in range(NUM_REQUESTS // 1000):
                await asyncio.gather(*[one(batch * 1000 + i) for i in range(1000)])
                await asyncio.wait_for(stack.worker.wait_idle(), 30)
                async with asyncio.timeout(30):
                    while built.engine.stats()["num_running"] or built.engine.stats()["kv_usage"]:
                        await asyncio.sleep(0.01)
                gc.collect()
                snapshots.append((len(asyncio.all_tasks()), tracemalloc.get_traced_memory()[0]))
    tracemalloc.stop()
    built.engine.core.check_integrity()
    print("tasks, traced bytes per 1000 requests:", snapshots)
    assert snapshots[-1][0] <= snapshots[0][0]
    # The engine's prefix cache fills its pool during the first few thousand requests; after
    # that, memory must stay flat (a leak of even 100 bytes per request would show).
    growth = snapshots[-1][1] - snapshots[len(snapshots) // 2][1]
    assert growth < 512 * 1024, snapshots
    await_free = built.engine.stats()
    assert await_free["kv_usage"] == 0 and await_free["num_running"] == 0
    built.engine.shutdown()


def test_ten_thousand_requests_at_concurrency_256_have_no_errors(tiny_model_dir):
    async def run(url: str) -> list[str]:
        errors: list[str] = []
        sem = asyncio.Semaphore(256)
        conn = aiohttp.TCPConnector(limit=256)
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(300)) as s:

            async def one(i: int) -> None:
                body = {
                    "prompt": f"soak {i} " + "tok " * (i % 50),
                    "max_tokens": 16,
                    "stream": i % 2 == 0,
                    "ignore_eos": True,
                }
                async with sem:
                    try:
                        async with s.post(url, json=body) as r:
                            text = await r.text()
                            if r.status != 200 or '"error"' in text:
                                errors.append(f"{r.status}: {text[:200]}")
                    except aiohttp.ClientError as e:
                        errors.append(repr(e))

            await asyncio.gather(*[one(i) for i in range(NUM_REQUESTS)])
        return errors

    with running_server(
        "--model", str(tiny_model_dir), "--engine", "mocker", "--mocker-speedup", "100"
    ) as server:
        errors = asyncio.run(run(server.url + "/completions"))
    assert errors == []
