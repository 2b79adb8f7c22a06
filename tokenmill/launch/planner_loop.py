"""The live planner loop of ``serve --planner``: every ``interval_s`` it builds the pool's
``PoolObservation`` from the frontend (requests completed in the window, their mean prompt and
output lengths, mean TTFT and ITL, cached prompt tokens: deltas of the frontend's metrics)
and the workers' published loads (running, waiting, waiting prompt tokens, KV usage), asks
the ``Planner`` and has the ``Actuator`` apply the decision.

Every decision is a JSON line (``--planner-log``: the observation and the decision with its
inputs, predicted against observed load) and Prometheus series on the frontend's
``/metrics``: ``tokenmill_planner_replicas{pool,state}`` (up, starting, draining, target),
``tokenmill_planner_request_rate{pool,kind}`` (observed, predicted) and
``tokenmill_planner_decisions_total``. The loop never raises: a failed round is logged and
the next one runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from typing import IO, Any

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

from tokenmill.launch.actuator import Actuator
from tokenmill.planner.observation import PoolDecision, PoolObservation, WorkerObservation
from tokenmill.planner.planner import Planner

log = logging.getLogger(__name__)

_SERIES = {  # what the observation reads: (histogram or counter, sample suffix)
    "isl": ("tokenmill_request_prompt_tokens", "_sum"),
    "num": ("tokenmill_request_prompt_tokens", "_count"),
    "osl": ("tokenmill_request_generation_tokens", "_sum"),
    "ttft": ("tokenmill_time_to_first_token_seconds", "_sum"),
    "num_ttft": ("tokenmill_time_to_first_token_seconds", "_count"),
    "itl": ("tokenmill_inter_token_latency_seconds", "_sum"),
    "num_itl": ("tokenmill_inter_token_latency_seconds", "_count"),
    "prompt": ("tokenmill_prompt_tokens", "_total"),
    "cached": ("tokenmill_cached_tokens", "_total"),
}


def metric_totals(registry: Any) -> dict[str, float]:
    """Sums over labels of the frontend series in ``_SERIES`` (0 for one not present)."""
    totals = dict.fromkeys(_SERIES, 0.0)
    wanted = {name + suffix: key for key, (name, suffix) in _SERIES.items()}
    for family in registry.collect():
        for sample in family.samples:
            key = wanted.get(sample.name)
            if key is not None:
                totals[key] += sample.value
    return totals


def observation(
    window_s: float,
    now: dict[str, float],
    before: dict[str, float],
    loads: Iterable[Any],
    counts: tuple[int, int, int],
) -> PoolObservation:
    """The pool's observation from two ``metric_totals`` and the workers' ``WorkerLoad``s."""
    d = {k: now[k] - before.get(k, 0.0) for k in now}
    num = int(d["num"])
    up, starting, draining = counts
    workers = tuple(
        WorkerObservation(
            num_running=w.num_running_requests,
            num_waiting=w.num_waiting_requests,
            waiting_prefill_tokens=w.num_waiting_prefill_tokens,
            kv_usage=w.kv_usage,
        )
        for w in loads
    )
    return PoolObservation(
        window_s=window_s,
        num_requests=num,
        mean_isl=d["isl"] / num if num else 0.0,
        mean_osl=d["osl"] / num if num else 0.0,
        prefix_hit=d["cached"] / d["prompt"] if d["prompt"] else 0.0,
        ttft_mean_ms=1e3 * d["ttft"] / d["num_ttft"] if d["num_ttft"] else None,
        itl_mean_ms=1e3 * d["itl"] / d["num_itl"] if d["num_itl"] else None,
        num_up=up,
        num_starting=starting,
        num_draining=draining,
        workers=workers,
    )


class PlannerLoop:
    def __init__(
        self,
        planner: Planner,
        actuator: Actuator,
        registry: Any,
        loads: Callable[[], list[Any]],
        decision_log: IO[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.planner, self.actuator, self.registry = planner, actuator, registry
        self._loads, self._log, self._clock = loads, decision_log, clock
        self._before = metric_totals(registry)
        self._last_obs: dict[str, PoolObservation] = {}
        self.decisions: list[PoolDecision] = []
        self._task: asyncio.Task[None] | None = None
        registry.register(self)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            try:
                self.actuator.poll()
                if self.planner.due():
                    self.round()
            except Exception:  # noqa: BLE001 - planning must never take the server down
                log.exception("planner: a round failed")

    def round(self) -> list[PoolDecision]:
        """One decision per pool, applied and logged."""
        totals = metric_totals(self.registry)
        obs = {
            pool: observation(
                self.planner.config.interval_s,
                totals,
                self._before,
                self._loads(),
                self.actuator.counts(pool),
            )
            for pool in self.planner.pools
        }
        self._before = totals
        decisions = self.planner.plan(obs)
        for d in decisions:
            self.actuator.apply(d)
            self.decisions.append(d)
            line = {"observation": obs[d.pool].to_dict(), **d.to_dict()}
            if self._log is not None:
                self._log.write(json.dumps(line) + "\n")
                self._log.flush()
            log.info("planner: %s %d -> %d (%s)", d.pool, d.current, d.target, d.reason)
        self._last_obs = obs
        return decisions

    # ---- a Prometheus collector ----------------------------------------------------------
    def collect(self):
        replicas = GaugeMetricFamily(
            "tokenmill_planner_replicas", "workers per pool and state", labels=["pool", "state"]
        )
        rate = GaugeMetricFamily(
            "tokenmill_planner_request_rate",
            "requests/s per pool, observed and predicted",
            labels=["pool", "kind"],
        )
        last = {d.pool: d for d in self.decisions[-len(self.planner.pools) :]}
        for pool in self.planner.pools:
            up, starting, draining = self.actuator.counts(pool)
            for state, n in (("up", up), ("starting", starting), ("draining", draining)):
                replicas.add_metric([pool, state], n)
            if pool in last:
                replicas.add_metric([pool, "target"], last[pool].target)
                for kind in ("observed", "predicted"):
                    value = last[pool].inputs.get(f"{kind}_rate")
                    if value is not None:
                        rate.add_metric([pool, kind], value)
        decisions = CounterMetricFamily(
            "tokenmill_planner_decisions", "planner decisions made", value=len(self.decisions)
        )
        yield from (replicas, rate, decisions)
