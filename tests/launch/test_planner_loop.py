"""The live planner loop's observation (from the frontend's metrics and the workers' loads),
its decisions as JSON lines and Prometheus series, with a fake actuator."""

from __future__ import annotations

import io
import json

import pytest

from tokenmill.frontend.metrics import FrontendMetrics
from tokenmill.launch.planner_loop import PlannerLoop, metric_totals, observation
from tokenmill.planner.observation import PoolLimits
from tokenmill.planner.planner import Planner, PlannerConfig
from tokenmill.runtime.wire import WorkerLoad


class FakeActuator:
    def __init__(self):
        self.size, self.applied = 1, []

    def counts(self, pool):
        return self.size, 0, 0

    def apply(self, decision):
        self.applied.append(decision)
        self.size = decision.target

    def poll(self):
        pass

    def stop(self, timeout_s):
        pass


def traffic(metrics: FrontendMetrics, n: int) -> None:
    m = metrics.for_model("m")
    for _ in range(n):
        metrics.observe_usage("m", 1000, 50, 250)
        m.ttft.observe(0.2)
        m.itl.observe(0.01, 49)


def test_observation_is_the_window_delta():
    metrics = FrontendMetrics()
    traffic(metrics, 3)
    before = metric_totals(metrics.registry)
    traffic(metrics, 10)
    load = WorkerLoad(
        instance_id="w",
        num_running_requests=4,
        num_waiting_requests=2,
        kv_usage=0.5,
        num_waiting_prefill_tokens=900,
    )
    obs = observation(5.0, metric_totals(metrics.registry), before, [load], (1, 1, 0))
    assert obs.num_requests == 10 and obs.request_rate == 2.0
    assert obs.mean_isl == 1000 and obs.mean_osl == 50 and obs.prefix_hit == 0.25
    assert obs.ttft_mean_ms == pytest.approx(200.0) and obs.itl_mean_ms == pytest.approx(10.0)
    assert obs.queue_depth == 2 and obs.waiting_prefill_tokens == 900 and obs.kv_usage == 0.5
    assert (obs.num_up, obs.num_starting, obs.num_provisioned) == (1, 1, 2)


def test_a_round_applies_logs_and_exports():
    metrics, clock = FrontendMetrics(), [0.0]
    cfg = PlannerConfig(mode="load", interval_s=2.0, limits={"both": PoolLimits(1, 3)})
    planner = Planner(cfg, lambda: clock[0])
    actuator, log = FakeActuator(), io.StringIO()
    hot = [WorkerLoad(instance_id="w", num_running_requests=9, kv_usage=0.95)]
    loop = PlannerLoop(planner, actuator, metrics.registry, lambda: hot, log)
    traffic(metrics, 6)
    clock[0] = 2.0
    assert planner.due()
    (d,) = loop.round()
    assert d.target == 2 and actuator.size == 2
    line = json.loads(log.getvalue())
    assert line["target"] == 2 and line["observation"]["num_requests"] == 6
    assert line["kv_usage"] == 0.95 and line["observed_rate"] == 3.0
    text = metrics.render(hot).decode()
    assert 'tokenmill_planner_replicas{pool="both",state="target"} 2.0' in text
    assert 'tokenmill_planner_request_rate{kind="observed",pool="both"} 3.0' in text
    assert "tokenmill_planner_decisions_total 1.0" in text
