"""The multi-machine commands as separate processes on one host: ``tokenmill worker`` x2,
``tokenmill router`` (standalone KV router) and ``tokenmill frontend --remote-router``, over a
test-owned nats-server. The frontend learns the models (name, context length, tokenizer) from
the workers' model cards only, serves each model that has a live worker (a third worker serves
a second model), and a long repeated prompt goes to the worker holding it."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
from helpers.procs import Proc, free_port

from tokenmill.launch.specs import MOCKER_DEFAULTS


async def test_worker_router_frontend_processes_serve_with_kv_routing(nats_server, tiny_model_dir):
    nats = ("--nats", nats_server.url)
    procs: list[Proc] = []
    try:
        for _ in range(2):
            procs.append(
                Proc(
                    "worker",
                    *nats,
                    "--engine",
                    "mocker",
                    "--model",
                    str(tiny_model_dir),
                    "--served-model-name",
                    "tiny",
                    "--mocker-speedup",
                    "100",
                )
            )
        procs.append(Proc("router", *nats, "--router-mode", "kv"))
        port = free_port()
        procs.append(Proc("frontend", *nats, "--port", str(port), "--remote-router"))
        for proc, text in zip(procs, ("ready", "ready", "ready", "serving"), strict=True):
            proc.wait_for(text)
        other = Proc(
            "worker",
            *nats,
            "--engine",
            "mocker",
            "--model",
            str(tiny_model_dir),
            "--served-model-name",
            "other",
            "--context-length",
            "4096",
        )
        procs.append(other.wait_for("ready"))
        url = f"http://127.0.0.1:{port}/v1"
        body = {"model": "tiny", "prompt": "a long shared system prompt " * 60, "max_tokens": 4}
        async with httpx.AsyncClient(timeout=60.0) as client:
            models = await _models_when(client, url, lambda ids: len(ids) == 2)
            usages = []
            for _ in range(4):
                usages.append((await client.post(url + "/completions", json=body)).json()["usage"])
                await asyncio.sleep(0.1)  # KV events reach the router in 10 ms batches
            r = await client.post(url + "/completions", json={**body, "model": "other"})
            assert r.status_code == 200 and r.json()["model"] == "other"
            os.kill(other.proc.pid, signal.SIGKILL)
            await _models_when(client, url, lambda ids: ids == ["tiny"])
    finally:
        codes = [p.stop() for p in reversed(procs[:4])]
        if len(procs) > 4:
            procs[4].stop()
    assert sorted((m["id"], m["max_model_len"]) for m in models) == [
        ("other", 4096),
        ("tiny", 131072),
    ]
    prompt = usages[0]["prompt_tokens"]
    assert usages[0]["prompt_tokens_details"]["cached_tokens"] == 0
    for usage in usages[1:]:
        block = MOCKER_DEFAULTS.block_size  # the workers' (no --block-size given)
        assert usage["prompt_tokens_details"]["cached_tokens"] >= prompt // block * block - block
    assert codes == [0, 0, 0, 0]


async def _models_when(client: httpx.AsyncClient, url: str, ok, timeout_s: float = 20.0):
    """Polls /v1/models until ``ok(sorted ids)``; returns the listing."""
    deadline = time.monotonic() + timeout_s
    while True:
        models = (await client.get(url + "/models")).json()["data"]
        if ok(sorted(m["id"] for m in models)):
            return models
        assert time.monotonic() < deadline, models
        await asyncio.sleep(0.1)
