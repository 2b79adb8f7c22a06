"""Planner modes: each turns a pool's observation into a ``Proposal`` (``up``: the size the
pool needs now; ``down``: the size it could shrink to, with more headroom, for the
governor's hysteresis band). A policy keeps per-pool state (predictors) and is registered in
``POLICIES``.

- ``sla``: forecast the request rate ``lookahead`` ticks ahead (worker start-up included)
  with the configured predictor, mean ISL/OSL and prefix hit with a moving average, add the
  prompt tokens already waiting (router queue and schedulers) as a backlog, and ask the
  profile's ``PerfModel`` for the smallest pool whose predicted TTFT and ITL are within
  ``headroom_up`` (``down``: ``headroom_down``) of the targets, the targets first divided
  by a learnt bias factor (EWMA of the observed mean over the model's mean at the current
  size: what the model leaves out, such as bursts and uneven routing).
- ``load``: thresholds, no profile: ``up = current + 1`` when the KV usage, the waiting
  requests per worker or the waiting prompt tokens per worker is above its high mark;
  ``down = current - 1`` when all are below their low marks.
- ``dynamo``: Dynamo's planner (see ``planner.dynamo``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from tokenmill.planner.observation import PoolObservation
from tokenmill.planner.perf import Demand, PerfModel
from tokenmill.planner.predictors import MovingAveragePredictor, make_predictor


@dataclass(frozen=True)
class Targets:
    ttft_ms: float = 2_000.0
    itl_ms: float = 25.0


@dataclass(frozen=True)
class Proposal:
    up: int
    down: int
    inputs: dict[str, Any]
    final: bool = False  # True: the policy governs itself (only limits and budget apply)


class Policy(Protocol):
    drain: bool  # removed workers drain first

    def propose(
        self, now: float, pool: str, obs: PoolObservation, current: int, max_n: int
    ) -> Proposal: ...


@dataclass(frozen=True)
class SlaConfig:
    predictor: str = "kalman"
    lookahead_ticks: int = 1  # ticks ahead to size for (start-up time / tick, at least 1)
    headroom_up: float = 0.8
    headroom_down: float = 0.65
    backlog_horizon_s: float = 20.0
    # bias correction: EWMA of observed / predicted mean latency at the current size,
    # starting at ``initial_tail`` and kept in ``tail_bounds``
    initial_tail: float = 1.5
    tail_stat: str = "p90"  # or "mean"
    surge: float = 1.0  # size for this many times the forecast rate
    tail_alpha: float = 0.3
    tail_bounds: tuple[float, float] = (1.0, 4.0)


class _Forecast:
    """Per-pool forecasts of rate (configured predictor), ISL, OSL and hit (moving averages;
    a window without arrivals leaves them as they were)."""

    def __init__(self, predictor: str):
        self.rate = make_predictor(predictor)
        self.isl, self.osl, self.hit = (MovingAveragePredictor(6) for _ in range(3))

    def observe(self, obs: PoolObservation) -> None:
        self.rate.observe(obs.request_rate)
        if obs.num_requests:
            self.isl.observe(obs.mean_isl)
            self.osl.observe(obs.mean_osl)
            self.hit.observe(obs.prefix_hit)


class _Tail:
    """EWMA of observed / predicted mean latency, for TTFT and ITL."""

    def __init__(self, cfg: SlaConfig):
        self.cfg = cfg
        self.ttft = self.itl = cfg.initial_tail

    def update(self, perf: PerfModel, pool: str, obs: PoolObservation) -> None:
        if obs.num_up == 0 or obs.num_requests == 0:
            return
        now = Demand(obs.request_rate, obs.mean_isl, obs.mean_osl, obs.prefix_hit)
        pred = perf.latency(obs.num_up, now, pool)
        p90 = self.cfg.tail_stat == "p90"
        ttft, itl = (
            (obs.ttft_p90_ms, obs.itl_p90_ms) if p90 else (obs.ttft_mean_ms, obs.itl_mean_ms)
        )
        self.ttft = self._blend(self.ttft, ttft, pred.ttft_ms)
        self.itl = self._blend(self.itl, itl, pred.itl_ms)

    def _blend(self, old: float, observed: float | None, predicted: float) -> float:
        if observed is None or not 0 < predicted < math.inf:
            return old
        lo, hi = self.cfg.tail_bounds
        ratio = min(hi, max(lo, observed / predicted))
        return old + self.cfg.tail_alpha * (ratio - old)


class SlaPolicy:
    drain = True

    def __init__(self, perf: PerfModel, targets: Targets, config: SlaConfig = SlaConfig()):
        self.perf, self.targets, self.config = perf, targets, config
        self._forecasts: dict[str, _Forecast] = {}
        self._tails: dict[str, _Tail] = {}

    def propose(
        self, now: float, pool: str, obs: PoolObservation, current: int, max_n: int
    ) -> Proposal:
        cfg = self.config
        fc = self._forecasts.setdefault(pool, _Forecast(cfg.predictor))
        fc.observe(obs)
        tail = self._tails.setdefault(pool, _Tail(cfg))
        tail.update(self.perf, pool, obs)
        rate = cfg.surge * max(fc.rate.predict(1), fc.rate.predict(cfg.lookahead_ticks))
        isl, osl = fc.isl.predict(), fc.osl.predict()
        backlog = obs.waiting_prefill_tokens + obs.router_queue * isl
        demand = Demand(rate, isl, osl, fc.hit.predict(), backlog, cfg.backlog_horizon_s)
        ttft, itl = self.targets.ttft_ms / tail.ttft, self.targets.itl_ms / tail.itl
        need = self.perf.replicas_needed
        up = need(demand, ttft, itl, max_n, pool, cfg.headroom_up)
        down = need(demand, ttft, itl, max_n, pool, cfg.headroom_down)
        lat = self.perf.latency(max(current, 1), demand, pool)
        inputs = {
            "observed_rate": round(obs.request_rate, 4),
            "predicted_rate": round(rate, 4),
            "predicted_isl": round(isl, 1),
            "predicted_osl": round(osl, 1),
            "predicted_hit": round(demand.hit, 4),
            "backlog_prefill_tokens": backlog,
            "tail_ttft": round(tail.ttft, 4),
            "tail_itl": round(tail.itl, 4),
            "predicted_ttft_ms_now": _round(lat.ttft_ms),
            "predicted_itl_ms_now": _round(lat.itl_ms),
            "observed_ttft_mean_ms": obs.ttft_mean_ms,
            "observed_itl_mean_ms": obs.itl_mean_ms,
        }
        return Proposal(up, max(down, up), inputs)


@dataclass(frozen=True)
class LoadThresholds:
    kv_high: float = 0.7
    kv_low: float = 0.3
    queue_high: float = 2.0  # waiting requests per worker
    queue_low: float = 0.25
    prefill_tokens_high: float = 16_384.0  # waiting prompt tokens per worker
    prefill_tokens_low: float = 2_048.0


class LoadPolicy:
    drain = True

    def __init__(self, thresholds: LoadThresholds = LoadThresholds()):
        self.th = thresholds

    def propose(
        self, now: float, pool: str, obs: PoolObservation, current: int, max_n: int
    ) -> Proposal:
        th, n = self.th, max(1, obs.num_up)
        queue, tokens, kv = obs.queue_depth / n, obs.waiting_prefill_tokens / n, obs.kv_usage
        high = kv > th.kv_high or queue > th.queue_high or tokens > th.prefill_tokens_high
        low = kv < th.kv_low and queue < th.queue_low and tokens < th.prefill_tokens_low
        # a pool still starting workers waits for them before growing further
        up = current + 1 if high and obs.num_starting == 0 else current
        down = current - 1 if low else current
        inputs = {
            "kv_usage": round(kv, 4),
            "queue_per_worker": round(queue, 3),
            "waiting_prefill_tokens_per_worker": round(tokens, 1),
            "observed_rate": round(obs.request_rate, 4),
        }
        return Proposal(up, down, inputs)


def _round(x: float) -> float | None:
    return None if math.isinf(x) or math.isnan(x) else round(x, 3)


PolicyFactory = Callable[..., Policy]
