"""In-process stacks served by uvicorn: a client that disconnects (streaming or not) aborts its
request and every block is freed (echo engine and the real engine); deadlines give 504;
no worker or a shedding router gives 503 with Retry-After."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from helpers.servers import InProcessServer

from tokenmill.core.errors import OverloadedError
from tokenmill.engine.tokenizer import Tokenizer
from tokenmill.frontend.app import FrontendConfig
from tokenmill.frontend.preprocess import ServedModel
from tokenmill.launch.stacks import assemble_local_stack as assemble_stack
from tokenmill.worker.echo_engine import EchoConfig, EchoEngine

LONG = {"model": "tiny", "prompt": "count with me " * 4, "max_tokens": 200}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir) -> Tokenizer:
    return Tokenizer.from_hf_dir(tiny_model_dir)


async def echo_stack(tokenizer, delay=0.005, policy=None, **config):
    engine = EchoEngine(EchoConfig(num_blocks=256, token_delay_s=delay))
    model = ServedModel("tiny", tokenizer, 256)
    return engine, await assemble_stack(engine, model, FrontendConfig(**config), policy)


async def until(predicate, timeout=10.0):
    """Polls ``predicate`` (state inside another component with no event to await)."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


async def read_then_disconnect(base: str, body: dict, num_lines: int) -> list[str]:
    lines = []
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line:
                    lines.append(line)
                if len(lines) == num_lines:
                    break
    return lines


async def test_streaming_disconnect_frees_blocks_echo(tokenizer):
    engine, stack = await echo_stack(tokenizer)
    async with InProcessServer(stack) as server:
        lines = await read_then_disconnect(server.base, LONG, 3)
        assert all(line.startswith("data: {") for line in lines)
        await asyncio.wait_for(stack.worker.wait_idle(), 10)
        assert engine.num_used_blocks == 0 and len(engine._allocated) == 0
        engine.check_integrity()


async def test_non_streaming_disconnect_frees_blocks(tokenizer):
    engine, stack = await echo_stack(tokenizer, delay=0.01)
    async with InProcessServer(stack) as server:
        async with httpx.AsyncClient(base_url=server.base, timeout=30) as client:
            task = asyncio.create_task(client.post("/v1/completions", json=LONG))
            await until(lambda: engine.num_used_blocks > 0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        await asyncio.wait_for(stack.worker.wait_idle(), 10)
        assert engine.num_used_blocks == 0
        engine.check_integrity()


async def test_streaming_disconnect_frees_blocks_real_engine(tiny_model_dir):
    from tokenmill.engine.builder import build_async_engine, build_real_core
    from tokenmill.engine.config import CacheConfig, SchedulerConfig
    from tokenmill.engine.loader import load_model

    loaded = load_model(tiny_model_dir, dtype="fp32", device="cpu")
    core = build_real_core(loaded, SchedulerConfig(max_model_len=256), cache=CacheConfig(16, 64))
    engine = build_async_engine(core)
    model = ServedModel("tiny", loaded.tokenizer, 256)
    stack = await assemble_stack(engine, model, FrontendConfig())
    async with InProcessServer(stack) as server:
        body = {**LONG, "ignore_eos": True}
        lines = await read_then_disconnect(server.base, body, 2)
        assert len(lines) == 2
        await asyncio.wait_for(stack.worker.wait_idle(), 10)
        await until(lambda: engine.stats()["num_running"] == 0 and engine.stats()["kv_usage"] == 0)
    engine.core.check_integrity()


async def test_deadline_gives_504_or_an_error_event(tokenizer):
    engine, stack = await echo_stack(tokenizer, delay=0.01, request_timeout_s=0.1)
    async with InProcessServer(stack) as server:
        async with httpx.AsyncClient(base_url=server.base, timeout=30) as client:
            r = await client.post("/v1/completions", json=LONG)
            assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
            r = await client.post("/v1/completions", json={**LONG, "stream": True})
            events = [ln for ln in r.text.splitlines() if ln.startswith("data: ")]
            assert '"code":"timeout"' in events[-2] and events[-1] == "data: [DONE]"
        assert engine.num_used_blocks == 0


class _Shed:
    async def select(self, request, instance_ids):
        raise OverloadedError("queue full", retry_after_s=3)

    def on_prefill_done(self, request_id):
        pass

    def on_finished(self, request_id):
        pass


async def test_shed_and_no_worker_give_503_with_retry_after(tokenizer):
    _, stack = await echo_stack(tokenizer, policy=_Shed())
    async with InProcessServer(stack) as server:
        async with httpx.AsyncClient(base_url=server.base, timeout=30) as client:
            r = await client.post("/v1/completions", json=LONG)
            assert (r.status_code, r.headers["retry-after"]) == (503, "3")
            assert r.json()["error"]["code"] == "overloaded"
            await stack.worker.stop()
            r = await client.post(
                "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}
            )
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert (await client.get("/health")).status_code == 503


async def test_a_huge_prompt_is_rejected_from_its_length_alone(tokenizer):
    """3.9 MB of chat content cannot fit 256 tokens: 400 from the length bound, not after
    seconds of tokenizing with the GIL held (the stall benchmark measures the streams)."""
    _, stack = await echo_stack(tokenizer)
    huge = {"model": "tiny", "messages": [{"role": "user", "content": "ab " * 1_300_000}]}
    async with InProcessServer(stack) as server:
        async with httpx.AsyncClient(base_url=server.base, timeout=30) as client:
            for path, body in (
                ("/v1/chat/completions", huge),
                ("/v1/completions", {"prompt": "ab " * 1_300_000}),
            ):
                r = await client.post(path, json=body)
                error = r.json()["error"]
                assert (r.status_code, error["code"]) == (400, "context_length_exceeded")
                assert "asks for at least" in error["message"]
