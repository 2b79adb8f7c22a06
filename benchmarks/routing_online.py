"""Online routing experiment (issue 7, item 2): the Mooncake conversation trace over HTTP
against ``tokenmill serve --workers 8 --engine mocker``, compared with ``tokenmill replay`` on
the same requests at the same arrival speed.

For each router mode: start the stack (embedded NATS, 8 mocker worker processes at speedup 1,
the frontend with its router), drive it with ``tokenmill bench serve --format mooncake --speed S
--window 0:W`` (token-id prompts through /v1/completions, ignore_eos, so prompt and output
lengths are the trace's), stop it; then ``tokenmill replay`` on the first N requests (N = the
number of trace requests with timestamp < W s) at the same speed. Both sides run with their
defaults, which are the same engine (``launch.specs.MOCKER_DEFAULTS``: block size 64, 16,384
blocks per worker, 8,192 batched tokens, 256 sequences, watermark 0.01); the live mocker
ends each step on its simulated deadline (``engine.mocker.StepPacer``).

Agreement is judged against ``TOLERANCE``, fixed before the runs: |online - replay| / replay
at most 10% for output tokens/s, ITL mean and E2E mean, 25% for TTFT mean, p50 and p99 (TTFT
is a queueing delay: near saturation a few percent of extra step time grows it by much more,
and the p99 of a few hundred requests is a handful of them). The JSON has both summaries,
each metric's relative difference and verdict, and the host's load average during each
online run (the machine is shared).

Where an online-replay gap comes from: each online summary has ``server_ms``, the means of the
frontend's own TTFT, queue-time and router-overhead histograms over the run (scraped from
/metrics before and after), so client TTFT - server TTFT is the HTTP path between the client
and the frontend; and each mode has ``per_request``: request i online against request i in
replay (both sides save per-request records), the TTFT difference's distribution, overall and
split by whether both saw the same number of cached tokens (routing went the same way).
``stages_ms`` splits each online TTFT into its stages (``STAGES``) by joining the client's
records with the frontend's ``--request-log`` (response ids, one monotonic clock), and sets the
worker round trip against replay's TTFT for the same request.

Contract: adds one entry per (window, speed) under ``runs`` of ``--out`` (default
benchmarks/results/routing_online.json, other entries kept; an entry measured with other
engine settings is replaced, not merged); stops every process it starts.

usage: python benchmarks/routing_online.py [--window 120] [--speed 2] [--modes round-robin dynamo kv]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import asdict
from pathlib import Path

from serve_helpers import free_port, wait_model

from tokenmill.bench.metrics import distribution, percentile
from tokenmill.launch.specs import MOCKER_DEFAULTS

REPO = Path(__file__).resolve().parents[1]
TRACE = Path("/work/shared/data/traces/conversation_trace.jsonl")
TOK = Path(os.environ.get("DYNAMO_TOK", Path(os.environ.get("TMPDIR") or "/tmp") / "dynamo-tok"))
MODEL = "tiny"
TOLERANCE = {
    "output_tokens_per_s": 0.10,
    "ttft_mean": 0.25,
    "ttft_p50": 0.25,
    "ttft_p99": 0.25,
    "itl_mean": 0.10,
    "e2e_mean": 0.10,
}
LOAD_SAMPLE_S = 5.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
PACING = re.compile(r"mocker pacing: (\d+) steps, (\d+) late, ([\d.]+) s late")
# Server-side histograms scraped before and after each online run (their means in ms).
SERVER_HISTOGRAMS = {
    "ttft": "tokenmill_time_to_first_token_seconds",
    "queue_time": "tokenmill_queue_time_seconds",
    "router_overhead": "tokenmill_router_overhead_seconds",
}


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
    p.add_argument(
        "--serve-args",
        nargs="*",
        default=[],
        help="more flags for tokenmill serve (e.g. --worker-event-loop asyncio)",
    )
    p.add_argument(
        "--bench-args",
        nargs="*",
        default=[],
        help="more flags for tokenmill bench serve (e.g. --no-uvloop)",
    )
    return p.parse_args()


def count_requests(trace: str, window_s: float) -> int:
    with open(trace, encoding="utf-8") as fh:
        return sum(
            1 for line in fh if line.strip() and json.loads(line)["timestamp"] < window_s * 1e3
        )


def tm(*args: str) -> list[str]:
    return [sys.executable, "-m", "tokenmill", "--log-level", "WARNING", *args]


class LoadSampler:
    """The 1-minute load average every ``LOAD_SAMPLE_S`` seconds while running (a thread)."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(LOAD_SAMPLE_S):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        x = self.samples or [os.getloadavg()[0]]
        return {"mean": round(sum(x) / len(x), 2), "max": round(max(x), 2), "cpus": os.cpu_count()}


