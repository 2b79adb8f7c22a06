from __future__ import annotations

from tokenmill.router.active import ActiveSequences


def make() -> ActiveSequences:
    act = ActiveSequences(block_size=4, ttl_s=10.0)
    act.add_worker(0)
    act.add_worker(1)
    return act


def test_shared_blocks_counted_once_tail_private():
    act = make()
    act.add_request("a", 0, [1, 2], num_prompt_tokens=10, num_prefill_tokens=10, now=0.0)
    assert act.active_blocks(0) == 3  # 2 full + partial tail
    assert act.new_blocks(0, [1, 2, 3], 12) == 1
    assert act.new_blocks(1, [1, 2, 3], 12) == 3
    act.add_request("b", 0, [1, 2, 3], num_prompt_tokens=13, num_prefill_tokens=5, now=0.0)
    assert act.active_blocks(0) == 5  # 1, 2, 3, tail a, tail b
    assert act.active_prefill_tokens(0) == 15
    assert act.num_requests(0) == 2
    act.check_integrity()


def test_prefill_until_first_token_blocks_until_end():
    act = make()
    act.add_request("a", 0, [1], num_prompt_tokens=4, num_prefill_tokens=4, now=0.0)
    act.mark_prefill_done("a", now=1.0)
    assert act.active_prefill_tokens(0) == 0
    assert act.active_blocks(0) == 1
    act.mark_prefill_done("a", now=1.0)  # idempotent
    assert act.active_prefill_tokens(0) == 0
    act.mark_finished("a")
    act.mark_finished("a")
    assert (act.active_blocks(0), act.num_requests(0)) == (0, 0)
    act.check_integrity()


def test_expiry_uses_last_touch():
    act = make()
    act.add_request("a", 0, [1], 4, 4, now=0.0)
    act.add_request("b", 1, [2], 4, 4, now=5.0)
    act.mark_prefill_done("a", now=8.0)  # a now expires at 18
    assert act.expire(14.9) == []
    assert act.expire(15.0) == ["b"]
    assert act.active_blocks(1) == 0
    assert act.expire(18.0) == ["a"]
    assert act.num_requests(0) == 0
    act.check_integrity()


def test_remove_worker_returns_its_requests():
    act = make()
    act.add_request("a", 0, [1], 4, 4, now=0.0)
    act.add_request("b", 1, [1], 4, 4, now=0.0)
    assert act.remove_worker(0) == ["a"]
    act.mark_finished("a")  # unknown now: ignored
    act.check_integrity()
