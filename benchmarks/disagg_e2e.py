"""Disaggregated vs aggregated serving of the real default model, end to end.

Two deployments of the same two worker processes, run one after the other on this machine:

- ``disagg``: ``tokenmill serve --prefill-workers 1 --decode-workers 1 --router-mode kv``
  (``--disagg auto``: prompts with more than 512 uncached tokens prefill remotely);
- ``aggregated``: ``tokenmill serve --workers 2 --router-mode kv``.

Workload (token-id prompts, greedy): ``--decoders`` short requests (64-token prompts,
``--decode-tokens`` output tokens) start first and stream; while they decode, ``--long``
long prompts (1-4k tokens, ``--long-tokens`` output tokens each) arrive every
``--gap-s`` seconds. Reported per deployment: ITL p50/p99 of the decoding requests (every
inter-token gap), their TTFT, the long prompts' TTFT (mean, p50, max) and E2E, and whether
every request's greedy text is identical between the two deployments.

    python benchmarks/disagg_e2e.py [--long 14 --decoders 6]

writes the ``end_to_end`` key of ``benchmarks/results/disagg.json`` (read-modify-write).
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

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from serve_helpers import free_port, wait_model  # noqa: E402

OUT = Path("benchmarks/results/disagg.json")
MODEL = "SmolLM2-135M-Instruct"


def prompts(args) -> tuple[list[list[int]], list[list[int]]]:
    rng = random.Random(15)
    decoders = [[rng.randrange(100, 40_000) for _ in range(64)] for _ in range(args.decoders)]
    long = [
        [rng.randrange(100, 40_000) for _ in range(rng.randrange(1024, 4097))]
        for _ in range(args.long)
    ]
    return decoders, long


async def stream(client: httpx.AsyncClient, url: str, prompt: list[int], max_tokens: int):
    """(text, [token arrival times], start)."""
    body = {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    start = time.monotonic()
    times, text = [], []
    async with client.stream("POST", f"{url}/completions", json=body, timeout=900) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "choices" not in chunk:
                raise RuntimeError(f"stream error: {chunk}")
            piece = chunk["choices"][0]["text"]
            if piece:
                times.append(time.monotonic())
                text.append(piece)
    return "".join(text), times, start


async def workload(url: str, args) -> dict:
    decoders, long = prompts(args)
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=64)) as client:
        dec = [asyncio.create_task(stream(client, url, p, args.decode_tokens)) for p in decoders]
        await asyncio.sleep(args.warm_s)
        lng = []
        for p in long:
            lng.append(asyncio.create_task(stream(client, url, p, args.long_tokens)))
            await asyncio.sleep(args.gap_s)
        dec_results = await asyncio.gather(*dec)
        long_results = await asyncio.gather(*lng)
    gaps = [b - a for _, t, _ in dec_results for a, b in zip(t, t[1:], strict=False)]
    ttft_long = [t[0] - s for _, t, s in long_results if t]
    ttft_dec = [t[0] - s for _, t, s in dec_results if t]
    return {
        "itl_decoding_ms": {
            "p50": round(statistics.median(gaps) * 1e3, 2),
            "p99": round(_pct(gaps, 0.99) * 1e3, 2),
            "mean": round(statistics.mean(gaps) * 1e3, 2),
            "max": round(max(gaps) * 1e3, 2),
            "num_gaps": len(gaps),
        },
        "ttft_decoding_ms_mean": round(statistics.mean(ttft_dec) * 1e3, 1),
        "ttft_long_ms": {
            "mean": round(statistics.mean(ttft_long) * 1e3, 1),
            "p50": round(statistics.median(ttft_long) * 1e3, 1),
            "max": round(max(ttft_long) * 1e3, 1),
        },
        "e2e_long_ms_mean": round(statistics.mean(t[-1] - s for _, t, s in long_results) * 1e3, 1),
        "texts": [r[0] for r in (*dec_results, *long_results)],
    }


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def serve(args, extra: list[str]) -> tuple[subprocess.Popen, str]:
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
        "--router-mode",
        "kv",
        "--max-num-batched-tokens",
        str(args.chunk),
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_model(port, proc, MODEL, timeout_s=600)
    return proc, f"http://127.0.0.1:{port}/v1"


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def scrape(url: str, names: tuple[str, ...]) -> dict[str, float]:
    text = httpx.get(url.removesuffix("/v1") + "/metrics", timeout=10).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        for name in names:
            if line.startswith(name):
                key = line.rsplit(" ", 1)[0]
                out[key] = out.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--long", type=int, default=14)
    parser.add_argument("--decoders", type=int, default=6)
    parser.add_argument("--decode-tokens", type=int, default=96)
    parser.add_argument("--long-tokens", type=int, default=16)
    parser.add_argument("--gap-s", type=float, default=1.0)
    parser.add_argument("--warm-s", type=float, default=2.0)
    parser.add_argument("--chunk", type=int, default=512, help="--max-num-batched-tokens")
    args = parser.parse_args()
    deployments = {
        "disagg": ["--prefill-workers", "1", "--decode-workers", "1", "--disagg", "auto"],
        "aggregated": ["--workers", "2"],
    }
    results = {}
    for name, extra in deployments.items():
        proc, url = serve(args, extra)
        try:
            results[name] = workload(url, args)
            results[name] = asyncio.run(results[name])
            results[name]["metrics"] = scrape(
                url,
                (
                    "tokenmill_disagg_decisions_total",
                    "tokenmill_kv_transfer_seconds_sum",
                    "tokenmill_kv_transfer_seconds_count",
                    "tokenmill_kv_transfer_bytes_sum",
                    "tokenmill_kv_held_blocks",
                    "tokenmill_disagg_fallbacks_total",
                ),
            )
        finally:
            stop(proc)
        print(name, json.dumps({k: v for k, v in results[name].items() if k != "texts"}))
    a, b = results["disagg"]["texts"], results["aggregated"]["texts"]
    identical = sum(x == y for x, y in zip(a, b, strict=True))
    for r in results.values():
        r.pop("texts")
    summary = {
        "what": "serve --prefill-workers 1 --decode-workers 1 (disagg auto) vs --workers 2, "
        "real default model, long prompts (1-4k tokens) arriving while short requests decode",
        "args": vars(args),
        "greedy_identical": f"{identical}/{len(a)}",
        "disagg": results["disagg"],
        "aggregated": results["aggregated"],
        "itl_p99_ratio_disagg_over_aggregated": round(
            results["disagg"]["itl_decoding_ms"]["p99"]
            / results["aggregated"]["itl_decoding_ms"]["p99"],
            3,
        ),
        "ttft_long_ratio_disagg_over_aggregated": round(
            results["disagg"]["ttft_long_ms"]["mean"]
            / results["aggregated"]["ttft_long_ms"]["mean"],
            3,
        ),
        "loadavg": os.getloadavg(),
        "note": "2 shared CPU cores with other work running: absolute times are noisy",
    }
    data = json.loads(OUT.read_text()) if OUT.exists() else {}
    data["end_to_end"] = summary
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(data, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
