"""Replay with a changing cluster: the planner (``tokenmill.planner``) resizes the replay's
pools of mocker workers (``both``, or ``prefill`` and ``decode`` in a P/D split) during the
run, on the replay's virtual clock, through ``Replay``'s planner seams (``add_worker(role,
delay_ms)``, ``remove_worker``, ``call_at``, ``on_worker_left``).

A worker's life::

    starting --(startup_s)--> up --(scale-down)--> draining --(idle)--> gone
        \\______________________(removed while starting)____________/
                                  up --(kill: drain=False)--> gone

- a new worker costs from the moment it is asked for and joins its pool's router
  ``startup_s`` later, as a live worker registers once its engine is built;
- a draining worker leaves its router at once (no new requests, as a live worker
  deregisters), finishes its in-flight requests and is gone when idle. In the aggregated
  pool, requests still on it ``drain_deadline_s`` after the drain began migrate: aborted
  there and re-sent to a live worker with the rest of their output (the frontend's
  migration), so none fails. (In a split the deadline is not enforced: a drain waits.)
- a killed worker (the ``dynamo`` control: Dynamo removes workers without draining) has its
  requests aborted and leaves; they fail (``killed_requests`` in the report);
- the worker that leaves: a starting one first (newest first), then the up one with the
  fewest unfinished requests; never the last up worker of a pool.

Every ``PlannerConfig.interval_s`` a timer builds each pool's ``PoolObservation`` over the
window since the last tick (arrivals with their lengths, TTFT of first tokens, ITL and prefix
hits of finished requests, scheduler snapshots of the pool's up workers, its router queue),
asks the planner and applies the ``PoolDecision``s.

Reports (``cost_metrics``, planned and static runs alike): ``sla_attainment`` (the share of
requests meeting both targets: the goodput fraction), ``worker_seconds`` (the sum over
workers of the time from being asked for to gone, within the run: first arrival to last
finish) and ``worker_seconds_per_pool``; planned runs add ``replica_timeline`` (per pool,
one sample per tick and per change: time, up, starting, draining, target),
``killed_requests`` and ``planner`` (mode, decisions, workers started, migrations), and with
``decision_log`` one JSON line per decision (the observation and the decision's inputs).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import IO, Any

from tokenmill.bench.metrics import percentile
from tokenmill.core.request import RequestOutput
from tokenmill.core.sampling import SamplingParams
from tokenmill.engine.mocker import StepTiming
from tokenmill.planner.observation import PoolDecision, PoolObservation, WorkerObservation
from tokenmill.planner.planner import Planner
from tokenmill.router.router import Queued, Routed
from tokenmill.sim.replay import Replay, ReplayConfig, Role, SimWorker
from tokenmill.sim.report import RequestRecord
from tokenmill.sim.trace import TraceRequest

STARTING, UP, DRAINING, GONE = "starting", "up", "draining", "gone"


@dataclass(frozen=True)
class ClusterConfig:
    startup_s: float = 30.0
    drain_deadline_s: float = 60.0


class _Window:
    """What happened since the last tick (shared by every pool: the frontend's traffic)."""

    def __init__(self) -> None:
        self.isl: list[int] = []
        self.osl: list[int] = []
        self.ttft: list[float] = []
        self.itl: list[float] = []
        self.dur: list[float] = []
        self.prompt = self.cached = 0


def initial_config(cfg: ReplayConfig, planner: Planner) -> ReplayConfig:
    """``cfg`` with each planned pool at its minimum size."""
    limits = planner.config.limits
    for pool, lim in limits.items():
        if lim.min_replicas < 1:
            raise ValueError(f"pool {pool}: a replayed pool needs min_replicas >= 1")
    if "both" in limits:
        return replace(cfg, num_workers=limits["both"].min_replicas)
    if set(limits) != {"prefill", "decode"}:
        raise ValueError(f"planned pools must be 'both' or 'prefill'+'decode', got {set(limits)}")
    return replace(
        cfg,
        num_prefill_workers=limits["prefill"].min_replicas,
        num_decode_workers=limits["decode"].min_replicas,
    )


class ClusterReplay(Replay):
    def __init__(
        self,
        cfg: ReplayConfig,
        requests: list[TraceRequest],
        planner: Planner,
        cluster: ClusterConfig = ClusterConfig(),
        timing: StepTiming | None = None,
        decision_log: IO[str] | None = None,
    ):
        super().__init__(initial_config(cfg, planner), requests, timing)
        self.planner, self.cluster, self._log = planner, cluster, decision_log
        self.asked_ms = dict.fromkeys(self.workers, 0.0)
        self.num_initial = len(self.workers)
        self.by_id = {r.request_id: r for r in self.requests}
        self.timeline: dict[str, list[dict[str, Any]]] = {p: [] for p in planner.pools}
        self.decisions: list[PoolDecision] = []
        self.window = _Window()
        self.num_migrated = self.num_killed = 0
        self._migrations: dict[str, tuple[int, int]] = {}  # id -> (tokens done, tokens left)
        self.on_worker_left = lambda worker: self._sample(worker.role.value)
        self.call_at(planner.config.interval_s * 1000.0, ClusterReplay._tick)
        for pool in planner.pools:
            self._sample(pool)

    # ---- worker states -------------------------------------------------------------------
    def state(self, worker: SimWorker) -> str:
        if worker.left_ms is not None:
            return GONE
        if worker.routable:
            return UP
        return DRAINING if worker.draining else STARTING

    def _members(self, pool: str, *states: str) -> list[SimWorker]:
        role = Role(pool)
        return [
            w for _, w in sorted(self.workers.items()) if w.role is role and self.state(w) in states
        ]

    def _work_left(self) -> bool:
        busy = any(not w.idle or w.busy for w in self.workers.values())
        queued = any(len(p.router.queue) for p in self.pools.values())
        return self._next < len(self.requests) or busy or queued

    # ---- recording -----------------------------------------------------------------------
    def _arrive(self, req: TraceRequest) -> None:
        self.window.isl.append(req.input_length)
        self.window.osl.append(req.output_length)
        super()._arrive(req)

    def _on_output(self, worker: SimWorker, out: RequestOutput) -> None:
        rec = self.records[out.request_id]
        first = rec.first_token_ms < 0
        super()._on_output(worker, out)
        moved = self._migrations.get(out.request_id)
        if moved is not None and out.finish_reason is not None:
            rec.num_output_tokens += moved[0]  # the tokens made before the migration
        w = self.window
        if first and rec.first_token_ms >= 0:
            w.ttft.append(rec.first_token_ms - rec.arrival_ms)
        if out.finish_reason is not None and rec.finish_ms >= 0:
            w.dur.append((rec.finish_ms - rec.arrival_ms) / 1000.0)
            w.prompt += rec.input_length
            w.cached += rec.num_cached_tokens
            if rec.num_output_tokens > 1:
                gap = (rec.finish_ms - rec.first_token_ms) / (rec.num_output_tokens - 1)
                w.itl.append(gap)

    # ---- the planner's tick --------------------------------------------------------------
    def _tick(self) -> None:
        window, self.window = self.window, _Window()
        obs = {pool: self.observe(pool, window) for pool in self.planner.pools}
        for d in self.planner.plan(obs):
            self.decisions.append(d)
            if self._log is not None:
                line = {"observation": obs[d.pool].to_dict(), **d.to_dict()}
                self._log.write(json.dumps(line) + "\n")
            self._apply(d)
            self._sample(d.pool, d.target)
        if self._work_left():
            self.call_at(self.now + self.planner.config.interval_s * 1000.0, ClusterReplay._tick)

    def observe(self, pool: str, w: _Window) -> PoolObservation:
        up = self._members(pool, UP)
        return PoolObservation(
            window_s=self.planner.config.interval_s,
            num_requests=len(w.isl),
            mean_isl=_mean(w.isl),
            mean_osl=_mean(w.osl),
            prefix_hit=w.cached / w.prompt if w.prompt else 0.0,
            ttft_mean_ms=_mean(w.ttft) if w.ttft else None,
            ttft_p90_ms=percentile(sorted(w.ttft), 90) if w.ttft else None,
            itl_mean_ms=_mean(w.itl) if w.itl else None,
            itl_p90_ms=percentile(sorted(w.itl), 90) if w.itl else None,
            mean_request_s=_mean(w.dur) if w.dur else None,
            router_queue=len(self.pools[Role(pool)].router.queue),
            num_up=len(up),
            num_starting=len(self._members(pool, STARTING)),
            num_draining=len(self._members(pool, DRAINING)),
            workers=tuple(_worker_obs(worker) for worker in up),
        )

    def _apply(self, d: PoolDecision) -> None:
        current = len(self._members(d.pool, UP, STARTING))
        for _ in range(d.target - current):
            delay = self.cluster.startup_s * 1000.0
            wid = self.add_worker(d.pool, delay)
            self.asked_ms[wid] = self.now
            # after the replay's own join timer (same time, pushed later): sample the join
            self.call_at(self.now + delay, lambda replay, pool=d.pool: replay._sample(pool))
        for _ in range(current - d.target):
            self._remove_one(d.pool, d.drain)

    def _remove_one(self, pool: str, drain: bool) -> None:
        starting = self._members(pool, STARTING)
        if starting:
            self.remove_worker(starting[-1].worker_id)
            return
        up = self._members(pool, UP)
        if len(up) <= 1:
            return  # never below one serving worker
        worker = min(up, key=lambda w: (len(w.core.scheduler.requests), -w.worker_id))
        if not drain:
            self._kill(worker)
        self.remove_worker(worker.worker_id)
        if drain and worker.role is Role.BOTH and self.state(worker) == DRAINING:
            deadline = self.now + self.cluster.drain_deadline_s * 1000.0
            self.call_at(deadline, lambda replay: replay._drain_deadline(worker))

    def _kill(self, worker: SimWorker) -> None:
        ids = list(worker.core.scheduler.requests)
        worker.core.abort_requests(ids)
        self.num_killed += len(ids)
        for rid in ids:
            self.records[rid].worker = -1

    def _drain_deadline(self, worker: SimWorker) -> None:
        if self.state(worker) != DRAINING:
            return
        sched = worker.core.scheduler
        moving = [(rid, len(r.output_token_ids)) for rid, r in sched.requests.items()]
        worker.core.abort_requests([rid for rid, _ in moving])
        for rid, num_done in moving:
            self._migrate(rid, num_done)
        if not worker.busy:
            self._retire_if_idle(worker)

    def _migrate(self, rid: str, num_done: int) -> None:
        """Re-sends a request (prompt + what it generated so far) to a live worker of the
        aggregated pool with the rest of its output; its record keeps its first token."""
        rec = self.records[rid]
        self.num_migrated += 1
        router = self.pools[Role.BOTH].router
        router.mark_finished(rid)
        prompt = self.tokens.prompt_blocks(self.by_id[rid])
        done_before = self._migrations.get(rid, (0, 0))[0]
        rest = max(1, rec.output_length - done_before - num_done)
        self._migrations[rid] = (done_before + num_done, rest)
        decision = router.route(rid, prompt[1], len(prompt[0]))
        if isinstance(decision, Routed):
            self._dispatch(decision.worker_id, prompt, rec)
        elif isinstance(decision, Queued):  # waits in the router queue like any request
            rec.pending_prompt = prompt
        else:
            rec.shed = True

    def _dispatch(self, worker_id: int, prompt: tuple, rec: RequestRecord) -> None:
        moved = self._migrations.get(rec.request_id)
        if moved is None:
            super()._dispatch(worker_id, prompt, rec)
            return
        tokens, hashes, local = prompt
        rec.worker = worker_id
        params = SamplingParams(max_tokens=moved[1], ignore_eos=True)
        self._add(worker_id, rec.request_id, tokens, params, (hashes, local))

    # ---- report --------------------------------------------------------------------------
    def _sample(self, pool: str, target: int | None = None) -> None:
        if pool not in self.timeline:
            return
        n = {s: len(self._members(pool, s)) for s in (UP, STARTING, DRAINING)}
        self.timeline[pool].append(
            {
                "time_s": round(self.now / 1000.0, 3),
                **n,
                "target": n[UP] + n[STARTING] if target is None else target,
            }
        )

    def report(self) -> dict:
        report = super().report()
        start, end = _span_ms(self.records.values())
        per_pool: dict[str, float] = {}
        for wid, worker in self.workers.items():
            alive = _alive_s(self.asked_ms.get(wid, 0.0), worker.left_ms, start, end)
            per_pool[worker.role.value] = per_pool.get(worker.role.value, 0.0) + alive
        report.update(cost_metrics(report, per_pool))
        report["replica_timeline"] = self.timeline
        report["killed_requests"] = self.num_killed
        report["planner"] = {
            "mode": self.planner.config.mode,
            "interval_s": self.planner.config.interval_s,
            "num_decisions": len(self.decisions),
            "num_workers_started": len(self.workers) - self.num_initial,
            "migrated_requests": self.num_migrated,
            "killed_requests": self.num_killed,
            "startup_s": self.cluster.startup_s,
        }
        return report


def cost_metrics(report: dict, per_pool_seconds: dict[str, float]) -> dict[str, Any]:
    """The report keys every replay carries (see the module docstring)."""
    return {
        "sla_attainment": report["goodput"]["fraction"],
        "worker_seconds": round(sum(per_pool_seconds.values()), 3),
        "worker_seconds_per_pool": {p: round(s, 3) for p, s in per_pool_seconds.items()},
    }


def static_cost_metrics(report: dict, workers_per_pool: dict[str, int]) -> dict[str, Any]:
    """``cost_metrics`` of fixed pools (``{"both": 8}``, ``{"prefill": 2, "decode": 6}``)."""
    duration = report["sim_duration_s"] or 0.0
    return cost_metrics(report, {p: n * duration for p, n in workers_per_pool.items()})


def _worker_obs(worker: SimWorker) -> WorkerObservation:
    sched = worker.core.scheduler
    waiting_tokens = kv_tokens = 0
    for r in sched.requests.values():
        if r.num_computed_tokens < r.num_prompt_tokens:
            waiting_tokens += r.num_prompt_tokens - r.num_computed_tokens
    for r in sched.running:
        kv_tokens += r.num_tokens
    return WorkerObservation(
        num_running=len(sched.running),
        num_waiting=len(sched.waiting),
        waiting_prefill_tokens=waiting_tokens,
        kv_usage=sched.kv.num_used_blocks / sched.kv.num_blocks,
        num_kv_tokens=kv_tokens,
    )


def _mean(xs: list) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def _span_ms(records) -> tuple[float, float]:
    recs = list(records)
    start = min((r.arrival_ms for r in recs), default=0.0)
    end = max((r.finish_ms for r in recs if r.done), default=start)
    return start, end


def _alive_s(asked_ms: float, left_ms: float | None, start: float, end: float) -> float:
    stop = end if left_ms is None else min(left_ms, end)
    return max(0.0, stop - max(asked_ms, start)) / 1000.0
