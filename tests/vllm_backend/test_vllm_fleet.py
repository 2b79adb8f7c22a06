"""``tokenmill serve --workers 2 --engine vllm``: two vLLM worker processes behind our
frontend over an embedded NATS; one is killed (SIGKILL, vLLM's engine process with it)
mid-stream and every stream still completes, migrated to the other worker, with the full
token count and no error. Skipped where vLLM is not importable."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here: run `make test-vllm`")

from helpers.procs import REPO, free_port, pid_gone  # noqa: E402

READY = re.compile(r"tokenmill: serving .*worker pids ([\d ]+)\)")
NUM_STREAMS = 4
MAX_TOKENS = 60


@pytest.fixture(scope="module")
def fleet():
    port = free_port()
    cmd = [sys.executable, "-m", "tokenmill", "--log-level", "WARNING", "serve"]
    cmd += ["--port", str(port), "--workers", "2", "--engine", "vllm", "--context-length", "2048"]
    cmd += ["--served-model-name", "smol", "--worker-restarts", "0"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    output, pids = [], []
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            pytest.fail(f"serve exited {proc.wait()}: {''.join(output)[-4000:]}")
        output.append(line)
        if match := READY.search(line):
            pids = [int(p) for p in match.group(1).split()]
            break
    assert pids, "".join(output)[-4000:]
    yield f"http://127.0.0.1:{port}/v1", pids
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in pids:
            if not pid_gone(pid):
                os.kill(pid, signal.SIGKILL)


async def stream(client, url, i, started, results):
    body = {
        "model": "smol",
        "prompt": f"Story number {i}: once upon a time",
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    chunks, errors, finish, usage = 0, [], None, None
    async with client.stream("POST", url + "/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if "error" in data:
                errors.append(data["error"])
                continue
            if data.get("usage"):
                usage = data["usage"]
            for choice in data.get("choices", []):
                chunks += 1
                finish = choice.get("finish_reason") or finish
                if chunks == 3:
                    started.release()
    results[i] = (finish, usage, errors)


async def test_kill_a_vllm_worker_mid_stream_migrates(fleet):
    url, pids = fleet
    async with httpx.AsyncClient(timeout=300) as client:
        # warm-up: both workers answer (round robin)
        for _ in range(2):
            r = await client.post(
                url + "/completions", json={"model": "smol", "prompt": "hi", "max_tokens": 2}
            )
            assert r.status_code == 200, r.text
        started = asyncio.Semaphore(0)
        results: dict[int, tuple] = {}
        tasks = [
            asyncio.create_task(stream(client, url, i, started, results))
            for i in range(NUM_STREAMS)
        ]
        for _ in range(NUM_STREAMS):
            await started.acquire()  # every stream is producing tokens
        os.kill(pids[0], signal.SIGKILL)
        await asyncio.gather(*tasks)
    for finish, usage, errors in results.values():
        assert errors == [] and finish == "length"
        assert usage["completion_tokens"] == MAX_TOKENS
    assert pid_gone(pids[0])
