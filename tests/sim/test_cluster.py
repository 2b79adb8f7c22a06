"""The replay with a changing cluster: workers join after their start-up time, drain, are
killed or migrate, with a scripted planner (exact mechanics) and with the real one."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from tokenmill.launch.cli import main
from tokenmill.planner.observation import PoolDecision, PoolLimits
from tokenmill.planner.planner import Planner, PlannerConfig
from tokenmill.sim.cluster import ClusterConfig, ClusterReplay
from tokenmill.sim.replay import ReplayConfig
from tokenmill.sim.trace import TraceRequest


@dataclass
class ScriptedPlanner:
    """Targets by tick number; records what it observed."""

    targets: list[int]
    drain: bool = True
    config: PlannerConfig = field(
        default_factory=lambda: PlannerConfig(
            mode="load", interval_s=1.0, limits={"both": PoolLimits(1, 4)}
        )
    )
    seen: list = field(default_factory=list)
    pools: tuple = ("both",)

    def plan(self, observations):
        obs = observations["both"]
        self.seen.append(obs)
        i = min(len(self.seen) - 1, len(self.targets) - 1)
        return [PoolDecision("both", obs.num_provisioned, self.targets[i], "script", self.drain)]


def trace(n: int, every_ms: float, out: int = 50, isl: int = 256) -> list[TraceRequest]:
    return [TraceRequest(f"r{i}", i * every_ms, isl, out, (10_000 + i,)) for i in range(n)]


CFG = ReplayConfig(num_workers=1, num_blocks=1024)


def test_a_new_worker_serves_only_after_its_startup():
    planner = ScriptedPlanner([2])
    replay = ClusterReplay(CFG, trace(60, 50.0), planner, ClusterConfig(startup_s=1.5))
    report = replay.run()
    assert report["completed"] == 60 and report["sla_attainment"] is not None
    # asked for at the first tick (1 s), up at 2.5 s
    samples = [(s["time_s"], s["up"], s["starting"]) for s in report["replica_timeline"]["both"]]
    assert samples[:4] == [(0.0, 1, 0), (1.0, 1, 1), (2.0, 1, 1), (2.5, 2, 0)]
    first_on_new = min(r.arrival_ms for r in replay.records.values() if r.worker == 1)
    assert first_on_new >= 2500.0
    assert replay.workers[1].routable
    # worker 0 the whole run, worker 1 from 1 s (asked for) to the end
    start, end = 0.0, max(r.finish_ms for r in replay.records.values())
    assert report["worker_seconds"] == pytest.approx((end - start) / 1e3 * 2 - 1.0, abs=1e-3)
    assert report["worker_seconds_per_pool"] == {"both": report["worker_seconds"]}


def test_drain_finishes_in_flight_requests_and_nothing_fails():
    planner = ScriptedPlanner([2, 2, 2, 1])
    replay = ClusterReplay(CFG, trace(120, 50.0, out=200), planner, ClusterConfig(startup_s=0.5))
    report = replay.run()
    assert report["completed"] == report["num_requests"] == 120
    assert report["killed_requests"] == 0 and report["planner"]["migrated_requests"] == 0
    gone = [w for w in replay.workers.values() if w.left_ms is not None]
    assert len(gone) == 1 and gone[0].left_ms > 4000.0  # drained after the 4 s tick, then left
    late = [r for r in replay.records.values() if r.arrival_ms > 4000.0]
    assert late and all(r.worker != gone[0].worker_id for r in late)
    for w in replay.workers.values():
        w.core.check_integrity()


def test_past_the_deadline_requests_migrate_with_their_whole_output():
    planner = ScriptedPlanner([2, 2, 2, 1])
    cluster = ClusterConfig(startup_s=0.5, drain_deadline_s=0.0)
    replay = ClusterReplay(CFG, trace(80, 50.0, out=400), planner, cluster)
    report = replay.run()
    assert report["planner"]["migrated_requests"] > 0
    assert report["completed"] == 80
    assert all(r.num_output_tokens == 400 for r in replay.records.values())


def test_killing_fails_the_in_flight_requests():
    planner = ScriptedPlanner([2, 2, 2, 1], drain=False)
    replay = ClusterReplay(CFG, trace(80, 50.0, out=400), planner, ClusterConfig(startup_s=0.5))
    report = replay.run()
    assert report["killed_requests"] > 0
    assert report["completed"] == 80 - report["killed_requests"]


def test_the_real_planner_grows_under_load_and_shrinks_after():
    cfg = PlannerConfig(mode="load", interval_s=1.0, limits={"both": PoolLimits(1, 4)})
    holder = {}
    planner = Planner(cfg, lambda: holder["r"].now / 1e3 if "r" in holder else 0.0)
    reqs = trace(400, 10.0, out=300, isl=2048) + [
        TraceRequest(f"late{i}", 60_000.0 + i * 500.0, 64, 4, (90_000 + i,)) for i in range(40)
    ]
    replay = holder["r"] = ClusterReplay(CFG, reqs, planner, ClusterConfig(startup_s=2.0))
    report = replay.run()
    ups = [s["up"] for s in report["replica_timeline"]["both"]]
    assert max(ups) > 1 and ups[-1] < max(ups)
    assert report["completed"] == 440


def test_replay_cli_planned_and_static(tmp_path):
    path = tmp_path / "t.jsonl"
    rows = [
        {"timestamp": i * 20, "input_length": 300, "output_length": 20, "hash_ids": [i]}
        for i in range(200)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out, log, png = tmp_path / "r.json", tmp_path / "d.jsonl", tmp_path / "t.png"
    argv = [
        "replay",
        "--trace",
        str(path),
        "--planner",
        "load",
        "--min-workers",
        "1",
        "--max-workers",
        "3",
        "--worker-startup-s",
        "1",
        "--planner-interval-s",
        "1",
        "--planner-log",
        str(log),
        "--timeline-plot",
        str(png),
        "--output",
        str(out),
    ]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert {"sla_attainment", "worker_seconds", "replica_timeline"} <= set(report)
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert lines and {"observation", "target", "current", "reason"} <= set(lines[0])
    assert png.stat().st_size > 0
    assert main(["replay", "--trace", str(path), "--workers", "2", "--output", str(out)]) == 0
    static = json.loads(out.read_text())
    assert static["worker_seconds"] == pytest.approx(2 * static["sim_duration_s"], abs=1e-3)


def test_prefill_and_decode_pools_are_planned_separately():
    limits = {"prefill": PoolLimits(1, 3), "decode": PoolLimits(1, 3)}
    cfg = PlannerConfig(mode="load", interval_s=1.0, limits=limits)
    holder = {}
    planner = Planner(cfg, lambda: holder["r"].now / 1e3 if "r" in holder else 0.0)
    split = ReplayConfig(num_workers=0, num_blocks=1024, num_decode_workers=1)
    reqs = trace(300, 10.0, out=300, isl=2048)
    replay = holder["r"] = ClusterReplay(split, reqs, planner, ClusterConfig(startup_s=1.0))
    report = replay.run()
    assert report["completed"] == 300
    assert set(report["worker_seconds_per_pool"]) == {"prefill", "decode"}
    assert set(report["replica_timeline"]) == {"prefill", "decode"}
    assert max(s["up"] for s in report["replica_timeline"]["decode"]) > 1
    roles = {w.role.value for w in replay.workers.values()}
    assert roles == {"prefill", "decode"}


def test_planner_flags_are_checked(tmp_path, capsys):
    path = tmp_path / "t.jsonl"
    path.write_text(
        json.dumps({"timestamp": 0, "input_length": 10, "output_length": 2, "hash_ids": [1]}) + "\n"
    )
    argv = [
        "replay",
        "--trace",
        str(path),
        "--planner",
        "load",
        "--min-workers",
        "3",
        "--max-workers",
        "2",
    ]
    assert main(argv) == 2
    assert "--min-workers must not exceed --max-workers" in capsys.readouterr().err
    assert main(["serve", "--engine", "mocker", "--planner", "sla", "--port", "1"]) == 2
    assert "needs --planner-profile" in capsys.readouterr().err
