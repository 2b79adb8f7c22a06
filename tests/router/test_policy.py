from __future__ import annotations

import random

import pytest

from tokenmill.router.policy import (
    POLICIES,
    PolicyConfig,
    RouteInput,
    WorkerView,
    decode_blocks,
    kv_cost,
    make_policy,
    prefill_blocks,
)


def inp(*views: WorkerView, tokens: int = 640) -> RouteInput:
    return RouteInput(num_prompt_tokens=tokens, block_size=64, workers=views)


def test_each_cost_term():
    v = WorkerView(
        0,
        device_overlap=4,
        lower_overlap=2,
        active_blocks=30,
        active_prefill_tokens=128,
        new_blocks=6,
    )
    cfg = PolicyConfig(prefill_load_scale=2.0, lower_tier_credit=0.5)
    # prompt 10 blocks - (4 + 0.5*2) credit + 128/64 queued prefill = 7
    assert prefill_blocks(v, inp(v), 0.5) == 7.0
    assert decode_blocks(v) == 36
    assert kv_cost(v, inp(v), cfg) == 2.0 * 7.0 + 36
    full_credit = PolicyConfig(lower_tier_credit=1.0)
    assert kv_cost(v, inp(v), full_credit) == 6.0 + 36
    assert kv_cost(v, inp(v), PolicyConfig(decode_weight=0.0)) == 7.0


def test_kv_argmin_prefers_cache_then_least_active_blocks():
    rng = random.Random(0)
    pol = make_policy("kv")
    cached = WorkerView(0, device_overlap=8, new_blocks=10)
    cold = WorkerView(1, new_blocks=10)
    assert pol(inp(cached, cold), rng) == 0
    # equal cost 20: 10 prefill + 10 decode vs 5 prefill + 15 decode; fewer active blocks wins
    a = WorkerView(0, device_overlap=0, active_blocks=0, new_blocks=10)
    b = WorkerView(1, device_overlap=5, active_blocks=5, new_blocks=10)
    assert kv_cost(a, inp(a), PolicyConfig()) == kv_cost(b, inp(b), PolicyConfig())
    assert pol(inp(a, b), rng) == 0
    assert pol(inp(b, a), rng) == 0


def test_exact_ties_broken_randomly_with_seeded_rng():
    pol = make_policy("kv")
    views = inp(WorkerView(0, new_blocks=10), WorkerView(1, new_blocks=10))
    picks = [pol(views, random.Random(s)) for s in range(40)]
    assert set(picks) == {0, 1}
    assert picks == [pol(views, random.Random(s)) for s in range(40)]


def test_temperature_samples_softmax():
    cfg = PolicyConfig(temperature=0.5)
    pol = make_policy("kv", cfg)
    good, bad = WorkerView(0, device_overlap=10, new_blocks=10), WorkerView(1, new_blocks=10)
    rng = random.Random(1)
    picks = [pol(inp(good, bad), rng) for _ in range(2000)]
    # normalised costs 0 and 1: p(bad) = e^-2 / (1 + e^-2) = 0.1192
    assert 0.09 < picks.count(1) / 2000 < 0.15
    cold = make_policy("kv", PolicyConfig(temperature=0.0))
    assert all(cold(inp(good, bad), rng) == 0 for _ in range(50))


def test_dynamo_ties_to_smallest_cached_tree_and_ignores_lower_tiers():
    pol = make_policy("dynamo", PolicyConfig(lower_tier_credit=1.0, prefill_load_scale=9))
    a = WorkerView(0, new_blocks=10, cached_blocks=500)
    b = WorkerView(1, new_blocks=10, cached_blocks=100)
    assert pol(inp(a, b), random.Random(0)) == 1
    host = WorkerView(0, lower_overlap=10, new_blocks=10)
    busy = WorkerView(1, active_blocks=1, new_blocks=10)
    assert pol(inp(host, busy), random.Random(0)) == 0  # lower tier not credited: 20 vs 21
    assert (
        make_policy("kv", PolicyConfig(lower_tier_credit=1.0))(inp(host, busy), random.Random(0))
        == 0
    )


def test_round_robin_least_loaded_random():
    views = inp(
        WorkerView(3, active_blocks=5, num_requests=2),
        WorkerView(7, active_blocks=5, num_requests=1),
    )
    rr = make_policy("round-robin")
    assert [rr(views, random.Random(0)) for _ in range(4)] == [3, 7, 3, 7]
    assert make_policy("least-loaded")(views, random.Random(0)) == 7
    picks = {make_policy("random")(views, random.Random(s)) for s in range(20)}
    assert picks == {3, 7}


def test_registry():
    assert {"round-robin", "random", "least-loaded", "kv", "dynamo"} <= set(POLICIES)
    with pytest.raises(KeyError, match="unknown router policy"):
        make_policy("nope")


def test_tuned_kv_defaults_and_overrides():
    from tokenmill.router.policy import TUNED, default_policy_config

    assert default_policy_config("kv") == TUNED["kv"]
    assert default_policy_config("dynamo") == PolicyConfig()
    assert default_policy_config("kv", temperature=0.3).temperature == 0.3
    # decode weight 0.1: 10 more active blocks cost 1 block of prefill
    busy_cached = WorkerView(0, device_overlap=4, active_blocks=30, new_blocks=6)
    idle_cold = WorkerView(1, new_blocks=10)
    assert make_policy("kv", TUNED["kv"])(inp(busy_cached, idle_cold), random.Random(0)) == 0
    assert make_policy("dynamo")(inp(busy_cached, idle_cold), random.Random(0)) == 1
