"""In-process stacks: queue time counts the wait for KV space (mocker, a 512-token pool), the
mocker rejects a seed the real sampler cannot take as the real engine does, preemptions
reach /metrics from the workers' load, ``protect_metrics`` puts /metrics behind the API key,
and ``max_tokens_default`` caps a chat request that sets no max_tokens."""

from __future__ import annotations

import asyncio

import httpx
import msgspec
import pytest
from helpers.servers import InProcessServer

from tokenmill.engine.tokenizer import Tokenizer
from tokenmill.frontend.app import FrontendConfig
from tokenmill.frontend.metrics import FrontendMetrics
from tokenmill.frontend.preprocess import ServedModel
from tokenmill.launch.engines import build_engine
from tokenmill.launch.specs import EngineSettings, EngineSpec
from tokenmill.launch.stacks import assemble_local_stack
from tokenmill.runtime.wire import WorkerLoad
from tokenmill.worker.echo_engine import EchoConfig, EchoEngine
from tokenmill.worker.protocol import load_from_stats

POOL = EngineSettings(
    block_size=16, num_blocks=32, max_num_batched_tokens=8192, max_num_seqs=256, watermark=0.0
)  # 512 tokens of KV


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir) -> Tokenizer:
    return Tokenizer.from_hf_dir(tiny_model_dir)


async def mocker_stack(model_dir, config: FrontendConfig | None = None):
    spec = EngineSpec("mocker", str(model_dir), settings=POOL, mocker_speedup=20.0)
    built = build_engine(spec)
    model = ServedModel("tiny", built.tokenizer, built.context_length)
    return built.engine, await assemble_local_stack(built.engine, model, config or FrontendConfig())


async def echo_stack(tokenizer, **config):
    model = ServedModel("tiny", tokenizer, 256)
    return await assemble_local_stack(EchoEngine(EchoConfig()), model, FrontendConfig(**config))


def long_request(i: int) -> dict:
    """200 prompt tokens (no prefix shared with another i) + 100 to generate: 300 of the pool's
    512 tokens, so two cannot both finish without one waiting for the other's blocks."""
    prompt = [5 + (i * 37 + k) % 250 for k in range(200)]
    return {"model": "tiny", "prompt": prompt, "max_tokens": 100, "ignore_eos": True}


async def test_queue_time_includes_the_wait_for_kv_blocks(tiny_model_dir):
    engine, stack = await mocker_stack(tiny_model_dir)
    async with InProcessServer(stack) as server:
        async with httpx.AsyncClient(base_url=server.base, timeout=60) as client:
            rs = await asyncio.gather(
                *(client.post("/v1/completions", json=long_request(i)) for i in range(4))
            )
        assert [r.status_code for r in rs] == [200] * 4
        metrics: FrontendMetrics = stack.app.front.metrics
        queue, ttft = metrics.queue_time.labels("tiny"), metrics.ttft.labels("tiny")
        assert sum(queue.counts) == sum(ttft.counts) == 4
        # TTFT is mostly waiting: the prefill of 200 tokens is ~1 ms at this speed-up
        assert 0.5 * ttft.sum < queue.sum <= ttft.sum
        num_preemptions = engine.stats()["num_preemptions"]
        text = metrics.render([load_from_stats("w1", engine.stats())]).decode()
        assert f'tokenmill_num_preemptions_total{{worker="w1"}} {float(num_preemptions)}' in text


async def test_mocker_rejects_a_seed_the_real_sampler_cannot_take(tiny_model_dir):
    _, stack = await mocker_stack(tiny_model_dir)
    async with InProcessServer(stack) as server:
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
        async with httpx.AsyncClient(base_url=server.base + "/v1", timeout=30) as client:
            bad = await client.post("/completions", json={**body, "seed": 2**80})
            ok = await client.post("/completions", json={**body, "seed": 2**64 - 1})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "seed"
    assert ok.status_code == 200


def test_preemptions_come_from_the_workers_load_and_old_loads_decode():
    assert load_from_stats("w", {"num_preemptions": 3}).num_preemptions == 3
    old = msgspec.json.decode(b'{"instance_id": "w", "num_running_requests": 1}', type=WorkerLoad)
    assert old.num_preemptions == 0
    loads = [WorkerLoad(instance_id="a", num_preemptions=3), old]
    text = FrontendMetrics().render(loads).decode()
    assert 'tokenmill_num_preemptions_total{worker="a"} 3.0' in text
    assert 'tokenmill_num_preemptions_total{worker="w"} 0.0' in text


async def test_protect_metrics_needs_the_key(tokenizer):
    stack = await echo_stack(tokenizer, api_key="k", protect_metrics=True)
    async with InProcessServer(stack) as server:
        async with httpx.AsyncClient(base_url=server.base, timeout=30) as client:
            refused = await client.get("/metrics")
            allowed = await client.get("/metrics", headers={"authorization": "bearer k"})
            wrong = await client.get("/metrics", headers={"authorization": "Bearer x"})
            health = await client.get("/health")
            model = await client.get("/v1/models/tiny", headers={"authorization": "BEARER k"})
    assert refused.status_code == wrong.status_code == 401
    assert refused.json()["error"]["code"] == "invalid_api_key"
    assert allowed.status_code == 200 and "tokenmill_requests_total" in allowed.text
    assert health.status_code == 200 and model.json()["id"] == "tiny"


async def test_unprotected_metrics_are_open_even_with_a_key(tokenizer):
    stack = await echo_stack(tokenizer, api_key="k")
    async with InProcessServer(stack) as server:
        async with httpx.AsyncClient(base_url=server.base, timeout=30) as client:
            assert (await client.get("/metrics")).status_code == 200
            assert (await client.get("/v1/models")).status_code == 401


@pytest.mark.parametrize(
    ("default", "asked", "expected"),
    [
        (3, None, 3),  # capped
        (3, 5, 5),  # the client's own max_tokens wins
        (None, None, None),  # the rest of the context (256 - prompt)
        (10_000, None, None),  # a cap beyond the context: the rest of the context
    ],
)
async def test_max_tokens_default_caps_chat_without_max_tokens(tokenizer, default, asked, expected):
    stack = await echo_stack(tokenizer, max_tokens_default=default)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    if asked is not None:
        body["max_tokens"] = asked
    async with InProcessServer(stack) as server:
        async with httpx.AsyncClient(base_url=server.base + "/v1", timeout=60) as client:
            r = await client.post("/chat/completions", json=body)
            comp = await client.post("/completions", json={"model": "tiny", "prompt": "hi"})
    usage = r.json()["usage"]
    want = 256 - usage["prompt_tokens"] if expected is None else expected
    assert (usage["completion_tokens"], r.json()["choices"][0]["finish_reason"]) == (want, "length")
    assert comp.json()["usage"]["completion_tokens"] == 16  # completions: OpenAI's default
