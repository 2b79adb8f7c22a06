"""Stream stalls while large bodies arrive (issue 21, row 1): one client streams from a real
``tokenmill serve`` process (echo engine, the default model's tokenizer and context) and
records the gap between its chunks; meanwhile ``--bodies`` chat requests of ~3.9 MB each
(``"ab " * 1300000``, under the 4 MiB body limit, far over the context) arrive at once, and
``/health`` is timed while they are handled.

Run it on the code under test and on a baseline in the same run (each served from its own
tree via ``PYTHONPATH``); it prints the largest gap of each and their ratio and writes
``benchmarks/results/stall.json``::

    python benchmarks/stall_bench.py --baseline /work/base --candidate .

The gap that matters is the largest one from the moment the bodies are sent until every
one was answered (``max_gap_ms``); ``quiet_max_gap_ms`` is the same stream's largest gap
before, for scale (the echo engine emits a chunk every ``--echo-delay`` s).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_helpers import free_port, wait_model  # noqa: E402

MODEL = "stall"
BODY_CONTENT = "ab " * 1_300_000  # 3.9 MB


def start_server(root: Path, port: int, echo_delay_s: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
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
        "echo",
        "--echo-delay",
        str(echo_delay_s),
        "--served-model-name",
        MODEL,
    ]
    return subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL)


async def stream_gaps(
    client: httpx.AsyncClient, arrivals: list[float], stop: asyncio.Event, started: asyncio.Event
) -> None:
    body = {"model": MODEL, "prompt": "count with me " * 8, "max_tokens": 7000, "stream": True}
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for _ in r.aiter_raw():
            arrivals.append(time.monotonic())
            if len(arrivals) == 50:
                started.set()
            if stop.is_set():
                break


def big_body() -> bytes:
    return json.dumps(
        {"model": MODEL, "max_tokens": 16, "messages": [{"role": "user", "content": BODY_CONTENT}]}
    ).encode()


def post_big(port: int, body: bytes) -> tuple[int, float]:
    """One big chat request, from a process of its own (sending 3.9 MB must not stall the
    process that reads the stream: its gaps are what is measured)."""
    t0 = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
    response = conn.getresponse()
    response.read()
    conn.close()
    return response.status, time.monotonic() - t0


async def timed_health(client: httpx.AsyncClient) -> float:
    t0 = time.monotonic()
    (await client.get("/health")).raise_for_status()
    return time.monotonic() - t0


def _max_gap(arrivals: list[float], start: float, end: float) -> float:
    times = [t for t in arrivals if start <= t <= end]
    before = [t for t in arrivals if t < start]
    times = before[-1:] + times  # the gap that spans the start counts
    return max((b - a for a, b in zip(times, times[1:], strict=False)), default=float("nan"))


async def measure(port: int, num_bodies: int, senders: ProcessPoolExecutor) -> dict:
    loop = asyncio.get_running_loop()
    bodies = await asyncio.gather(
        *(loop.run_in_executor(senders, big_body) for _ in range(num_bodies))
    )
    arrivals: list[float] = []
    stop, started = asyncio.Event(), asyncio.Event()
    limits = httpx.Limits(max_connections=num_bodies + 4)
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", timeout=120, limits=limits
    ) as client:
        streamer = asyncio.create_task(stream_gaps(client, arrivals, stop, started))
        await asyncio.wait_for(started.wait(), 60)
        await asyncio.sleep(0.5)  # a quiet stretch of the stream, for scale
        quiet_end = sent = time.monotonic()
        posts = [loop.run_in_executor(senders, post_big, port, b) for b in bodies]
        await asyncio.sleep(0.05)  # the bodies are on the wire: now ask for /health
        health_s = await timed_health(client)
        answers = await asyncio.gather(*posts)
        done = time.monotonic()
        await asyncio.sleep(0.2)  # a stall that ends right after the answers still counts
        stop.set()
        await streamer
    return {
        "max_gap_ms": round(_max_gap(arrivals, sent, done + 0.2) * 1e3, 1),
        "quiet_max_gap_ms": round(_max_gap(arrivals, arrivals[0], quiet_end) * 1e3, 1),
        "health_ms": round(health_s * 1e3, 1),
        "statuses": sorted({status for status, _ in answers}),
        "slowest_answer_ms": round(max(s for _, s in answers) * 1e3, 1),
        "bodies_answered_in_ms": round((done - sent) * 1e3, 1),
    }


def run(root: Path, num_bodies: int, echo_delay_s: float) -> dict:
    port = free_port()
    proc = start_server(root, port, echo_delay_s)
    try:
        wait_model(port, proc, MODEL)
        with ProcessPoolExecutor(num_bodies) as senders:
            return {"root": str(root), **asyncio.run(measure(port, num_bodies, senders))}
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    here = Path(__file__).resolve().parents[1]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--candidate", type=Path, default=here, help="tree under test")
    p.add_argument("--baseline", type=Path, default=None, help="tree to compare with")
    p.add_argument("--bodies", type=int, default=3)
    p.add_argument("--echo-delay", type=float, default=0.005)
    p.add_argument("--out", type=Path, default=here / "benchmarks/results/stall.json")
    args = p.parse_args()
    results = {
        "bodies": args.bodies,
        "body_bytes": len(BODY_CONTENT) + 70,
        "echo_delay_s": args.echo_delay,
    }
    for name, root in (("baseline", args.baseline), ("candidate", args.candidate)):
        if root is not None:
            results[name] = run(root.resolve(), args.bodies, args.echo_delay)
            print(f"{name:9s} {json.dumps(results[name])}", flush=True)
    if "baseline" in results:
        ratio = results["baseline"]["max_gap_ms"] / results["candidate"]["max_gap_ms"]
        results["max_gap_ratio_baseline_over_candidate"] = round(ratio, 1)
        print(f"largest gap: baseline / candidate = {ratio:.1f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
