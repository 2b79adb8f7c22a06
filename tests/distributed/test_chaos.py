"""Chaos (slow): workers killed with SIGKILL and replaced while 12 streams run through a
``tokenmill frontend`` process; every stream completes with the text of an uninterrupted run."""

from __future__ import annotations

import asyncio
import os
import signal

import httpx
import pytest
from helpers.procs import Proc, expected_text, free_port
from test_failover import StreamResult, stream_one

pytestmark = pytest.mark.slow
NUM_STREAMS, MAX_TOKENS, ROUNDS = 12, 120, 4


def start_worker(nats_url: str, model_dir) -> Proc:
    return Proc(
        "worker",
        "--nats",
        nats_url,
        "--engine",
        "mocker",
        "--model",
        str(model_dir),
        "--served-model-name",
        "tiny",
        "--mocker-speedup",
        "0.06",
    ).wait_for("ready")


async def test_workers_killed_and_replaced_mid_run(nats_server, tiny_model_dir, tokenizer):
    workers = [start_worker(nats_server.url, tiny_model_dir) for _ in range(3)]
    port = free_port()
    frontend = Proc(
        "frontend",
        "--nats",
        nats_server.url,
        "--port",
        str(port),
        "--migration-limit",
        str(ROUNDS + 1),
    ).wait_for("serving")
    url = f"http://127.0.0.1:{port}/v1"
    results = [StreamResult() for _ in range(NUM_STREAMS)]
    try:
        async with httpx.AsyncClient(timeout=120.0) as client:
            tasks = [
                asyncio.create_task(stream_one(client, url, i, r)) for i, r in enumerate(results)
            ]
            await asyncio.wait_for(asyncio.gather(*(r.started.wait() for r in results)), 60)
            for _ in range(ROUNDS):
                victim = workers.pop(0)
                os.kill(victim.proc.pid, signal.SIGKILL)
                victim.stop()
                workers.append(
                    await asyncio.to_thread(start_worker, nats_server.url, tiny_model_dir)
                )
            await asyncio.wait_for(asyncio.gather(*tasks), 180)
    finally:
        frontend.stop()
        for w in workers:
            w.stop()
    migrations = "".join(frontend.output).count("migrating after")
    print(f"{migrations} migrations over {ROUNDS} kills")
    assert migrations >= ROUNDS  # every kill hit running streams
    for r in results:
        assert r.errors == [] and r.finish == "length"
        assert r.text == expected_text(tokenizer, r.id, r.prompt_tokens, MAX_TOKENS)
