"""Replay with a changing cluster: the planner (``tokenmill.planner``) resizes the pool of
mocker workers during the run, on the replay's virtual clock.

``ClusterReplay`` is a ``Replay`` whose workers have a life cycle::

    starting --(startup_s)--> up --(scale-down)--> draining --(idle)--> gone
        \\__________________________(cancelled)__________________________/
                                       up --(kill: drain=False)--> gone

- a new worker costs from the moment it is asked for; it joins the router ``startup_s``
  later (a control event), as a live worker registers once its engine is built;
- a draining worker leaves the router at once (no new requests, as a live worker
  deregisters), finishes its in-flight requests and is gone when idle; requests still on it
  ``drain_deadline_s`` after the drain began are migrated: aborted there and re-sent to a
  live worker with the rest of their output (the frontend's migration), so none fails;
- a killed worker (the ``dynamo`` control: Dynamo removes workers without draining) leaves
  at once and its in-flight requests fail (``killed_requests`` in the report);
- workers picked to leave: starting ones first (newest first), then the up ones with the
  fewest unfinished requests.

Every ``PlannerConfig.interval_s`` a control event builds the pool's ``PoolObservation``
over the window since the last tick (arrivals, TTFT of first tokens, ITL and prefix hits of
finishes, scheduler snapshots of the up workers, the router queue), asks the planner, and
applies its ``PoolDecision``. KV events of workers not in the router are dropped (a live
router forgets a deregistered worker and ignores its events).

Observation caveat: a fast-forwarded decode run (``Replay`` docstring) is applied at its
start, so a tick inside one sees its requests' token counts at the run's end; timing and
the requests' records are exact.

Reports (``cost_metrics``, for planned and static runs alike): ``sla_attainment`` (share of
requests meeting both targets: the goodput fraction), ``worker_seconds`` (sum over workers
of the time from being asked for to gone, within the run: first arrival to last finish),
``worker_seconds_per_pool``; planned runs add ``replica_timeline`` (one sample per tick and
per change: time, up, starting, draining, target), ``planner`` (mode, decisions count,
migrations, kills) and, with ``decision_log``, one JSON line per decision.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

from tokenmill.bench.metrics import percentile
from tokenmill.core.events import KvEvent
from tokenmill.core.request import EngineRequest, RequestOutput
from tokenmill.core.sampling import SamplingParams
from tokenmill.engine.mocker import StepTiming
from tokenmill.planner.observation import PoolDecision, PoolObservation, WorkerObservation
from tokenmill.planner.planner import Planner
from tokenmill.router.router import Queued, Routed
from tokenmill.sim.replay import _CONTROL, _START, Replay, ReplayConfig, _Worker
from tokenmill.sim.report import RequestRecord
from tokenmill.sim.trace import TraceRequest

POOL = "both"  # the aggregated pool (the only one until the replay has pools)
STARTING, UP, DRAINING, GONE = "starting", "up", "draining", "gone"


@dataclass(frozen=True)
class ClusterConfig:
    startup_s: float = 30.0
    drain_deadline_s: float = 60.0
    initial_workers: int | None = None  # None: the pool's minimum


@dataclass
class _Life:
    state: str
    asked_ms: float
    up_ms: float = -1.0
    gone_ms: float = -1.0
    drain_ms: float = -1.0


class _Window:
    """What happened since the last tick."""

    def __init__(self) -> None:
        self.isl: list[int] = []
        self.osl: list[int] = []
        self.ttft: list[float] = []
        self.itl: list[float] = []
        self.dur: list[float] = []
        self.prompt = self.cached = 0


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
        limits = planner.config.limits[POOL]
        if limits.min_replicas < 1:
            raise ValueError("a replayed pool needs at least one worker (min_replicas >= 1)")
        n0 = limits.clamp(cluster.initial_workers or limits.min_replicas)
        super().__init__(dataclasses.replace(cfg, num_workers=n0), requests, timing)
        self.planner, self.cluster, self._log = planner, cluster, decision_log
        self.life = [_Life(UP, 0.0, 0.0) for _ in range(n0)]
        self.by_id = {r.request_id: r for r in self.requests}
        self.timeline: list[dict[str, Any]] = []
        self.decisions: list[PoolDecision] = []
        self.window = _Window()
        self.num_migrated = self.num_killed = 0
        self.num_initial = n0
        self._migrations: dict[str, tuple[int, int]] = {}  # id -> (tokens done, tokens left)
        self._tick_at(planner.config.interval_s * 1000.0)
        self._sample(n0)

    # ---- clock and plumbing --------------------------------------------------------------
    def _control_at(self, t_ms: float, action: Callable[[], None]) -> None:
        self._push(t_ms, _CONTROL, -1, action)

    def _tick_at(self, t_ms: float) -> None:
        self._control_at(t_ms, self._tick)

    def _publish(self, event: KvEvent) -> None:
        if self.life[event.worker_id].state == UP:
            super()._publish(event)

    def _count(self, *states: str) -> int:
        return sum(1 for life in self.life if life.state in states)

    def _work_left(self) -> bool:
        busy = any(w.core.has_unfinished_requests() for w in self.workers)
        return self._next < len(self.requests) or busy or len(self.router.queue) > 0

    # ---- recording -----------------------------------------------------------------------
    def _arrive(self, req: TraceRequest) -> None:
        self.window.isl.append(req.input_length)
        self.window.osl.append(req.output_length)
        super()._arrive(req)

    def _on_output(self, out: RequestOutput) -> None:
        rec = self.records[out.request_id]
        first = rec.first_token_ms < 0
        super()._on_output(out)
        moved = self._migrations.get(out.request_id)
        if moved is not None and out.finish_reason is not None:
            rec.num_output_tokens += moved[0]  # the tokens made before the migration
        w = self.window
        if first:
            w.ttft.append(rec.first_token_ms - rec.arrival_ms)
        if out.finish_reason is not None:
            w.dur.append((rec.finish_ms - rec.arrival_ms) / 1000.0)
            w.prompt += rec.input_length
            w.cached += rec.num_cached_tokens
            if rec.num_output_tokens > 1:
                gap = (rec.finish_ms - rec.first_token_ms) / (rec.num_output_tokens - 1)
                w.itl.append(gap)

    # ---- the planner's tick --------------------------------------------------------------
    def _tick(self) -> None:
        obs = self.observe()
        decisions = self.planner.plan({POOL: obs})
        for d in decisions:
            self.decisions.append(d)
            if self._log is not None:
                self._log.write(json.dumps({"observation": obs.to_dict(), **d.to_dict()}) + "\n")
            self._apply(d)
        self._sample(decisions[0].target)
        if self._work_left():
            self._tick_at(self.now + self.planner.config.interval_s * 1000.0)

    def observe(self) -> PoolObservation:
        w, self.window = self.window, _Window()
        up = [i for i, life in enumerate(self.life) if life.state == UP]
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
            router_queue=len(self.router.queue),
            num_up=len(up),
            num_starting=self._count(STARTING),
            num_draining=self._count(DRAINING),
            workers=tuple(_worker_obs(self.workers[i]) for i in up),
        )

    def _apply(self, d: PoolDecision) -> None:
        current = self._count(UP, STARTING)
        for _ in range(d.target - current):
            self._add_worker()
        for _ in range(current - d.target):
            self._remove_worker(d.drain)

    # ---- membership ----------------------------------------------------------------------
    def _add_worker(self) -> None:
        w = len(self.workers)
        self.workers.append(_Worker(w, self.cfg, self._publish, self.timing, self._clock_s))
        self.life.append(_Life(STARTING, self.now))
        self._control_at(self.now + self.cluster.startup_s * 1000.0, lambda: self._up(w))

    def _up(self, w: int) -> None:
        life = self.life[w]
        if life.state != STARTING:
            return  # cancelled while starting
        life.state, life.up_ms = UP, self.now
        self.router.add_worker(w)
        self._dispatch_queued()
        self._sample()

    def _remove_worker(self, drain: bool) -> None:
        starting = [i for i, life in enumerate(self.life) if life.state == STARTING]
        if starting:
            self._gone(starting[-1])
            return
        up = [i for i, life in enumerate(self.life) if life.state == UP]
        if len(up) <= 1:
            return  # never below one serving worker
        w = min(up, key=lambda i: (len(self.workers[i].core.scheduler.requests), -i))
        self.router.remove_worker(w)
        if not drain:
            self._kill(w)
            return
        self.life[w].state, self.life[w].drain_ms = DRAINING, self.now
        deadline = self.now + self.cluster.drain_deadline_s * 1000.0
        self._control_at(deadline, lambda: self._drain_deadline(w))
        self._check_drained(w)

    def _check_drained(self, w: int) -> None:
        if self.life[w].state == DRAINING and not self.workers[w].core.has_unfinished_requests():
            self._gone(w)

    def _gone(self, w: int) -> None:
        self.life[w].state, self.life[w].gone_ms = GONE, self.now
        self._sample()

    def _kill(self, w: int) -> None:
        core = self.workers[w].core
        ids = list(core.scheduler.requests)
        core.abort_requests(ids)
        for rid in ids:
            self.records[rid].worker = -1
            self.router.mark_finished(rid)
        self.num_killed += len(ids)
        self._gone(w)

    def _drain_deadline(self, w: int) -> None:
        if self.life[w].state != DRAINING:
            return
        core = self.workers[w].core
        for rid in list(core.scheduler.requests):
            req = core.scheduler.requests[rid]
            done = len(req.output_token_ids)
            core.abort_requests([rid])
            self._migrate(rid, done)
        self._gone(w)

    def _migrate(self, rid: str, num_done: int) -> None:
        """Re-sends a request (prompt + what it generated so far) to a live worker, with the
        rest of its output to produce; its record keeps its first token time."""
        rec = self.records[rid]
        self.num_migrated += 1
        self.router.mark_finished(rid)
        tokens, hashes, local = self.tokens.prompt_blocks(self.by_id[rid])
        rest = max(1, rec.output_length - num_done)
        self._migrations[rid] = (num_done, rest)
        decision = self.router.route(rid, hashes, len(tokens))
        if isinstance(decision, Routed):
            self._send(decision.worker_id, rid, tokens, (hashes, local), rest)
        elif isinstance(decision, Queued):  # waits in the router queue like any request
            rec.pending_prompt = (tokens, hashes, local)
        else:
            rec.shed = True

    def _send(self, w: int, rid: str, tokens, hashes, max_tokens: int) -> None:
        rec = self.records[rid]
        rec.worker = w
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        request = EngineRequest(
            request_id=rid, prompt_token_ids=tokens, params=params, arrival_time=self.now / 1e3
        )
        worker = self.workers[w]
        worker.core.add_request(request, hashes)
        if not worker.busy:
            worker.busy = True
            self._push(self.now, _START, w)

    # ---- hooks into Replay ---------------------------------------------------------------
    def _dispatch(self, decision, prompt, rec: RequestRecord) -> None:
        moved = self._migrations.get(rec.request_id)
        if moved is None:
            super()._dispatch(decision, prompt, rec)
            return
        tokens, hashes, local = prompt
        self._send(decision.worker_id, rec.request_id, tokens, (hashes, local), moved[1])

    def _complete(self, w: int, step) -> None:
        super()._complete(w, step)
        if self.life[w].state == DRAINING:
            self._check_drained(w)

    def _dispatch_queued(self) -> None:
        for decision in self.router.drain():
            rec = self.records[decision.request_id]
            rec.queued_ms = decision.queued_s * 1000.0
            prompt, rec.pending_prompt = rec.pending_prompt, None
            self._dispatch(decision, prompt, rec)

    # ---- report --------------------------------------------------------------------------
    def _sample(self, target: int | None = None) -> None:
        self.timeline.append(
            {
                "time_s": round(self.now / 1000.0, 3),
                "up": self._count(UP),
                "starting": self._count(STARTING),
                "draining": self._count(DRAINING),
                "target": self._count(UP, STARTING) if target is None else target,
            }
        )

    def report(self) -> dict:
        self.cfg = dataclasses.replace(self.cfg, num_workers=len(self.workers))
        report = super().report()
        start, end = _span_ms(self.records.values())
        seconds = sum(_alive_s(life, start, end) for life in self.life)
        report.update(cost_metrics(report, seconds))
        report["replica_timeline"] = self.timeline
        report["killed_requests"] = self.num_killed
        report["planner"] = {
            "mode": self.planner.config.mode,
            "interval_s": self.planner.config.interval_s,
            "num_decisions": len(self.decisions),
            "num_workers_started": len(self.life) - self.num_initial,
            "migrated_requests": self.num_migrated,
            "killed_requests": self.num_killed,
            "startup_s": self.cluster.startup_s,
        }
        return report


def cost_metrics(report: dict, worker_seconds: float) -> dict[str, Any]:
    """The report keys every replay carries (see the module docstring)."""
    ws = round(worker_seconds, 3)
    return {
        "sla_attainment": report["goodput"]["fraction"],
        "worker_seconds": ws,
        "worker_seconds_per_pool": {POOL: ws},
    }


def static_cost_metrics(report: dict, num_workers: int) -> dict[str, Any]:
    return cost_metrics(report, num_workers * (report["sim_duration_s"] or 0.0))


def _worker_obs(worker: _Worker) -> WorkerObservation:
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


def _alive_s(life: _Life, start: float, end: float) -> float:
    stop = end if life.gone_ms < 0 else min(life.gone_ms, end)
    return max(0.0, stop - max(life.asked_ms, start)) / 1000.0
