"""Worker processes behind one frontend (``tokenmill serve --workers 2 --engine mocker``):
kill -9 and SIGTERM mid-stream, NATS restart, no worker left, no orphans after exit.

Mocker tokens are a function of (request id, position), so a stream migrated to another
worker (prompt + generated tokens resent under the same id) must produce exactly the text of
an uninterrupted run, which ``expected_text`` computes from the response id.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time

import httpx
import pytest
from helpers.procs import Serve, expected_text, pid_gone

from tokenmill.launch.specs import MOCKER_DEFAULTS
from tokenmill.runtime.interface import EndpointId
from tokenmill.runtime.nats_runtime import NatsRuntime

NUM_STREAMS = 6
MAX_TOKENS = 120
MOCKER_SPEEDUP = "0.5"  # ~3 s per stream on the dev box: long enough to kill mid-stream
ENDPOINT = EndpointId("tokenmill", "backend", "generate")


class StreamResult:
    def __init__(self) -> None:
        self.id = ""
        self.text = ""
        self.chunks = 0
        self.finish: str | None = None
        self.prompt_tokens = 0
        self.errors: list[dict] = []
        self.started = asyncio.Event()


async def stream_one(client: httpx.AsyncClient, url: str, i: int, result: StreamResult) -> None:
    body = {
        "model": "tiny",
        "prompt": f"story number {i}:",
        "max_tokens": MAX_TOKENS,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with client.stream("POST", url + "/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            _apply(json.loads(line[6:]), result)


def _apply(chunk: dict, result: StreamResult) -> None:
    if "error" in chunk:
        result.errors.append(chunk["error"])
        return
    result.id = chunk["id"]
    if chunk.get("usage"):
        result.prompt_tokens = chunk["usage"]["prompt_tokens"]
    for choice in chunk["choices"]:
        result.text += choice["text"]
        result.finish = choice["finish_reason"] or result.finish
        result.chunks += 1
        if result.chunks >= 3:
            result.started.set()


async def run_streams(url: str, disrupt) -> list[StreamResult]:
    """NUM_STREAMS concurrent streams; ``disrupt()`` runs once every stream is under way."""
    results = [StreamResult() for _ in range(NUM_STREAMS)]
    async with httpx.AsyncClient(timeout=60.0) as client:
        tasks = [asyncio.create_task(stream_one(client, url, i, r)) for i, r in enumerate(results)]
        await asyncio.wait_for(asyncio.gather(*(r.started.wait() for r in results)), 60)
        await disrupt()
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
    return results


def check_uninterrupted(results: list[StreamResult], tokenizer) -> None:
    for r in results:
        assert r.errors == []
        assert r.finish == "length"
        assert r.text == expected_text(tokenizer, r.id, r.prompt_tokens, MAX_TOKENS)


async def removal_watch(nats_url: str):
    runtime = await NatsRuntime.connect(nats_url)
    watch = runtime.client(ENDPOINT).watch()
    return runtime, watch


async def wait_removed(watch, count: int) -> None:
    async for event in watch:
        if event.kind == "removed":
            count -= 1
            if count == 0:
                return


async def test_kill9_mid_stream_migrates_then_no_worker_is_a_clean_error(
    nats_server, tiny_model_dir, tokenizer
):
    serve = Serve(
        tiny_model_dir,
        2,
        "--nats",
        nats_server.url,
        "--worker-restarts",
        "0",
        "--mocker-speedup",
        MOCKER_SPEEDUP,
    ).wait_ready()
    runtime, watch = await removal_watch(nats_server.url)
    killed_at: list[float] = []
    try:

        async def kill_one() -> None:
            os.kill(serve.worker_pids[0], signal.SIGKILL)
            killed_at.append(time.monotonic())

        results = await run_streams(serve.url, kill_one)
        check_uninterrupted(results, tokenizer)
        await asyncio.wait_for(wait_removed(watch, 1), 15)
        removal_s = time.monotonic() - killed_at[0]
        print(f"worker removed from discovery {removal_s:.2f} s after SIGKILL")
        assert removal_s < 10.0
        os.kill(serve.worker_pids[1], signal.SIGKILL)
        await _expect_clean_error(serve.url)
        await _expect_model_unlisted(serve.url)
    finally:
        await watch.aclose()
        await runtime.shutdown()
        serve.stop()
    migrated = "".join(serve.output).count("migrating after")
    print(f"{migrated} of {NUM_STREAMS} streams migrated")
    assert migrated >= NUM_STREAMS // 2  # round robin put half of them on the killed one


async def _expect_model_unlisted(url: str, timeout_s: float = 15.0) -> None:
    """Once the last worker's lease expires, /v1/models lists nothing."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=10.0) as client:
        while (await client.get(url + "/models")).json()["data"]:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)


async def _expect_clean_error(url: str) -> None:
    """With no worker left, a streaming request ends (503 or an SSE error), never hangs."""
    body = {"model": "tiny", "prompt": "anyone there?", "max_tokens": 8, "stream": True}
    async with httpx.AsyncClient(timeout=30.0) as client:
        async with client.stream("POST", url + "/completions", json=body) as r:
            text = (await r.aread()).decode()
    assert r.status_code == 503 or '"error"' in text


