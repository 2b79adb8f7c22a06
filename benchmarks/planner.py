"""Planner benchmark: replay real, changing traces on mocker workers with static pools of
every size, the ``dynamo`` control (Dynamo's planner algorithm) and tokenmill's ``sla``
planner; writes benchmarks/results/planner.json and the replica timeline plots in docs/.

Traces (shared/data/traces), scaled so that the peak needs about 8-16 mocker workers:

- AIBrix ``8min_up_and_down``: 20 overlapped copies (copy k's arrivals shifted by k * 50 ms,
  its prompts distinct: ``sim.trace.scaled_copies``), so the 8-minute ramp keeps its shape
  at 20 times the rate;
- Azure conversation trace (1 h): arrivals 6 times faster (10 minutes) and 2 copies, 12
  times the rate.

Per trace, each run reports ``sla_attainment`` (share of requests with TTFT <= 2 s and
ITL <= 25 ms: failures count as misses) and ``worker_seconds``. The baseline is the
smallest static pool that meets the targets at the peak, read as: whose attainment is
within 0.01 of the best static pool's (the attainment of an aggregated pool saturates below
1: requests whose few output tokens share steps with long prefills miss the ITL target at
any size). Goal (issue 17): tokenmill's attainment >= the baseline's with >= 30% fewer
worker-seconds, and better than ``dynamo`` on both.

Run: ``PYTHONPATH=. python benchmarks/planner.py [--quick]`` (about 15 minutes alone on 2
cores; --quick: a quarter of the load, smaller pools, for a smoke run).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tokenmill.bench.plots import plot_replica_timeline  # noqa: E402
from tokenmill.core.timing_profile import TimingProfile  # noqa: E402
from tokenmill.launch.planning import _VirtualClock  # noqa: E402
from tokenmill.launch.specs import PlannerSpec  # noqa: E402
from tokenmill.planner.planner import Planner  # noqa: E402
from tokenmill.sim.cluster import ClusterConfig, ClusterReplay, static_cost_metrics  # noqa: E402
from tokenmill.sim.replay import Replay, ReplayConfig  # noqa: E402
from tokenmill.sim.trace import scaled_copies  # noqa: E402
from tokenmill.sim.workload import read_trace  # noqa: E402

TRACES = ROOT.parent / "shared" / "data" / "traces"
PROFILE = ROOT / "benchmarks" / "profiles" / "mocker.json"
SLO_TTFT_MS, SLO_ITL_MS = 2_000.0, 25.0
STARTUP_S = 10.0


def workloads(quick: bool) -> dict:
    f = 4 if quick else 1
    return {
        "aibrix_8min_up_and_down": dict(
            file="8min_up_and_down.jsonl",
            speed=1.0,
            copies=20 // f,
            shift_ms=50.0,
            statics=[2, 3, 4] if quick else [4, 6, 8, 10, 12, 14],
        ),
        "azure_conversation": dict(
            file="AzureLLMInferenceTrace_conv.csv",
            speed=6.0,
            copies=max(1, 2 // f),
            shift_ms=50.0,
            statics=[2, 3, 4] if quick else [4, 6, 8, 10, 12, 14],
        ),
    }


def load(w: dict) -> list:
    reqs = read_trace(TRACES / w["file"], arrival_speed=w["speed"])
    return scaled_copies(reqs, len(reqs) * w["copies"], w["shift_ms"]) if w["copies"] > 1 else reqs


def summary(policy: str, report: dict, wall_s: float) -> dict:
    return {
        "policy": policy,
        "sla_attainment": report["sla_attainment"],
        "worker_seconds": report["worker_seconds"],
        "num_requests": report["num_requests"],
        "completed": report["completed"],
        "killed_requests": report.get("killed_requests", 0),
        "migrated_requests": report.get("planner", {}).get("migrated_requests", 0),
        "ttft_p90_ms": report["ttft"]["p90"],
        "itl_mean_ms": report["itl"]["mean"],
        "itl_p90_ms": report["itl"]["p90"],
        "max_workers_up": max(
            (s["up"] for s in report.get("replica_timeline", {}).get("both", [])), default=None
        ),
        "wall_s": round(wall_s, 1),
    }


def run_static(reqs: list, n: int) -> dict:
    cfg = ReplayConfig(num_workers=n, sla_ttft_ms=SLO_TTFT_MS, sla_itl_ms=SLO_ITL_MS)
    report = Replay(cfg, reqs).run()
    report.update(static_cost_metrics(report, {"both": n}))
    return report


def run_planned(reqs: list, mode: str, profile: TimingProfile, max_n: int) -> dict:
    spec = PlannerSpec(
        mode, SLO_TTFT_MS, SLO_ITL_MS, 1, max_n, startup_s=STARTUP_S, drain_deadline_s=60.0
    )
    clock = _VirtualClock()
    planner = Planner(spec.planner_config(), clock, profile)
    cfg = ReplayConfig(num_workers=1, sla_ttft_ms=SLO_TTFT_MS, sla_itl_ms=SLO_ITL_MS)
    replay = ClusterReplay(cfg, reqs, planner, ClusterConfig(STARTUP_S, 60.0))
    clock.replay = replay
    return replay.run()


def verdict(runs: list[dict]) -> dict:
    statics = [r for r in runs if r["policy"].startswith("static-")]
    best = max(r["sla_attainment"] for r in statics)
    meeting = [r for r in statics if r["sla_attainment"] >= best - 0.01]
    base = min(meeting, key=lambda r: r["worker_seconds"])
    ours = next(r for r in runs if r["policy"] == "tokenmill")
    dyn = next(r for r in runs if r["policy"] == "dynamo")
    saving = 1.0 - ours["worker_seconds"] / base["worker_seconds"]
    return {
        "baseline": base["policy"],
        "tokenmill_vs_baseline_worker_seconds_saving": round(saving, 4),
        "tokenmill_minus_baseline_sla": round(ours["sla_attainment"] - base["sla_attainment"], 4),
        "goal_sla_at_least_baseline": ours["sla_attainment"] >= base["sla_attainment"],
        "goal_30pct_fewer_worker_seconds": saving >= 0.30,
        "goal_beats_dynamo_on_both": ours["sla_attainment"] > dyn["sla_attainment"]
        and ours["worker_seconds"] < dyn["worker_seconds"],
    }


def live_timeline(log: Path) -> list[dict]:
    """A ``serve --planner-log`` as timeline samples (seconds from its first decision)."""
    lines = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
    t0 = lines[0]["time_s"] if lines else 0.0
    return [
        {
            "time_s": round(d["time_s"] - t0, 3),
            "up": d["observation"]["num_up"],
            "starting": d["observation"]["num_starting"],
            "draining": d["observation"]["num_draining"],
            "target": d["target"],
        }
        for d in lines
    ]


def _pairs(xs: list) -> list:
    return list(zip(xs, xs[1:], strict=False))


def record_live(log: Path, bench: Path, out_path: Path) -> None:
    """Adds the live run (``serve --planner load`` under ``bench serve``) to the results and
    plots its replica timeline (docs/planner_live.png)."""
    timeline = live_timeline(log)
    r = json.loads(bench.read_text())["summary"]
    results = json.loads(out_path.read_text()) if out_path.exists() else {}
    results["live"] = {
        "command": "serve --engine mocker --planner load --min-workers 1 --max-workers 3 "
        "--max-num-seqs 4 --planner-interval-s 5; bench serve --trace 8min_up_and_down.jsonl "
        "--format aibrix --speed 2",
        "num_requests": r["num_requests"],
        "completed": r["completed"],
        "failed": r["failed"],
        "errors": r["errors"],
        "duration_s": round(r["duration_s"], 1),
        "ttft_p90_ms": r["ttft"]["p90"],
        "max_workers_up": max(s["up"] for s in timeline),
        "scale_ups": sum(1 for a, b in _pairs(timeline) if b["target"] > a["target"]),
        "scale_downs": sum(1 for a, b in _pairs(timeline) if b["target"] < a["target"]),
        "timeline": timeline,
    }
    out_path.write_text(json.dumps(results, indent=1))
    plot_replica_timeline(timeline, ROOT / "docs" / "planner_live.png")


def markdown(results: dict) -> str:
    """The results as the tables docs/planner.md shows."""
    out = []
    for name, r in results.items():
        if not isinstance(r, dict) or "runs" not in r:
            continue
        out += [f"**{name}** ({r['num_requests']} requests; baseline {r['baseline']})", ""]
        out += [
            "| policy | SLA attainment | worker-s | killed | max up | TTFT p90 ms | ITL p90 ms |"
        ]
        out += ["|---|---|---|---|---|---|---|"]
        for run in r["runs"]:
            out.append(
                f"| {run['policy']} | {run['sla_attainment']:.4f} | {run['worker_seconds']:.0f} "
                f"| {run['killed_requests']} | {run['max_workers_up'] or '-'} "
                f"| {run['ttft_p90_ms']} | {run['itl_p90_ms']} |"
            )
        goals = {k: v for k, v in r.items() if k.startswith(("goal", "tokenmill_"))}
        out += ["", "; ".join(f"{k}: {v}" for k, v in goals.items()), ""]
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--live-log", default=None, help="record a live run: its --planner-log")
    ap.add_argument("--live-bench", default=None, help="... and its bench serve results.json")
    ap.add_argument("--markdown", action="store_true", help="print --out's tables and exit")
    ap.add_argument("--only", default=None, help="one trace name")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "planner.json"))
    args = ap.parse_args()
    out_path = Path(args.out)
    if args.markdown:
        print(markdown(json.loads(out_path.read_text())))
        return 0
    if args.live_log:
        record_live(Path(args.live_log), Path(args.live_bench), out_path)
        return 0
    profile = TimingProfile.load(PROFILE)
    results = json.loads(out_path.read_text()) if out_path.exists() and args.only else {}
    results["config"] = {
        "slo_ttft_ms": SLO_TTFT_MS,
        "slo_itl_ms": SLO_ITL_MS,
        "worker_startup_s": STARTUP_S,
        "profile": str(PROFILE.relative_to(ROOT)),
        "note": "2-core machine shared with other work: wall_s is noisy; the metrics are "
        "virtual-time and deterministic",
    }
    for name, w in workloads(args.quick).items():
        if args.only and name != args.only:
            continue
        reqs = load(w)
        runs, timelines = [], {}
        max_n = max(w["statics"]) + 2
        for mode, label in (("sla", "tokenmill"), ("dynamo", "dynamo")):
            t0 = time.perf_counter()
            report = run_planned(reqs, mode, profile, max_n)
            runs.append(summary(label, report, time.perf_counter() - t0))
            timelines[label] = report["replica_timeline"]["both"]
            print(name, runs[-1], flush=True)
        for n in w["statics"]:
            t0 = time.perf_counter()
            runs.append(summary(f"static-{n}", run_static(reqs, n), time.perf_counter() - t0))
            print(name, runs[-1], flush=True)
        results[name] = {"workload": w, "num_requests": len(reqs), "runs": runs, **verdict(runs)}
        results[name]["timelines"] = timelines
        plot = ROOT / "docs" / f"planner_{name}.png"
        plot_replica_timeline([], plot, timelines)
        out_path.write_text(json.dumps(results, indent=1))
        print(
            name, {k: v for k, v in results[name].items() if k.startswith(("goal", "tok", "base"))}
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