def tree_cpu_s(root: int) -> float:
    """utime + stime of ``root`` and its direct children (nats-server, workers), seconds."""
    kids = Path(f"/proc/{root}/task/{root}/children").read_text().split()
    total = 0
    for pid in [root, *map(int, kids)]:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def pacing(log: str) -> dict:
    """The workers' exit lines summed: steps, steps that ran late, seconds late in total."""
    rows = [tuple(map(float, m)) for m in PACING.findall(log)]
    steps, late, late_s = (sum(col) for col in zip(*rows, strict=True)) if rows else (0, 0, 0.0)
    return {
        "workers": len(rows),
        "steps": int(steps),
        "late_steps": int(late),
        "late_fraction": round(late / steps, 4) if steps else None,
        "late_s": round(late_s, 2),
    }


def scrape(port: int) -> dict[str, tuple[float, float]]:
    """(sum, count) of each ``SERVER_HISTOGRAMS`` entry from the frontend's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        name = series.partition("{")[0]  # summed over labels (model)
        if name.endswith(("_sum", "_count")):
            values[name] = values.get(name, 0.0) + float(value)
    return {
        key: (values.get(f"{metric}_sum", 0.0), values.get(f"{metric}_count", 0.0))
        for key, metric in SERVER_HISTOGRAMS.items()
    }


def server_means_ms(before: dict, after: dict) -> dict[str, float | None]:
    """Mean of each histogram over the run, ms (None when it saw nothing)."""
    means = {}
    for key in SERVER_HISTOGRAMS:
        total, count = (y - x for x, y in zip(before[key], after[key], strict=True))
        means[f"{key}_mean"] = round(total / count * 1e3, 2) if count else None
    return means


def spread(values: list[float]) -> dict[str, float | None]:
    """``bench.metrics.distribution`` plus the count and p10 (differences can be negative)."""
    xs = sorted(values)
    stats = {"p10": percentile(xs, 10) if xs else None, **distribution(xs)}
    return {"n": len(xs), **{k: None if v is None else round(v, 2) for k, v in stats.items()}}


def per_request(online_requests: list[dict], replay_requests: list[dict]) -> dict:
    """Request i online (its ``index`` in the trace window) against replay's ``req-<i>``: the
    TTFT difference (ms), overall and split by whether both saw the same cached-token count."""
    replay = {r["request_id"]: r for r in replay_requests}
    same, differ = [], []
    for on in online_requests:
        off = replay[f"req-{on['index']}"]
        if on["error"] or on["first_token_s"] is None or off["first_token_ms"] < 0:
            continue
        diff = (on["first_token_s"] - on["send_s"]) * 1e3 - (
            off["first_token_ms"] - off["arrival_ms"]
        )
        (same if on["num_cached_tokens"] == off["num_cached_tokens"] else differ).append(diff)
    return {
        "ttft_diff_ms": spread(same + differ),
        "same_cached": spread(same),
        "other_cached": spread(differ),
    }


# The online TTFT of a request as consecutive stages (ms): the client's send to the frontend's
# handler, reading the body, routing and opening the worker stream, the worker round trip up
# to the first tokens at the frontend, handing the first SSE bytes to the HTTP server, and
# from there to the client reading them. Their means add up to the online TTFT mean.
STAGES = ("to_handler", "body", "route", "worker", "write", "to_client")


def stages(
    online_requests: list[dict], origin_s: float, log: list[dict], replay_requests: list[dict]
) -> dict:
    """The ``STAGES`` of each online request, joined with the frontend's request log by
    response id (times on one host's monotonic clock), and ``worker_minus_replay``: the worker
    round trip less replay's TTFT for the same request (what the transport and the live
    engine add on the server side)."""
    by_id = {line["id"]: line for line in log if line["id"]}
    replay = {r["request_id"]: r for r in replay_requests}
    rows: dict[str, list[float]] = {name: [] for name in (*STAGES, "worker_minus_replay")}
    for on in online_requests:
        line = by_id.get(on.get("response_id"))
        if on["error"] or line is None or on["first_token_s"] is None:
            continue
        ms, arrival = line["ms"], line["arrival_monotonic"]
        first_write = arrival + ms["first_write"] / 1e3
        split = {
            "to_handler": (arrival - origin_s - on["send_s"]) * 1e3,
            "body": ms["body"],
            "route": ms["routed"] - ms["body"],
            "worker": ms["first_token"] - ms["routed"],
            "write": ms["first_write"] - ms["first_token"],
            "to_client": (origin_s + on["first_token_s"] - first_write) * 1e3,
        }
        for name, value in split.items():
            rows[name].append(value)
        off = replay[f"req-{on['index']}"]
        rows["worker_minus_replay"].append(
            split["worker"] - (off["first_token_ms"] - off["arrival_ms"])
        )
    return {name: spread(values) for name, values in rows.items()}


def online(a: argparse.Namespace, mode: str, out: Path) -> tuple[dict, list[dict], float, list]:
    """One serve + bench serve run; returns the bench summary (+ ``host``: the load average,
    the server's CPU cores in use, and the workers' pacing report; + ``server_ms``), the
    per-request records, the records' origin on the monotonic clock and the frontend's request
    log."""
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cmd = tm(
        "serve",
        "--workers",
        str(a.workers),
        "--engine",
        "mocker",
        "--model",
        str(TOK),
        "--served-model-name",
        MODEL,
        "--router-mode",
        mode,
        "--port",
        str(port),
        "--request-log",
        str(out / "requests.jsonl"),
        *a.serve_args,
    )
    (out / "requests.jsonl").unlink(missing_ok=True)
    with open(out / "serve.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        wait_model(port, proc, MODEL, 180.0)
        time.sleep(3)  # every worker registered
        bench = tm(
            "bench",
            "serve",
            "--url",
            f"http://127.0.0.1:{port}",
            "--model",
            MODEL,
            "--trace",
            a.trace,
            "--format",
            "mooncake",
            "--speed",
            str(a.speed),
            "--window",
            f"0:{a.window:g}",
            "--output-dir",
            str(out),
            "--no-plots",
            "--progress",
            "off",
            "--save-requests",
            *a.bench_args,
        )
        before = scrape(port)
        cpu0, t0 = tree_cpu_s(proc.pid), time.monotonic()
        with LoadSampler() as load:
            code = subprocess.run(bench, cwd=REPO, stdout=subprocess.DEVNULL).returncode
        if code not in (0, 1):  # 1: some requests failed; the summary counts them
            raise RuntimeError(f"tokenmill bench serve exited with {code}")
        cores = (tree_cpu_s(proc.pid) - cpu0) / (time.monotonic() - t0)
        server = server_means_ms(before, scrape(port))
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    host = {
        "loadavg": load.summary(),
        "server_cores": round(cores, 2),
        "pacing": pacing((out / "serve.log").read_text(errors="replace")),
    }
    results = json.loads((out / "results.json").read_text())
    log = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    summary = {**results["summary"], "host": host, "server_ms": server}
    return summary, results["requests"], results["origin_monotonic_s"], log


def offline(a: argparse.Namespace, mode: str, n: int, out: Path) -> tuple[dict, list[dict]]:
    """``tokenmill replay`` on the first ``n`` requests: its report and per-request records."""
    cmd = tm(
        "replay",
        "--trace",
        a.trace,
        "--workers",
        str(a.workers),
        "--router-mode",
        mode,
        "--arrival-speed",
        str(a.speed),
        "--max-requests",
        str(n),
        "--output",
        str(out),
        "--save-requests",
    )
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    report = json.loads(out.read_text())
    return report, report.pop("requests")


def pick(summary: dict, name: str):
    """``summary[name]`` or, for "ttft_mean" etc., ``summary["ttft"]["mean"]``."""
    if name in summary:
        return summary[name]
    metric, _, stat = name.rpartition("_")
    return (summary.get(metric) or {}).get(stat)


def compare(on: dict, off: dict) -> dict:
    """Per metric: both values, (online - replay) / replay, and whether it is in tolerance."""
    rows = {}
    for name, tol in TOLERANCE.items():
        x, y = pick(on, name), pick(off, name)
        rel = None if x is None or not y else round((x - y) / y, 4)
        ok = rel is not None and abs(rel) <= tol
        rows[name] = {"online": x, "replay": y, "rel_diff": rel, "tolerance": tol, "ok": ok}
    rows["agrees"] = all(r["ok"] for r in rows.values())
    return rows


def main() -> int:
    a = parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    n = count_requests(a.trace, a.window)
    out = Path(a.out)
    doc = json.loads(out.read_text()) if out.exists() else {"trace": Path(a.trace).name, "runs": {}}
    key = f"window_{a.window:g}s_speed_{a.speed:g}x"
    engine = {**asdict(MOCKER_DEFAULTS), "pacing": "deadline"}
    run = doc["runs"].get(key, {})
    if run.get("engine") != engine:  # measured with other settings: start over
        run = doc["runs"][key] = {"modes": {}}
    run.update(
        {
            "window_s": a.window,
            "speed": a.speed,
            "requests": n,
            "workers": a.workers,
            "engine": engine,
            "tolerance": TOLERANCE,
        }
    )
    for mode in a.modes:
        on, on_requests, origin, log = online(a, mode, work / f"online_{mode}")
        off, off_requests = offline(a, mode, n, work / f"replay_{mode}.json")
        run["modes"][mode] = {
            "online": on,
            "replay": off,
            "compare": compare(on, off),
            "per_request": per_request(on_requests, off_requests),
            "stages_ms": stages(on_requests, origin, log, off_requests),
        }
        print(json.dumps({"mode": mode, **run["modes"][mode]["compare"]}), flush=True)
        out.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
