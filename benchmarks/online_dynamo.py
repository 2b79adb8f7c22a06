"""Side by side with NVIDIA Dynamo 1.6.1: online serving overhead, interleaved runs (issue 7, item 3).

Each round runs both stacks, one after the other (the order alternates by round), with the
same neutral client (``../shared/anchors/loadgen.py`` under the Dynamo venv's Python, so the
client is identical for both) and the same flags: REQUESTS streaming chat requests of 128
random one-token words, 32 output tokens, ``ignore_eos``, WARMUP warm-up requests, at each
concurrency.

- Dynamo: ``../shared/anchors/dynamo/online.sh`` as is (frontend ``--router-mode kv`` + two
  mocker processes at speedup 100, private network namespace; it reports its own server CPU).
- tokenmill: ``tokenmill serve --workers 2 --engine mocker --mocker-speedup 100 --router-mode kv
  --model $TOK --served-model-name tiny`` (frontend + in-process KV router, embedded
  nats-server, two worker processes over the TCP request plane), in the root network
  namespace on 127.0.0.1. CPU per process from /proc (utime+stime of every thread) of the serve
  process and each of its children, around each loadgen call, divided by REQUESTS+WARMUP
  (the same normalisation as online.sh).

Contract: writes one JSON file (``--out``) with every run's loadgen result and the medians
per (stack, concurrency); prints one line per run. Stops every process it starts.

usage: python benchmarks/online_dynamo.py [--runs 5] [--requests 2000] [--concurrency 32 128]
           [--stacks dynamo tokenmill [tokenmill-interval0]]
           [--out benchmarks/results/dynamo_side_by_side.json]
``tokenmill-uvloop`` is tokenmill with its frontend on uvloop (``--event-loop uvloop``; the
default is asyncio's loop). ``tokenmill-interval0`` is tokenmill with ``--stream-interval-ms 0``: the workers send every
engine step's outputs at once instead of coalescing those that follow within 1 ms.
Needs root (online.sh uses ``unshare -n``) and runs ``setup.sh`` first (PyPI, ~45 s once).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from serve_helpers import free_port, wait_model

REPO = Path(__file__).resolve().parents[1]
ANCHORS = Path(os.environ.get("ANCHORS", REPO.parent / "shared" / "anchors"))
TMP = Path(os.environ.get("TMPDIR") or "/tmp")
VENV = Path(os.environ.get("DYNAMO_VENV", TMP / "dynamo-venv"))
TOK = Path(os.environ.get("DYNAMO_TOK", TMP / "dynamo-tok"))
MODEL = "tiny"
CLK_TCK = os.sysconf("SC_CLK_TCK")
SUMMARY_KEYS = ("req_per_s", "out_tok_per_s", "completed", "client_cpu_ms_per_req")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--concurrency", type=int, nargs="+", default=[32, 128])
    p.add_argument(
        "--stacks",
        nargs="+",
        default=["dynamo", "tokenmill"],
        choices=[
            "dynamo",
            "tokenmill",
            "tokenmill-interval0",
            "tokenmill-speedup5",
            "tokenmill-uvloop",
            "tokenmill-speedup5-uvloop",
        ],
    )
    p.add_argument("--work", default=str(TMP / "tm-vs-dyn"), help="logs and raw results")
    p.add_argument("--out", default=str(REPO / "benchmarks/results/dynamo_side_by_side.json"))
    return p.parse_args()


def run_dynamo(a: argparse.Namespace, out: Path) -> dict[int, dict]:
    """online.sh as is; returns its per-concurrency loadgen JSON (with server CPU)."""
    env = {
        **os.environ,
        "REQUESTS": str(a.requests),
        "WARMUP": str(a.warmup),
        "CONCURRENCIES": " ".join(map(str, a.concurrency)),
    }
    subprocess.run(
        ["bash", str(ANCHORS / "dynamo/online.sh"), str(out)],
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return {c: json.loads((out / f"online_c{c}.json").read_text()) for c in a.concurrency}


def proc_tree(root: int) -> dict[str, int]:
    """role -> pid for the serve process and its direct children (nats-server, workers)."""
    roles = {"frontend": root}
    kids = Path(f"/proc/{root}/task/{root}/children").read_text().split()
    for i, pid in enumerate(sorted(map(int, kids))):
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        roles["nats" if "nats-server" in cmd else f"worker{i}"] = pid
    return roles


def cpu_s(pid: int) -> float:
    """utime + stime of every thread of ``pid`` so far, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def loadgen(a: argparse.Namespace, port: int, c: int, out: Path) -> dict:
    """One loadgen call (warm-up + measured phase), with the Dynamo venv's Python."""
    cmd = [
        str(VENV / "bin/python"),
        str(ANCHORS / "loadgen.py"),
        "--url",
        f"http://127.0.0.1:{port}",
        "--model",
        MODEL,
        "-n",
        str(a.requests),
        "-c",
        str(c),
        "--input-words",
        "128",
        "--max-tokens",
        "32",
        "--ignore-eos",
        "--warmup",
        str(a.warmup),
        "--out",
        str(out),
    ]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def run_tokenmill(a: argparse.Namespace, out: Path, extra: tuple[str, ...] = ()) -> dict[int, dict]:
    """tokenmill serve with two mocker workers; loadgen at each concurrency; server CPU/request.
    ``extra``: more ``serve`` flags (the ``tokenmill-interval0`` stack)."""
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "tokenmill",
        "--log-level",
        "WARNING",
        "serve",
        "--workers",
        "2",
        "--engine",
        "mocker",
        "--mocker-speedup",
        "100",
        "--router-mode",
        "kv",
        "--model",
        str(TOK),
        "--served-model-name",
        MODEL,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *extra,
    ]
    with open(out / "serve.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        wait_model(port, proc, MODEL, 120.0)
        time.sleep(2)  # the second worker registers too (as online.sh does)
        return {c: measure(a, port, c, proc.pid, out) for c in a.concurrency}
    finally:
        stop(proc)


def measure(a: argparse.Namespace, port: int, c: int, root: int, out: Path) -> dict:
    roles = proc_tree(root)
    before = {r: cpu_s(p) for r, p in roles.items()}
    res = loadgen(a, port, c, out / f"online_c{c}.json")
    cpu = {r: cpu_s(p) - before[r] for r, p in roles.items()}
    n = a.requests + a.warmup
    res["server_cpu_s"] = {r: round(v, 3) for r, v in cpu.items()}
    res["server_cpu_ms_per_req"] = {r: round(v * 1e3 / n, 3) for r, v in cpu.items()}
    return res


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM (serve stops its children), then SIGKILL after 30 s."""
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def brief(res: dict) -> dict:
    keep = {k: res.get(k) for k in SUMMARY_KEYS}
    keep["ttft_ms"], keep["e2e_ms"] = res["ttft_ms"], res["e2e_ms"]
    keep["errors"], keep["server_cpu_ms_per_req"] = res["errors"], res.get("server_cpu_ms_per_req")
    return keep


def medians(runs: list[dict]) -> dict:
    """Median per metric over runs (server CPU per role, TTFT/E2E percentiles)."""
    med = lambda xs: round(statistics.median(xs), 3)  # noqa: E731
    out = {
        k: med([r[k] for r in runs])
        for k in ("req_per_s", "out_tok_per_s", "client_cpu_ms_per_req")
    }
    for key in ("ttft_ms", "e2e_ms", "server_cpu_ms_per_req"):
        out[key] = {f: med([r[key][f] for r in runs]) for f in runs[0][key]}
    out["runs"] = len(runs)
    out["req_per_s_range"] = [min(r["req_per_s"] for r in runs), max(r["req_per_s"] for r in runs)]
    return out


def main() -> int:
    a = parse_args()
    work = Path(a.work)
    subprocess.run(
        ["bash", str(ANCHORS / "dynamo/setup.sh")], check=True, stdout=subprocess.DEVNULL
    )
    runners = {
        "dynamo": run_dynamo,
        "tokenmill": run_tokenmill,
        # every step's outputs sent at once (no 1 ms output coalescing in the workers)
        "tokenmill-interval0": lambda a, out: run_tokenmill(a, out, ("--stream-interval-ms", "0")),
        # mocker at speedup 5: decode steps ~1.1 ms of wall time each, so tokens are
        # spread over the stream as Dynamo's mocker spreads them (its steps measured
        # ~1.3 ms at c=32: E2E - TTFT over 31 gaps), instead of arriving in one burst
        "tokenmill-speedup5": lambda a, out: run_tokenmill(a, out, ("--mocker-speedup", "5")),
        # the frontend on uvloop, the default before this was measured
        "tokenmill-uvloop": lambda a, out: run_tokenmill(a, out, ("--event-loop", "uvloop")),
        "tokenmill-speedup5-uvloop": lambda a, out: run_tokenmill(
            a, out, ("--mocker-speedup", "5", "--event-loop", "uvloop")
        ),
    }
    runs: dict[str, dict[int, list[dict]]] = {s: {c: [] for c in a.concurrency} for s in a.stacks}
    for r in range(a.runs):
        for stack in a.stacks if r % 2 == 0 else list(reversed(a.stacks)):
            for c, res in runners[stack](a, work / f"{stack}_{r}").items():
                runs[stack][c].append(brief(res))
                print(json.dumps({"round": r, "stack": stack, "c": c, **brief(res)}), flush=True)
        write(a, runs)
    return 0


def write(a: argparse.Namespace, runs: dict) -> None:
    doc = {
        "what": "tokenmill vs Dynamo 1.6.1 online, interleaved; see benchmarks/online_dynamo.py",
        "requests": a.requests,
        "warmup": a.warmup,
        "input_words": 128,
        "max_tokens": 32,
        "host": {"cpus": os.cpu_count(), "loadavg": os.getloadavg()},
        "median": {s: {str(c): medians(v) for c, v in byc.items() if v} for s, byc in runs.items()},
        "runs": {s: {str(c): v for c, v in byc.items()} for s, byc in runs.items()},
    }
    Path(a.out).write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
