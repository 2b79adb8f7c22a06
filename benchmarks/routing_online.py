"""Online routing experiment (issue 7, item 2): the Mooncake conversation trace over HTTP
against ``tokenmill serve --workers 8 --engine mocker``, compared with ``tokenmill replay`` on
the same requests at the same arrival speed.

For each router mode: start the stack (embedded NATS, 8 mocker worker processes at speedup 1,
the frontend with its router), drive it with ``tokenmill bench serve --format mooncake --speed S
--window 0:W`` (token-id prompts through /v1/completions, ignore_eos, so prompt and output
lengths are the trace's), stop it; then ``tokenmill replay`` on the first N requests (N = the
number of trace requests with timestamp < W s) at the same speed with the online stack's
engine settings (block size 16, 16,384 blocks, max 2,048 batched tokens, watermark 0: what
``cmd_serve._mocker_engine`` builds and cannot be changed from the command line). The JSON has
both summaries and the relative difference of each headline metric.

Contract: adds one entry per (window, speed) under ``runs`` of ``--out`` (default
benchmarks/results/routing_online.json, other entries kept); stops every
process it starts.

usage: python benchmarks/routing_online.py [--window 120] [--speed 2] [--modes round-robin dynamo kv]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from serve_helpers import free_port, wait_model

REPO = Path(__file__).resolve().parents[1]
TRACE = Path("/work/shared/data/traces/conversation_trace.jsonl")
TOK = Path(os.environ.get("DYNAMO_TOK", Path(os.environ.get("TMPDIR") or "/tmp") / "dynamo-tok"))
MODEL = "tiny"
ONLINE_ENGINE = ["--block-size", "16", "--num-blocks", "16384", "--max-num-batched-tokens", "2048",
                 "--watermark", "0"]  # fmt: skip
METRICS = (("ttft", "mean"), ("ttft", "p50"), ("ttft", "p99"), ("itl", "mean"), ("e2e", "mean"))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trace", default=str(TRACE))
    p.add_argument("--window", type=float, default=120.0, help="first W trace seconds")
    p.add_argument("--speed", type=float, default=2.0)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--modes", nargs="+", default=["round-robin", "dynamo", "kv"])
    p.add_argument(
        "--work", default=str(Path(os.environ.get("TMPDIR") or "/tmp") / "routing-online")
    )
    p.add_argument("--out", default=str(REPO / "benchmarks/results/routing_online.json"))
    return p.parse_args()


def count_requests(trace: str, window_s: float) -> int:
    with open(trace, encoding="utf-8") as fh:
        return sum(
            1 for line in fh if line.strip() and json.loads(line)["timestamp"] < window_s * 1e3
        )


def tm(*args: str) -> list[str]:
    return [sys.executable, "-m", "tokenmill", "--log-level", "WARNING", *args]


def online(a: argparse.Namespace, mode: str, out: Path) -> dict:
    """One serve + bench serve run; returns the bench summary."""
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cmd = tm("serve", "--workers", str(a.workers), "--engine", "mocker", "--model", str(TOK),
             "--served-model-name", MODEL, "--router-mode", mode, "--port", str(port))  # fmt: skip
    with open(out / "serve.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        wait_model(port, proc, MODEL, 180.0)
        time.sleep(3)  # every worker registered
        bench = tm("bench", "serve", "--url", f"http://127.0.0.1:{port}", "--model", MODEL,
                   "--trace", a.trace, "--format", "mooncake", "--speed", str(a.speed),
                   "--window", f"0:{a.window:g}", "--output-dir", str(out), "--no-plots",
                   "--progress", "off")  # fmt: skip
        subprocess.run(bench, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return json.loads((out / "results.json").read_text())["summary"]


def offline(a: argparse.Namespace, mode: str, n: int, out: Path) -> dict:
    cmd = tm("replay", "--trace", a.trace, "--workers", str(a.workers), "--router-mode", mode,
             "--arrival-speed", str(a.speed), "--max-requests", str(n), "--output", str(out),
             *ONLINE_ENGINE)  # fmt: skip
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def pick(summary: dict, metric: str, stat: str):
    """``summary[metric][stat]`` under either naming (bench: ttft_ms, replay: ttft)."""
    for key in (metric, f"{metric}_ms"):
        if isinstance(summary.get(key), dict) and stat in summary[key]:
            return summary[key][stat]
    return None


def compare(on: dict, off: dict) -> dict:
    rows = {}
    for metric, stat in METRICS:
        x, y = pick(on, metric, stat), pick(off, metric, stat)
        rel = None if x is None or not y else round((x - y) / y, 4)
        rows[f"{metric}_{stat}"] = {"online": x, "replay": y, "rel_diff": rel}
    return rows


def main() -> int:
    a = parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    n = count_requests(a.trace, a.window)
    out = Path(a.out)
    doc = json.loads(out.read_text()) if out.exists() else {"trace": Path(a.trace).name, "runs": {}}
    key = f"window_{a.window:g}s_speed_{a.speed:g}x"
    run = doc["runs"].setdefault(key, {"modes": {}})  # other modes of this window are kept
    run.update({"window_s": a.window, "speed": a.speed, "requests": n, "workers": a.workers,
                "replay_engine_flags": ONLINE_ENGINE})  # fmt: skip
    for mode in a.modes:
        on = online(a, mode, work / f"online_{mode}")
        off = offline(a, mode, n, work / f"replay_{mode}.json")
        run["modes"][mode] = {"online": on, "replay": off, "compare": compare(on, off)}
        print(json.dumps({"mode": mode, **run["modes"][mode]["compare"]}), flush=True)
        out.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
