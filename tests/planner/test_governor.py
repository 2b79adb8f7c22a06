from tokenmill.planner.governor import Governor, GovernorConfig, apply_budget
from tokenmill.planner.observation import PoolLimits


def governor(**kw):
    cfg = GovernorConfig(**{"down_cooldown_s": 20.0, "down_window_s": 30.0, **kw})
    return Governor(cfg, PoolLimits(1, 10))


def test_grows_at_once_and_clamps_to_max():
    g = governor()
    assert g.next_size(0.0, 2, 5, 6) == (5, "scale-up")
    assert g.next_size(10.0, 5, 40, 40) == (10, "scale-up")


def test_shrinks_only_after_the_band_held_for_the_window():
    g = governor(max_down_step=10)
    assert g.next_size(0.0, 6, 3, 4) == (6, "hold")  # wants 4: the wait starts
    assert g.next_size(10.0, 6, 3, 3) == (6, "hold")
    assert g.next_size(20.0, 6, 3, 5) == (6, "hold")
    # 30 s of proposals below 6: shrink to the largest of them (5), not the latest
    assert g.next_size(30.0, 6, 2, 2) == (5, "scale-down")


def test_a_proposal_inside_the_band_resets_the_wait():
    g = governor()
    g.next_size(0.0, 6, 3, 4)
    g.next_size(20.0, 6, 6, 6)  # back to needing 6
    assert g.next_size(30.0, 6, 3, 4) == (6, "hold")
    assert g.next_size(60.0, 6, 3, 4) == (4, "scale-down")


def test_cooldown_after_a_change_and_down_step_limit():
    g = governor(max_down_step=1)
    assert g.next_size(0.0, 3, 8, 8) == (8, "scale-up")
    g.next_size(5.0, 8, 2, 2)
    assert g.next_size(15.0, 8, 2, 2) == (8, "hold")  # cooldown (20 s) not over
    assert g.next_size(40.0, 8, 2, 2) == (7, "scale-down")  # one at a time


def test_limits_pull_a_pool_back_in():
    g = Governor(GovernorConfig(), PoolLimits(2, 4))
    assert g.next_size(0.0, 1, 1, 1) == (2, "limits")
    assert g.next_size(0.0, 6, 6, 6) == (4, "limits")


def test_budget_cuts_the_pool_furthest_above_its_minimum():
    limits = {"prefill": PoolLimits(1, 8), "decode": PoolLimits(2, 8)}
    cut = apply_budget({"prefill": 6, "decode": 5}, limits, {"prefill": 2, "decode": 5}, 7)
    assert cut == {"prefill": 3, "decode": 4}
    assert sum(cut.values()) == 7
    floor = apply_budget({"prefill": 1, "decode": 2}, limits, {}, 1)
    assert floor == {"prefill": 1, "decode": 2}  # never below the minimums
