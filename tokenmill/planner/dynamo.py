"""The ``dynamo`` control: Dynamo's planner algorithm, re-implemented from its public
documentation so that tokenmill's planner is compared against it in the same simulator.

Sources: Dynamo's "Planner Design" (docs/design-docs/planner-design.md, v0.9-v1.2) and
"Load-based Planner" (docs/architecture/load_planner.md) pages, and the formulas as issue 17
states them. What is implemented:

Throughput-based scaling, every ``adjustment_interval_s`` (default 180 s), from the averages
over that interval (request count, ISL, OSL, TTFT, ITL, request duration):

    p_corr = observed TTFT / expected TTFT        expected TTFT = prefill time at the ISL
    d_corr = observed ITL  / expected ITL         expected ITL  = ITL at concurrency
                 num_req / num_workers * request_duration / interval, context isl + osl / 2
    next_req, next_isl, next_osl = the predictor's forecasts for the next interval
    prefill = ceil(next_req * next_isl / interval * min(1, p_corr)
                   / prefill_throughput_per_worker(next_isl))
    decode  = ceil(next_req * next_osl / interval
                   / decode_throughput_per_worker(itl_target / d_corr, next_isl + next_osl / 2))

``*_throughput_per_worker`` are ``PerfModel``'s interpolations over the same timing profile
our planner reads (Dynamo interpolates its own profiling NPZ the same way). An aggregated pool
takes ``max(prefill, decode)`` (Dynamo's aggregated planner is load-based only; the maximum
keeps its throughput floor meaningful when one worker does both phases).

Load-based scaling, every tick (``load_interval_s``, default 5 s), ±1 replica, blocking
(nothing while a worker is starting): each engine's latency is estimated from its own load:
TTFT from its waiting prompt tokens plus one ISL (Dynamo fits a regression of
``active_prefill_tokens + ISL -> TTFT``; the profile gives the same map here), ITL from its
running batch and their mean context. Up when *every* engine's estimate exceeds its target
(TTFT for prefill, ITL for decode; either for aggregated), down when every one is under
``0.8`` of it (both for aggregated). The throughput target is a floor under the load target.

Dynamo removes a worker without draining it, so ``drain`` is False: the simulator's actuator
kills the worker and its in-flight requests fail (issue 17: "Dynamo removes a worker without
draining it").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from tokenmill.planner.observation import PoolObservation
from tokenmill.planner.perf import PerfModel
from tokenmill.planner.policies import Proposal, Targets
from tokenmill.planner.predictors import make_predictor


@dataclass(frozen=True)
class DynamoConfig:
    adjustment_interval_s: float = 180.0
    predictor: str = "constant"
    scale_down_ratio: float = 0.8
    correction: bool = True


class _Window:
    """Sums over one adjustment interval."""

    def __init__(self) -> None:
        self.s = 0.0
        self.num_req = 0
        self.isl = self.osl = 0.0
        self.ttft = self.itl = self.dur = 0.0
        self.n_ttft = self.n_itl = self.n_dur = 0

    def add(self, o: PoolObservation) -> None:
        self.s += o.window_s
        self.num_req += o.num_requests
        self.isl += o.mean_isl * o.num_requests
        self.osl += o.mean_osl * o.num_requests
        if o.ttft_mean_ms is not None:
            self.ttft, self.n_ttft = self.ttft + o.ttft_mean_ms, self.n_ttft + 1
        if o.itl_mean_ms is not None:
            self.itl, self.n_itl = self.itl + o.itl_mean_ms, self.n_itl + 1
        if o.mean_request_s is not None:
            self.dur, self.n_dur = self.dur + o.mean_request_s, self.n_dur + 1


class _PoolState:
    def __init__(self, predictor: str):
        self.window = _Window()
        self.req, self.isl, self.osl = (make_predictor(predictor) for _ in range(3))
        self.floor = 0
        self.last: dict[str, Any] = {}


class DynamoPolicy:
    drain = False

    def __init__(self, perf: PerfModel, targets: Targets, config: DynamoConfig = DynamoConfig()):
        self.perf, self.targets, self.config = perf, targets, config
        self._pools: dict[str, _PoolState] = {}

    def propose(
        self, now: float, pool: str, obs: PoolObservation, current: int, max_n: int
    ) -> Proposal:
        st = self._pools.setdefault(pool, _PoolState(self.config.predictor))
        st.window.add(obs)
        if st.window.s >= self.config.adjustment_interval_s - 1e-9:
            st.floor, st.last = self._throughput_target(st, pool, current)
            st.window = _Window()
        load_target, why = self._load_target(pool, obs, current)
        target = max(st.floor, load_target)
        inputs = {"throughput_floor": st.floor, "load_signal": why, **st.last}
        return Proposal(target, target, inputs, final=True)

    # ---- throughput-based ----------------------------------------------------------------
    def _throughput_target(
        self, st: _PoolState, pool: str, current: int
    ) -> tuple[int, dict[str, Any]]:
        w, interval = st.window, st.window.s
        if w.num_req == 0:
            return st.floor, st.last
        isl, osl = w.isl / w.num_req, w.osl / w.num_req
        st.req.observe(w.num_req)
        st.isl.observe(isl)
        st.osl.observe(osl)
        next_req, next_isl, next_osl = st.req.predict(), st.isl.predict(), st.osl.predict()
        p_corr, d_corr = self._corrections(w, isl, osl, current, interval)
        context = next_isl + next_osl / 2.0
        prefill_load = next_req * next_isl / interval * min(1.0, p_corr)
        prefill = math.ceil(prefill_load / self.perf.prefill_throughput_per_worker(next_isl))
        itl_target = self.targets.itl_ms / max(d_corr, 1e-6)
        decode_thr = self.perf.decode_throughput_per_worker(itl_target, context)
        decode = math.ceil(next_req * next_osl / interval / decode_thr)
        target = {"prefill": prefill, "decode": decode}.get(pool, max(prefill, decode))
        inputs = {
            "p_corr": round(p_corr, 4),
            "d_corr": round(d_corr, 4),
            "next_num_req": round(next_req, 2),
            "next_isl": round(next_isl, 1),
            "next_osl": round(next_osl, 1),
            "throughput_prefill": prefill,
            "throughput_decode": decode,
        }
        return target, inputs

    def _corrections(
        self, w: _Window, isl: float, osl: float, current: int, interval: float
    ) -> tuple[float, float]:
        if not self.config.correction:
            return 1.0, 1.0
        p_corr = d_corr = 1.0
        if w.n_ttft:
            p_corr = (w.ttft / w.n_ttft) / self.perf.profile.prefill_time_ms(isl)
        if w.n_itl and w.n_dur:
            duration = w.dur / w.n_dur
            concurrency = w.num_req / max(1, current) * duration / interval
            expected = self.perf.profile.itl_ms(max(1.0, concurrency), isl + osl / 2.0)
            d_corr = (w.itl / w.n_itl) / expected
        return p_corr, d_corr

    # ---- load-based ----------------------------------------------------------------------
    def _load_target(self, pool: str, obs: PoolObservation, current: int) -> tuple[int, str]:
        if obs.num_starting or not obs.workers:
            return current, "blocked" if obs.num_starting else "no-workers"
        prof, t, ratio = self.perf.profile, self.targets, self.config.scale_down_ratio
        isl = obs.mean_isl or 0.0
        ttfts = [self.perf.prefill_backlog_ms(w.waiting_prefill_tokens + isl) for w in obs.workers]
        itls = [
            prof.itl_ms(w.num_running, w.num_kv_tokens / w.num_running) if w.num_running else 0.0
            for w in obs.workers
        ]
        p_hi, p_lo = all(x > t.ttft_ms for x in ttfts), all(x < ratio * t.ttft_ms for x in ttfts)
        d_hi, d_lo = all(x > t.itl_ms for x in itls), all(x < ratio * t.itl_ms for x in itls)
        if pool == "prefill":
            up, down = p_hi, p_lo
        elif pool == "decode":
            up, down = d_hi, d_lo
        else:
            up, down = p_hi or d_hi, p_lo and d_lo
        if up:
            return current + 1, "up"
        if down:
            return current - 1, "down"
        return current, "hold"
