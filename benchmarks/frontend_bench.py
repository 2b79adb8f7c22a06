"""Serving overhead of `tokenmill serve`: streaming chat, unique ~128-token prompts, 32 output
tokens, at concurrency 1, 32 and 128, against a zero-cost engine (``--engine echo``: the
frontend + transport + worker path alone) and the mocker at a high speedup (its scheduler
thread shares the process). Reports requests/s, TTFT and E2E percentiles and the server
process's CPU time per request (utime + stime from /proc, so the load generator's CPU is not
counted), and writes ``benchmarks/results/frontend.json``.

Reference (issue 5): Dynamo 1.6.1's Rust frontend, 1.6 ms CPU/request at c=32 and 0.95 ms at
c=128 on this machine kind. The load generator (aiohttp) shares the 2 cores with the server.

    python benchmarks/frontend_bench.py [--engines echo,mocker] [--requests-scale 1.0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
from serve_helpers import free_port

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "frontend.json"
CONCURRENCY = (1, 32, 128)
NUM_REQUESTS = {1: 200, 32: 1600, 128: 3200}
OUTPUT_TOKENS = 32
WORDS_PER_PROMPT = 100  # ~128 tokens with SmolLM2's tokenizer and the chat template
CLK_TCK = os.sysconf("SC_CLK_TCK")
VOCAB = (
    "time person year way day thing man world life hand part child eye woman place work "
    "week case point government company number group problem fact be have do say get make "
    "go know take see come think look want give use find tell ask seem feel try leave call "
    "good new first last long great little own other old right big high different small "
    "large next early young important few public bad same able"
).split()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def start_server(engine: str, port: int) -> subprocess.Popen:
    args = [
        sys.executable,
        "-m",
        "tokenmill",
        "--log-level",
        "WARNING",
        "serve",
        "--port",
        str(port),
        "--engine",
        engine,
        "--mocker-speedup",
        "1000",
    ]

    # echo/mocker: no torch threads needed; the real model gets the default thread count
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if engine != "real" else dict(os.environ)
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)


async def wait_healthy(base: str, proc: subprocess.Popen) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(2400):
            if proc.poll() is not None:
                raise RuntimeError(f"server exited {proc.returncode}")
            try:
                async with session.get(base + "/health") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError("server never became healthy")


def prompt(rng: random.Random, i: int) -> str:
    return f"request {i}: " + " ".join(rng.choice(VOCAB) for _ in range(WORDS_PER_PROMPT))


async def one_request(session, url: str, text: str) -> dict:
    body = {
        "model": None,
        "messages": [{"role": "user", "content": text}],
        "stream": True,
        "max_tokens": OUTPUT_TOKENS,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    body.pop("model")
    start = time.perf_counter()
    ttft, usage, chunks = None, None, 0
    async with session.post(url, json=body) as r:
        assert r.status == 200, await r.text()
        async for raw in r.content:
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            data = json.loads(line[6:])
            if data.get("usage"):
                usage = data["usage"]
            if data["choices"] and data["choices"][0]["delta"].get("content"):
                chunks += 1
                ttft = ttft if ttft is not None else time.perf_counter() - start
    e2e = time.perf_counter() - start
    itl = (e2e - ttft) / (chunks - 1) if ttft is not None and chunks > 1 else 0.0
    return {
        "ttft": ttft or 0.0,
        "e2e": e2e,
        "itl": itl,
        "usage": usage,
        "chunks": chunks,
    }


async def run_level(base: str, pid: int, concurrency: int, num: int, seed: int) -> dict:
    rng = random.Random(seed)
    texts = [prompt(rng, seed * 100000 + i) for i in range(num)]
    url = base + "/v1/chat/completions"
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(600)) as s:
        queue = list(reversed(texts))
        results: list[dict] = []

        async def client() -> None:
            while queue:
                results.append(await one_request(s, url, queue.pop()))

        await asyncio.gather(*[one_request(s, url, "warm up") for _ in range(min(concurrency, 8))])
        cpu0, t0 = cpu_seconds(pid), time.perf_counter()
        await asyncio.gather(*[client() for _ in range(concurrency)])
        wall, cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0
    return summarize(concurrency, results, wall, cpu)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def summarize(concurrency: int, results: list[dict], wall: float, cpu: float) -> dict:
    ttft = [r["ttft"] * 1000 for r in results]
    e2e = [r["e2e"] * 1000 for r in results]
    out_tokens = [r["usage"]["completion_tokens"] for r in results]
    return {
        "concurrency": concurrency,
        "num_requests": len(results),
        "requests_per_s": round(len(results) / wall, 1),
        "output_tokens_per_s": round(sum(out_tokens) / wall, 1),
        "mean_prompt_tokens": round(
            statistics.mean(r["usage"]["prompt_tokens"] for r in results), 1
        ),
        "mean_output_tokens": round(statistics.mean(out_tokens), 1),
        "ttft_ms": {
            q: round(pct(ttft, v), 2) for q, v in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))
        },
        "e2e_ms": {
            q: round(pct(e2e, v), 2) for q, v in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))
        },
        "itl_ms_mean": round(statistics.mean(r["itl"] for r in results) * 1000, 2),
        "server_cpu_ms_per_request": round(cpu * 1000 / len(results), 3),
        "server_cpu_utilization": round(cpu / wall, 2),
    }


async def bench_engine(
    engine: str, scale: float, levels_n: dict[int, int] | None = None
) -> list[dict]:
    port = free_port()
    proc = start_server(engine, port)
    base = f"http://127.0.0.1:{port}"
    levels_n = levels_n or {c: max(c, int(NUM_REQUESTS[c] * scale)) for c in CONCURRENCY}
    try:
        await wait_healthy(base, proc)
        levels = []
        for i, (c, num) in enumerate(levels_n.items()):
            level = await run_level(base, proc.pid, c, num, i + 1)
            print(engine, json.dumps(level), flush=True)
            levels.append(level)
        return levels
    finally:
        proc.terminate()
        proc.wait(60)


DEFAULT_MODEL_LEVELS = {1: 2, 8: 8, 32: 32}


def offline_tokens_per_s(concurrency: int, seed: int) -> float:
    """The engine alone (``LLM``, no HTTP) on the same kind of prompts, one batch of
    ``concurrency`` requests: output tokens per second."""
    from tokenmill.core.sampling import SamplingParams
    from tokenmill.engine.llm import LLM

    global _LLM
    if _LLM is None:
        _LLM = LLM()
    rng = random.Random(seed)
    prompts = [
        [{"role": "user", "content": prompt(rng, seed * 100000 + i)}] for i in range(concurrency)
    ]
    texts = [_LLM.tokenizer.apply_chat_template(p) for p in prompts]
    params = SamplingParams(max_tokens=OUTPUT_TOKENS, ignore_eos=True)
    start = time.perf_counter()
    results = _LLM.generate(texts, params)
    wall = time.perf_counter() - start
    return sum(len(r.token_ids) for r in results) / wall


_LLM = None


def bench_default_model() -> dict:
    """HTTP against the engine's offline numbers with the default model (the ratio of output
    tokens/s is the serving overhead)."""
    import torch

    torch.set_num_threads(2)
    http = asyncio.run(bench_engine("real", 1.0, DEFAULT_MODEL_LEVELS))
    offline = {
        c: round(offline_tokens_per_s(c, i + 1), 1) for i, c in enumerate(DEFAULT_MODEL_LEVELS)
    }
    for level in http:
        c = level["concurrency"]
        level["offline_output_tokens_per_s"] = offline[c]
        level["http_over_offline_tokens_per_s"] = round(
            level["output_tokens_per_s"] / offline[c], 3
        )
    return {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized, dtype auto)", "levels": http}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", default="echo,mocker")
    parser.add_argument("--requests-scale", type=float, default=1.0)
    parser.add_argument("--default-model", action="store_true", help="also HTTP vs offline")
    parser.add_argument(
        "--only-default-model",
        action="store_true",
        help="run only HTTP vs offline with the default model; merge it into the results file",
    )
    args = parser.parse_args()
    if args.only_default_model:
        out = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        out["default_model_http_vs_offline"] = bench_default_model()
        RESULTS.write_text(json.dumps(out, indent=2) + "\n")
        print(json.dumps(out["default_model_http_vs_offline"]))
        return
    results = {
        e: asyncio.run(bench_engine(e, args.requests_scale)) for e in args.engines.split(",")
    }
    reference = {"dynamo_1.6.1_cpu_ms_per_request": {"32": 1.6, "128": 0.95}}
    ratios = {
        e: {
            str(lv["concurrency"]): round(
                lv["server_cpu_ms_per_request"]
                / reference["dynamo_1.6.1_cpu_ms_per_request"][str(lv["concurrency"])],
                2,
            )
            for lv in levels
            if str(lv["concurrency"]) in ("32", "128")
        }
        for e, levels in results.items()
    }
    out = {
        "benchmark": "frontend serving overhead (streaming chat, ~128-token unique prompts, 32 output tokens)",
        "machine": f"{os.cpu_count()} CPUs (shared with the load generator)",
        "engines": {
            "echo": "zero-cost engine (prompt echoed back)",
            "mocker": "mocker, speedup 1000",
        },
        "results": results,
        "reference": reference,
        "cpu_per_request_vs_dynamo": ratios,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    if args.default_model:
        out["default_model_http_vs_offline"] = bench_default_model()
        print(json.dumps(out["default_model_http_vs_offline"]))
        RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(ratios))


if __name__ == "__main__":
    main()
