"""Is the replay unchanged? Runs ``tokenmill replay`` from two source roots, mode by mode.

For each router mode the old root's run and then the new root's run go to a fresh
subprocess each (``PYTHONPATH=<root> python -m tokenmill replay ... --save-requests``), one
at a time and interleaved (old rr, new rr, old dynamo, new dynamo, ...) so that a change in
the machine's load hits both sides alike; ``--repeats`` such pairs, the fastest run of each
side kept (every run must agree with every other but for its times). The replay is deterministic: the two reports must be
equal but for ``wall_s``, and the per-request records (first token, finish, worker, cached
tokens of every request) must hash the same.

Writes ``benchmarks/results/replay_equivalence.json``: per mode both sets of headline numbers
(TTFT mean/p99, ITL mean, E2E mean, kv_reuse_ratio, completed), new/old ratios, the replay's
own wall time (``wall_s``: replay construction and run, not the trace read), the
subprocess's wall and CPU time (``process_s``, ``process_cpu_s``: the CPU time is the steadier
number on a machine shared with other work), and ``identical``.

usage: python benchmarks/replay_equivalence.py --old /work/base --new . [--modes kv,dynamo]
                                               [--max-requests N] [--repeats R] [--out PATH]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRACE = Path("/work/shared/data/traces/conversation_trace.jsonl")
OUT = ROOT / "benchmarks/results/replay_equivalence.json"
MODES = ("round-robin", "dynamo", "kv")
# not part of the equality check (requests: compared by digest)
VOLATILE = ("wall_s", "requests", "process_s", "process_cpu_s")


def run_replay(root: Path, mode: str, args: argparse.Namespace) -> dict:
    """One replay of ``mode`` with the code under ``root``; its report plus digest and times."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.json"
        cmd = [
            sys.executable,
            "-m",
            "tokenmill",
            "replay",
            "--trace",
            str(args.trace),
            "--workers",
            str(args.workers),
            "--router-mode",
            mode,
            "--arrival-speed",
            str(args.speed),
            "--seed",
            str(args.seed),
            "--output",
            str(out),
            "--save-requests",
        ]
        if args.max_requests:
            cmd += ["--max-requests", str(args.max_requests)]
        env = {**os.environ, "PYTHONPATH": str(root)}
        c0, t0 = _children_cpu_s(), time.perf_counter()
        subprocess.run(cmd, env=env, check=True, cwd=root, stdout=subprocess.DEVNULL)
        process_s, cpu_s = time.perf_counter() - t0, _children_cpu_s() - c0
        report = json.loads(out.read_text())
    records = json.dumps(report["requests"], sort_keys=True).encode()
    report["requests_sha256"] = hashlib.sha256(records).hexdigest()
    report["process_s"] = round(process_s, 2)
    report["process_cpu_s"] = round(cpu_s, 2)
    return report


def _children_cpu_s() -> float:
    """User + system CPU seconds of the finished subprocesses so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def headline(report: dict) -> dict:
    return {
        "ttft_mean": report["ttft"]["mean"],
        "ttft_p99": report["ttft"]["p99"],
        "itl_mean": report["itl"]["mean"],
        "e2e_mean": report["e2e"]["mean"],
        "kv_reuse_ratio": report["kv_reuse_ratio"],
        "completed": report["completed"],
        "wall_s": report["wall_s"],
        "process_s": report["process_s"],
        "process_cpu_s": report["process_cpu_s"],
    }


def fastest(reports: list[dict]) -> dict:
    """The report of the run with the least wall time: the one least disturbed by other work
    on the machine (the runs are deterministic, so all but their times agree)."""
    return min(reports, key=lambda r: r["wall_s"])


def compare(old: dict, new: dict) -> dict:
    """Both headlines, new/old ratios, and whether the reports agree but for wall times."""
    a, b = headline(old), headline(new)
    ratios = {k: (b[k] / a[k] if a[k] else None) for k in a}
    strip = lambda r: {k: v for k, v in r.items() if k not in VOLATILE}  # noqa: E731
    diff = sorted(k for k in set(old) | set(new) if strip(old).get(k) != strip(new).get(k))
    return {"old": a, "new": b, "ratio": ratios, "identical": not diff, "differing_keys": diff}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old", type=Path, required=True, help="source root of the old code")
    p.add_argument("--new", type=Path, default=ROOT, help="source root of the new code")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--trace", type=Path, default=TRACE)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--speed", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-requests", type=int, default=None)
    p.add_argument("--repeats", type=int, default=1, help="runs per root and mode (fastest kept)")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    runs = {}
    for mode in args.modes.split(","):
        olds, news = [], []
        for _ in range(args.repeats):
            olds.append(run_replay(args.old.resolve(), mode, args))
            news.append(run_replay(args.new.resolve(), mode, args))
        runs[mode] = r = compare(fastest(olds), fastest(news))
        r["wall_s_all"] = {"old": [x["wall_s"] for x in olds], "new": [x["wall_s"] for x in news]}
        r["identical"] = r["identical"] and all(
            compare(olds[0], x)["identical"] for x in olds + news
        )
        print(
            f"{mode}: identical={r['identical']} wall old {r['old']['wall_s']} s new "
            f"{r['new']['wall_s']} s (x{r['ratio']['wall_s']:.3f})",
            flush=True,
        )
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"config": config, "runs": runs}, indent=1) + "\n")
    return 0 if all(r["identical"] for r in runs.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