async def test_sigterm_drains_and_nats_restart_resumes(nats_server, tiny_model_dir, tokenizer):
    """SIGTERM on a worker with a 1 s drain timeout (``--shutdown-timeout`` is passed to the
    workers): what does not finish in time is evicted and migrated, with no client error."""
    serve = Serve(
        tiny_model_dir,
        2,
        "--nats",
        nats_server.url,
        "--shutdown-timeout",
        "1",
        "--mocker-speedup",
        MOCKER_SPEEDUP,
    ).wait_ready()
    try:

        async def terminate_one() -> None:
            os.kill(serve.worker_pids[0], signal.SIGTERM)

        check_uninterrupted(await run_streams(serve.url, terminate_one), tokenizer)

        async def restart_nats() -> None:
            await asyncio.to_thread(nats_server.restart, True)

        check_uninterrupted(await run_streams(serve.url, restart_nats), tokenizer)
        await _expect_ok_after_reconnect(serve.url)
    finally:
        serve.stop()
    output = "".join(serve.output)
    evicted = [int(n) for n in re.findall(r"stopped \((\d+) requests evicted\)", output)]
    assert max(evicted) >= 1  # the drain timeout passed with streams still running
    # Only the evicted streams migrated: the NATS restart cut no TCP-plane stream.
    assert output.count("migrating after") == sum(evicted)


async def _expect_ok_after_reconnect(url: str, timeout_s: float = 30.0) -> None:
    body = {"model": "tiny", "prompt": "after the outage", "max_tokens": 4}
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=30.0) as client:
        while True:
            r = await client.post(url + "/completions", json=body)
            if r.status_code == 200:
                assert r.json()["usage"]["completion_tokens"] == 4
                return
            assert time.monotonic() < deadline, r.text
            await asyncio.sleep(0.2)


@pytest.mark.timeout(120)
def test_serve_with_workers_leaves_no_orphans(tiny_model_dir):
    serve = Serve(tiny_model_dir, 2).wait_ready()
    pids = [*serve.worker_pids, serve.nats_pid]
    assert None not in pids and len(pids) == 3
    assert serve.stop() == 0
    deadline = time.monotonic() + 10.0
    while not all(pid_gone(pid) for pid in pids):
        assert time.monotonic() < deadline, [p for p in pids if not pid_gone(p)]
        time.sleep(0.05)


async def test_long_repeated_prompt_goes_to_the_worker_holding_it(nats_server, tiny_model_dir):
    serve = Serve(
        tiny_model_dir,
        2,
        "--nats",
        nats_server.url,
        "--router-mode",
        "kv",
        "--mocker-speedup",
        "100",
    ).wait_ready()
    body = {"model": "tiny", "prompt": "the same long document " * 80, "max_tokens": 4}
    try:
        async with httpx.AsyncClient(timeout=60.0) as client:
            usages = []
            for _ in range(5):
                r = await client.post(serve.url + "/completions", json=body)
                assert r.status_code == 200, r.text
                usages.append(r.json()["usage"])
                # KV events reach the router in batches (KvPublisherConfig.flush_interval_s,
                # 10 ms): a repeat sent at once could beat the Stored events of its prefix.
                await asyncio.sleep(0.1)
    finally:
        serve.stop()
    prompt = usages[0]["prompt_tokens"]
    assert prompt > 256
    assert usages[0]["prompt_tokens_details"]["cached_tokens"] == 0
    # Every repeat went to the worker holding the prompt (the other one holds nothing).
    for usage in usages[1:]:
        block = MOCKER_DEFAULTS.block_size  # the workers' (no --block-size given)
        assert usage["prompt_tokens_details"]["cached_tokens"] >= prompt // block * block - block


@pytest.mark.slow
async def test_kill9_mid_stream_real_model_fp32_greedy(nats_server, tiny_model_dir):
    """The real engine (tiny llama, fp32, greedy): migrated streams equal an uninterrupted
    greedy run of the same prompt."""
    serve = Serve(
        tiny_model_dir,
        2,
        "--nats",
        nats_server.url,
        "--engine",
        "real",
        "--dtype",
        "fp32",
        "--device",
        "cpu",
    )
    serve.wait_ready()
    body = {
        "model": "tiny",
        "prompt": "def add(a, b):",
        "max_tokens": 200,
        "stream": True,
        "temperature": 0.0,
        "ignore_eos": True,
    }
    try:
        reference = StreamResult()
        async with httpx.AsyncClient(timeout=120.0) as client:
            await _stream_body(client, serve.url, body, reference)
        results = [StreamResult() for _ in range(4)]
        async with httpx.AsyncClient(timeout=120.0) as client:
            tasks = [asyncio.create_task(_stream_body(client, serve.url, body, r)) for r in results]
            await asyncio.wait_for(asyncio.gather(*(r.started.wait() for r in results)), 60)
            os.kill(serve.worker_pids[0], signal.SIGKILL)
            await asyncio.wait_for(asyncio.gather(*tasks), 120)
    finally:
        serve.stop()
    assert "".join(serve.output).count("migrating after") >= 1
    for r in results:
        assert r.errors == [] and r.finish == "length"
        assert r.text == reference.text


async def _stream_body(client: httpx.AsyncClient, url: str, body: dict, result: StreamResult):
    async with client.stream("POST", url + "/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                _apply(json.loads(line[6:]), result)
