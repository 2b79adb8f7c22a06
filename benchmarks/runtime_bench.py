"""Request-plane benchmark: round trip and streaming throughput per transport.

Transports: in-process (baseline, same event loop), direct TCP and NATS (a real nats-server
started here; the serving side runs in a child process so bytes really cross a socket, both
sides on uvloop). For each transport and each of ``--runs`` repetitions:

- round trip: ``--calls`` sequential one-item calls; the run's median latency,
- one stream: a single call yielding ``--tokens`` items (a token-sized struct each),
- concurrent streams: ``--streams`` calls at once, each yielding ``--tokens // --streams``.

Reports the median over runs and ratios against in-process and TCP, and writes
``benchmarks/results/runtime.json``. Usage: ``python benchmarks/runtime_bench.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import msgspec

from tokenmill.runtime.inprocess import InProcessRuntime
from tokenmill.runtime.interface import EndpointId, Runtime
from tokenmill.runtime.nats_runtime import NatsRuntime, NatsRuntimeConfig
from tokenmill.runtime.nats_server import NatsServer

EP = EndpointId("bench", "backend", "generate")
RESULTS = Path(__file__).parent / "results" / "runtime.json"


class BenchRequest(msgspec.Struct):
    num_items: int


class TokenOut(msgspec.Struct):
    """Shaped like one decode step's output: a request id, one token id, a flag."""

    request_id: str
    token_ids: list[int]
    finished: bool = False


async def handler(request: BenchRequest, ctx):
    for i in range(request.num_items):
        yield TokenOut(ctx.request_id, [i % 49152], i == request.num_items - 1)


async def serve_child(url: str) -> None:
    """Child process: serves the endpoint on both networked planes until stdin closes."""
    for plane in ("tcp", "nats"):
        rt = await NatsRuntime.connect(url, NatsRuntimeConfig(request_plane=plane))
        await rt.serve_endpoint(EP, handler, instance_id=plane, request_type=BenchRequest)
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


async def one_call(rt_client, num_items: int, rid: str, instance_id: str | None) -> int:
    count = 0
    async for _ in rt_client.generate(BenchRequest(num_items), rid, instance_id=instance_id):
        count += 1
    assert count == num_items, (count, num_items)
    return count


async def measure(runtime: Runtime, instance_id: str | None, args) -> dict[str, float]:
    client = runtime.client(EP, response_type=TokenOut)
    await client.wait_for_instances(timeout_s=10)
    await one_call(client, 10, "warm", instance_id)
    latencies = []
    for i in range(args.calls):
        start = time.perf_counter()
        await one_call(client, 1, f"rt-{i}", instance_id)
        latencies.append(time.perf_counter() - start)
    start = time.perf_counter()
    await one_call(client, args.tokens, "stream", instance_id)
    one_stream = args.tokens / (time.perf_counter() - start)
    per_stream = args.tokens // args.streams
    start = time.perf_counter()
    await asyncio.gather(
        *(one_call(client, per_stream, f"c-{i}", instance_id) for i in range(args.streams))
    )
    concurrent = per_stream * args.streams / (time.perf_counter() - start)
    return {
        "round_trip_ms": statistics.median(latencies) * 1e3,
        "stream_tokens_per_s": one_stream,
        "concurrent_tokens_per_s": concurrent,
    }


def summarize(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: round(statistics.median(r[key] for r in runs), 4) for key in runs[0]}


async def bench(args) -> dict:
    results: dict[str, list[dict[str, float]]] = {"inprocess": [], "tcp": [], "nats": []}
    inproc = InProcessRuntime()
    await inproc.serve_endpoint(EP, handler)
    with NatsServer() as server:
        child = subprocess.Popen(
            [sys.executable, __file__, "--serve", server.url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
        )
        try:
            assert child.stdout.readline().strip() == b"ready"
            client_rt = await NatsRuntime.connect(server.url)
            for _ in range(args.runs):
                results["inprocess"].append(await measure(inproc, None, args))
                for plane in ("tcp", "nats"):
                    results[plane].append(await measure(client_rt, plane, args))
            await client_rt.shutdown()
        finally:
            child.stdin.close()
            child.wait(timeout=10)
    return report(results, args)


def report(results: dict[str, list[dict[str, float]]], args) -> dict:
    medians = {name: summarize(runs) for name, runs in results.items()}
    ratios = {}
    for name in ("tcp", "nats"):
        m, base, tcp = medians[name], medians["inprocess"], medians["tcp"]
        ratios[f"{name}_vs_inprocess"] = {k: round(m[k] / base[k], 3) for k in m}
        ratios[f"{name}_vs_tcp"] = {k: round(m[k] / tcp[k], 3) for k in m}
    return {
        "benchmark": "runtime request plane",
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "loop": "uvloop",
        "args": vars(args),
        "median_of_runs": medians,
        "ratios": ratios,
        "all_runs": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--tokens", type=int, default=20000)
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    import uvloop

    if args.serve:
        uvloop.run(serve_child(args.serve))
        return
    out = uvloop.run(bench(args))
    args_out = Path(args.out)
    args_out.parent.mkdir(parents=True, exist_ok=True)
    args_out.write_text(json.dumps(out, indent=1) + "\n")
    for name, m in out["median_of_runs"].items():
        print(
            f"{name:10s} round trip {m['round_trip_ms']:.3f} ms   one stream "
            f"{m['stream_tokens_per_s']:,.0f} tok/s   {args.streams} streams "
            f"{m['concurrent_tokens_per_s']:,.0f} tok/s"
        )
    print(json.dumps(out["ratios"], indent=1))


if __name__ == "__main__":
    main()
