"""The whole path against tokenmill's own server (``tokenmill serve --engine mocker``): bench serve
over HTTP, token-id prompts, server-reported cached tokens. Slow (the server takes ~20 s to
start on the dev box), so marked ``slow``."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.procs import free_port

from tokenmill.bench.client import ClientConfig, HttpClient
from tokenmill.bench.serve import ServeBenchConfig, run_serve_bench
from tokenmill.bench.traces import SyntheticConfig, read_mooncake, synthetic_shared_prefix

pytestmark = pytest.mark.slow
TRACE = (
    Path(__file__).resolve().parents[3] / "shared" / "data" / "traces" / "conversation_trace.jsonl"
)
VOCAB = 49152  # SmolLM2, the server's default model


async def _wait_up(url: str, proc: subprocess.Popen, limit_s: float = 120.0) -> None:
    deadline = time.monotonic() + limit_s
    async with HttpClient(ClientConfig(url, "m")) as client:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                status, _ = await client.get_text("/v1/models", timeout_s=2.0)
                if status == 200:
                    return
            except Exception:  # noqa: BLE001 - not listening yet
                await asyncio.sleep(0.5)
    raise RuntimeError(f"tokenmill serve did not come up (exit code {proc.poll()})")


@pytest.fixture
async def tokenmill_server():
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from tokenmill.launch.cli import main; main()",
            "serve",
            "--engine",
            "mocker",
            "--port",
            str(port),
            "--mocker-speedup",
            "100",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        await _wait_up(url, proc)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


async def _run(url: str, requests, cfg: ServeBenchConfig) -> dict:
    client = ClientConfig(url, "SmolLM2-135M-Instruct", vocab_size=VOCAB)
    return (await run_serve_bench(requests, client, cfg))["summary"]


async def test_server_cache_hits_equal_the_trace_prefix_structure(tokenmill_server):
    # one request at a time: each prompt's blocks are cached before the next arrives, so the
    # server's reported hits must equal the trace's infinite-cache hits exactly (concurrent
    # requests of one prefix group miss blocks that are still being prefilled)
    sequential = ServeBenchConfig(mode="concurrency", concurrency=1, progress=False)
    synthetic = synthetic_shared_prefix(SyntheticConfig(num_requests=20, num_groups=4))
    summary = await _run(tokenmill_server, synthetic, sequential)
    assert summary["completed"] == 20 and summary["errors"] == {}
    assert summary["kv_reuse_ratio"] == pytest.approx(summary["ideal_prefix_hit_ratio"], abs=1e-12)
    assert summary["kv_reuse_ratio"] > 0.5
    if not TRACE.is_file():
        return
    cfg = ServeBenchConfig(mode="concurrency", concurrency=1, num_requests=16, progress=False)
    summary = await _run(tokenmill_server, read_mooncake(TRACE), cfg)
    # prompts longer than the model's 8192-token context are refused with 400
    assert set(summary["errors"]) <= {"http_400"} and summary["completed"] > 0
    assert summary["kv_reuse_ratio"] == pytest.approx(summary["ideal_prefix_hit_ratio"], abs=1e-12)


async def test_open_loop_schedule_runs_against_the_server(tokenmill_server):
    cfg = ServeBenchConfig(speed=4.0, window_s=(0.0, 12.0), progress=False)
    summary = await _run(tokenmill_server, read_mooncake(TRACE), cfg) if TRACE.is_file() else None
    if summary is None:
        pytest.skip("shared traces not present")
    assert set(summary["errors"]) <= {"http_400"} and summary["completed"] > 0
    assert summary["ttft"]["p50"] > 0 and summary["itl"]["mean"] > 0
