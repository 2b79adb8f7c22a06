import pytest

from tokenmill.core.timing_profile import DecodePoint, PrefillPoint, TimingProfile
from tokenmill.planner.dynamo import DynamoConfig
from tokenmill.planner.governor import GovernorConfig
from tokenmill.planner.observation import PoolLimits, PoolObservation, WorkerObservation
from tokenmill.planner.planner import Planner, PlannerConfig
from tokenmill.planner.policies import Targets


def profile() -> TimingProfile:
    prefill = [PrefillPoint(n, 0.0, 10.0 + 0.01 * n) for n in (0, 1000, 8192)]
    decode = [
        DecodePoint(b, c, 5.0 + 0.01 * b, b * c / 1e6) for b in (1, 256) for c in (100, 10_000)
    ]
    return TimingProfile(
        engine="test",
        block_size=64,
        num_blocks=15_625,
        max_num_batched_tokens=8192,
        max_num_seqs=256,
        prefill=prefill,
        decode=decode,
    )


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def obs(rate, up, starting=0, workers=(), **kw):
    return PoolObservation(
        window_s=10.0,
        num_requests=int(rate * 10),
        mean_isl=1000,
        mean_osl=100,
        num_up=up,
        num_starting=starting,
        workers=tuple(workers),
        **kw,
    )


def run(planner, clock, observations):
    out = []
    for o in observations:
        clock.t += planner.config.interval_s
        assert planner.due()
        (d,) = planner.plan({"both": o})
        out.append(d)
    return out


def test_sla_follows_the_load_up_and_then_down():
    clock = Clock()
    cfg = PlannerConfig(
        mode="sla",
        limits={"both": PoolLimits(1, 16)},
        governor=GovernorConfig(down_cooldown_s=0, down_window_s=20),
    )
    p = Planner(cfg, clock, profile())
    assert not p.due()
    ups = run(p, clock, [obs(200.0, 1)])
    assert ups[0].target > 2 and ups[0].reason == "scale-up"
    assert ups[0].inputs["predicted_rate"] == pytest.approx(200.0)
    n = ups[0].target
    downs = run(p, clock, [obs(1.0, n)] * 6)
    assert downs[0].target == n  # the band must hold first
    assert downs[-1].target < n and all(d.drain for d in downs)


def test_load_thresholds():
    clock = Clock()
    p = Planner(PlannerConfig(mode="load", limits={"both": PoolLimits(1, 3)}), clock)
    hot = [WorkerObservation(num_running=50, kv_usage=0.9)]
    assert run(p, clock, [obs(5.0, 1, workers=hot)])[0].target == 2
    # a worker still starting: no further growth
    assert run(p, clock, [obs(5.0, 1, starting=1, workers=hot)])[0].target == 2
    assert run(p, clock, [obs(5.0, 3, workers=hot * 3)])[0].target == 3  # max


def test_total_budget_and_limits():
    clock = Clock()
    cfg = PlannerConfig(mode="sla", limits={"both": PoolLimits(1, 16)}, total_budget=3)
    p = Planner(cfg, clock, profile())
    (d,) = run(p, clock, [obs(500.0, 1)])
    assert d.target == 3 and d.reason == "budget"
    with pytest.raises(ValueError, match="budget"):
        PlannerConfig(limits={"both": PoolLimits(2, 4)}, total_budget=1)
    with pytest.raises(ValueError, match="unknown planner mode"):
        PlannerConfig(mode="magic")
    with pytest.raises(ValueError, match="timing profile"):
        Planner(PlannerConfig(mode="sla"), clock)


def test_dynamo_throughput_formula_and_load_steps():
    clock = Clock()
    cfg = PlannerConfig(
        mode="dynamo",
        interval_s=5.0,
        limits={"both": PoolLimits(1, 32)},
        targets=Targets(2000.0, 25.0),
        dynamo=DynamoConfig(adjustment_interval_s=10.0),
    )
    p = Planner(cfg, clock, profile())
    o = PoolObservation(
        window_s=5.0,
        num_requests=500,
        mean_isl=1000,
        mean_osl=100,
        num_up=1,
        workers=(WorkerObservation(),),
    )
    first, second = run(p, clock, [o, o])
    assert first.drain is False
    assert first.inputs["load_signal"] == "down"  # idle engines: all below 0.8 of the target
    # 1000 requests in 10 s of 1000 tokens: 100k tokens/s over 50k/s per worker = 2 (p_corr 1)
    assert second.inputs["throughput_prefill"] == 2
    assert second.target >= 2


def test_dynamo_is_blocked_while_a_worker_starts():
    clock = Clock()
    cfg = PlannerConfig(mode="dynamo", interval_s=5.0, limits={"both": PoolLimits(1, 8)})
    p = Planner(cfg, clock, profile())
    busy = WorkerObservation(
        num_running=256, num_kv_tokens=256 * 5000, waiting_prefill_tokens=10**6
    )
    (d,) = run(p, clock, [obs(10.0, 2, starting=1, workers=[busy, busy])])
    assert d.target == 3 and d.inputs["load_signal"] == "blocked"
    (d,) = run(p, clock, [obs(10.0, 3, workers=[busy] * 3)])
    assert d.target == 4 and d.inputs["load_signal"] == "up"
