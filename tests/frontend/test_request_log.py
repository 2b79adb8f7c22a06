"""``--request-log``: one JSON line per completion request with its stage times, status, token
counts and worker, for streamed, whole, rejected and abandoned requests; the ``serve`` flag
reaches the frontend."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from helpers.procs import running_server
from helpers.servers import InProcessServer
from test_disconnect_and_limits import LONG, echo_stack, read_then_disconnect, until

from tokenmill.engine.tokenizer import Tokenizer

BODY = {"model": "tiny", "prompt": "hello there", "max_tokens": 5}
STAGES = ["body", "routed", "first_token", "first_write", "end"]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir) -> Tokenizer:
    return Tokenizer.from_hf_dir(tiny_model_dir)


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def sse_payloads(text: str) -> list[dict]:
    data = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    return [json.loads(d) for d in data if d != "[DONE]"]


async def test_streamed_and_whole_requests_are_logged_with_ordered_stages(tokenizer, tmp_path):
    path = tmp_path / "requests.jsonl"
    _, stack = await echo_stack(tokenizer, delay=0.002, request_log=str(path))
    before = time.monotonic()
    async with InProcessServer(stack) as server:
        async with httpx.AsyncClient(base_url=server.base, timeout=30) as client:
            stream = {**BODY, "stream": True, "stream_options": {"include_usage": True}}
            streamed = await client.post("/v1/completions", json=stream)
            whole = await client.post("/v1/completions", json=BODY)
    after = time.monotonic()
    chunks = sse_payloads(streamed.text)
    usage = chunks[-1]["usage"]
    first, second = lines(path)

    assert first["id"] == chunks[0]["id"] and second["id"] == whole.json()["id"]
    assert first["endpoint"] == second["endpoint"] == "completions"
    assert first["status"] == second["status"] == 200
    assert first["error"] is None and second["error"] is None
    assert before <= first["arrival_monotonic"] <= second["arrival_monotonic"] <= after
    times = [first["ms"][s] for s in STAGES]
    assert times == sorted(times) and times[0] >= 0
    assert second["ms"]["first_write"] is None  # a whole response has no stream writes
    whole_times = [second["ms"][s] for s in STAGES if s != "first_write"]
    assert whole_times == sorted(whole_times)
    assert second["ms"]["end"] <= (after - second["arrival_monotonic"]) * 1e3
    for entry in (first, second):
        assert entry["prompt_tokens"] == usage["prompt_tokens"]
        assert entry["completion_tokens"] == usage["completion_tokens"] == 5
        assert entry["cached_tokens"] == usage["prompt_tokens_details"]["cached_tokens"]
        assert len(entry["workers"]) == 1 and entry["workers"][0]


async def test_rejected_request_is_logged_with_its_status(tokenizer, tmp_path):
    path = tmp_path / "requests.jsonl"
    _, stack = await echo_stack(tokenizer, request_log=str(path))
    async with InProcessServer(stack) as server:
        async with httpx.AsyncClient(base_url=server.base, timeout=30) as client:
            bad = await client.post("/v1/completions", json={**BODY, "max_tokens": "five"})
    assert bad.status_code == 400
    (entry,) = lines(path)
    assert entry["status"] == 400 and entry["error"]
    assert entry["id"] is None and entry["workers"] == []
    assert entry["ms"]["body"] is not None and entry["ms"]["end"] >= entry["ms"]["body"]
    assert entry["ms"]["routed"] is None and entry["ms"]["first_token"] is None


async def test_abandoned_stream_is_logged_as_client_disconnected(tokenizer, tmp_path):
    path = tmp_path / "requests.jsonl"
    engine, stack = await echo_stack(tokenizer, request_log=str(path))
    async with InProcessServer(stack) as server:
        await read_then_disconnect(server.base, LONG, 3)
        await until(lambda: path.exists() and path.read_text().strip())
        await asyncio.wait_for(stack.worker.wait_idle(), 10)
    (entry,) = lines(path)
    assert entry["status"] == 200 and entry["error"] == "client_disconnected"
    assert entry["ms"]["first_write"] is not None
    assert entry["completion_tokens"] == 0  # no choice finished
    assert engine.num_used_blocks == 0


def test_serve_flag_writes_the_log(tiny_model_dir, tmp_path):
    path = tmp_path / "serve.jsonl"
    args = (
        "--model",
        str(tiny_model_dir),
        "--engine",
        "echo",
        "--served-model-name",
        "tiny",
        "--request-log",
        str(path),
    )
    with running_server(*args) as server:
        reply = httpx.post(server.url + "/completions", json=BODY, timeout=30)
        assert reply.status_code == 200
    (entry,) = lines(path)
    assert entry["id"] == reply.json()["id"] and entry["completion_tokens"] == 5
