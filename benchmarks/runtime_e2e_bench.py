"""Requests/s through the frontend to mocker workers: ``tokenmill serve --workers 2`` (worker
processes over NATS discovery + the TCP request plane) against the single-process mode
(``tokenmill serve``, in-process runtime), same run, same client, at concurrency 32 and 128.

    python benchmarks/runtime_e2e_bench.py [--requests 1000] [--workers 2] [--runs 3]

Non-streaming completions, 16 output tokens, mocker speedup 1000 (steps cost ~nothing, so the
figure is the serving path's overhead). The two modes alternate for ``--runs`` rounds (fresh
servers each round); medians and every sample go to ``benchmarks/results/runtime_e2e.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
from serve_helpers import free_port

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "engine"))
CONCURRENCY = (32, 128)


def start_serve(model_dir: Path, workers: int) -> tuple[subprocess.Popen[str], str]:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "tokenmill",
        "--log-level",
        "WARNING",
        "serve",
        "--port",
        str(port),
        "--engine",
        "mocker",
        "--model",
        str(model_dir),
        "--served-model-name",
        "tiny",
        "--mocker-speedup",
        "1000",
        "--workers",
        str(workers),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("tokenmill: serving"):
            return proc, f"http://127.0.0.1:{port}/v1/completions"
    raise RuntimeError(f"serve exited {proc.wait()}")


async def one(session: aiohttp.ClientSession, url: str, i: int) -> None:
    body = {
        "model": "tiny",
        "prompt": f"request {i}: " + "word " * 20,
        "max_tokens": 16,
        "ignore_eos": True,
    }
    async with session.post(url, json=body) as r:
        assert r.status == 200, await r.text()
        await r.read()


async def measure(url: str, concurrency: int, num_requests: int) -> float:
    """Requests/s of ``num_requests`` with at most ``concurrency`` in flight."""
    counter = iter(range(num_requests))
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def client() -> None:
            for i in counter:
                await one(session, url, i)

        await asyncio.gather(*(client() for _ in range(min(concurrency, 64))))  # warm up
        counter = iter(range(num_requests))
        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return num_requests / (time.perf_counter() - start)


def run_mode(model_dir: Path, workers: int, num_requests: int) -> dict[int, float]:
    proc, url = start_serve(model_dir, workers)
    try:
        return {c: asyncio.run(measure(url, c, num_requests)) for c in CONCURRENCY}
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> None:
    from tiny_models import make_tiny_hf_model

    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    import statistics
    import tempfile

    model_dir = make_tiny_hf_model(Path(tempfile.mkdtemp()), "llama3")
    samples: dict[str, list[dict[int, float]]] = {"single": [], "workers": []}
    for _ in range(args.runs):
        samples["single"].append(run_mode(model_dir, 0, args.requests))
        samples["workers"].append(run_mode(model_dir, args.workers, args.requests))
    med = {
        mode: {c: statistics.median(s[c] for s in runs) for c in CONCURRENCY}
        for mode, runs in samples.items()
    }
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared with other jobs)",
        "requests_per_concurrency": args.requests,
        "workers": args.workers,
        "runs": args.runs,
        "single_process_rps_median": {str(c): round(v, 1) for c, v in med["single"].items()},
        "worker_processes_rps_median": {str(c): round(v, 1) for c, v in med["workers"].items()},
        "ratio_workers_to_single": {
            str(c): round(med["workers"][c] / med["single"][c], 3) for c in CONCURRENCY
        },
        "samples_rps": {
            mode: [{str(c): round(v, 1) for c, v in s.items()} for s in runs]
            for mode, runs in samples.items()
        },
    }
    out = REPO / "benchmarks" / "results" / "runtime_e2e.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
