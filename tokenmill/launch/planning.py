"""Assembly of a planned replay (``tokenmill replay --planner ...``): the planner's timing
profile (``--planner-profile``, else the replay's own ``--timing-profile`` when it is a
``TimingProfile``, else the simulated mocker measured by ``bench.profile`` at start: about a
second), the ``Planner`` on the replay's virtual clock, the ``ClusterReplay``, the decision
log and the replica timeline plot."""

from __future__ import annotations

import contextlib
from typing import Any

from tokenmill.launch.specs import PlannerSpec


def planner_profile(spec: PlannerSpec, cfg: Any, timing: Any) -> Any:
    from tokenmill.bench.profile import ProfileConfig, Profiler
    from tokenmill.core.timing_profile import TimingProfile
    from tokenmill.engine.builder import build_mock_core
    from tokenmill.engine.config import CacheConfig, SchedulerConfig

    if spec.profile:
        return TimingProfile.load(spec.profile)
    if isinstance(timing, TimingProfile):
        return timing
    sched = SchedulerConfig(
        max_num_seqs=cfg.max_num_seqs,
        max_num_batched_tokens=cfg.max_num_batched_tokens,
        max_model_len=cfg.num_blocks * cfg.block_size,
        watermark=cfg.watermark,
    )
    core = build_mock_core(CacheConfig(cfg.block_size, cfg.num_blocks), sched, timing=timing)
    return Profiler(core, "mocker", lambda: core.executor.last_step_ms).run(ProfileConfig())


def run_planned_replay(spec: PlannerSpec, cfg: Any, requests: list, timing: Any) -> tuple:
    """``(report, replay)`` of ``requests`` on a pool the planner resizes."""
    from tokenmill.planner.planner import Planner
    from tokenmill.sim.cluster import ClusterConfig, ClusterReplay

    profile = planner_profile(spec, cfg, timing) if spec.mode != "load" else None
    clock = _VirtualClock()
    planner = Planner(spec.planner_config(), clock, profile)
    cluster = ClusterConfig(spec.startup_s, spec.drain_deadline_s)
    with contextlib.ExitStack() as stack:
        log = stack.enter_context(open(spec.log, "w")) if spec.log else None
        replay = ClusterReplay(cfg, requests, planner, cluster, timing, log)
        clock.replay = replay
        report = replay.run()
    return report, replay


class _VirtualClock:
    """The replay's virtual time in seconds (the planner's injected clock)."""

    replay: Any = None

    def __call__(self) -> float:
        return 0.0 if self.replay is None else self.replay.now / 1000.0


def plot_timeline(report: dict, path: str) -> Any:
    from pathlib import Path

    from tokenmill.bench.plots import plot_replica_timeline

    timelines = report.get("replica_timeline", {})
    if len(timelines) == 1:
        return plot_replica_timeline(next(iter(timelines.values())), Path(path))
    return plot_replica_timeline([], Path(path), {p: t for p, t in timelines.items()})
