"""Scheduler: continuous batching, chunked prefill, prefix hits, preemption, stop conditions.

A fake "model" samples a token that depends only on the request's token history, so every
schedule (batching, chunking, caching, preemption) must produce the same outputs.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmill.core.errors import ContextLengthExceededError, InvalidRequestError
from tokenmill.core.events import Removed, Stored
from tokenmill.core.request import EngineRequest, FinishReason
from tokenmill.core.sampling import SamplingParams
from tokenmill.engine.config import CacheConfig, SchedulerConfig
from tokenmill.engine.request import RequestStatus
from tokenmill.engine.scheduler import Scheduler
from tokenmill.engine.scheduler_output import SchedulerOutput

EOS = 2


def fake_token(token_ids: list[int]) -> int:
    """Deterministic in the history; never EOS (2) or below 10."""
    return 10 + (sum(token_ids) * 31 + len(token_ids)) % 997


def make(
    num_blocks: int = 64, block_size: int = 4, events: list | None = None, **config
) -> Scheduler:
    sink = events.append if events is not None else (lambda e: None)
    return Scheduler(SchedulerConfig(**config), CacheConfig(block_size, num_blocks), [EOS], sink)


def add(sched: Scheduler, rid: str, prompt: list[int], **params) -> None:
    priority = params.pop("priority", 0)
    params.setdefault("max_tokens", 4)
    request = EngineRequest(
        request_id=rid, prompt_token_ids=prompt, params=SamplingParams(**params), priority=priority
    )
    sched.add_request(request)


def step(
    sched: Scheduler, forced: dict[str, list[int]] | None = None
) -> tuple[SchedulerOutput, list]:
    out = sched.schedule()
    sampled = {}
    for item in out.scheduled:
        if item.samples:
            history = item.request.all_token_ids
            sampled[item.request_id] = (forced or {}).get(item.request_id) or [fake_token(history)]
    updates = sched.update_from_output(out, sampled)
    sched.check_integrity()
    return out, updates


def run(sched: Scheduler, max_steps: int = 10_000) -> dict[str, list[int]]:
    outputs: dict[str, list[int]] = {}
    for _ in range(max_steps):
        if not sched.has_unfinished_requests():
            break
        _, updates = step(sched)
        for u in updates:
            outputs.setdefault(u.request_id, []).extend(u.new_token_ids)
    assert not sched.has_unfinished_requests()
    assert sched.kv.num_used_blocks == 0
    return outputs


def reference_output(prompt: list[int], n: int) -> list[int]:
    tokens, out = list(prompt), []
    for _ in range(n):
        out.append(fake_token(tokens))
        tokens.append(out[-1])
    return out


PROMPTS = {f"r{i}": [(7 * i + j) % 50 + 10 for j in range(5 + 3 * i)] for i in range(8)}


def test_decode_batch_positions_and_blocks():
    sched = make()
    add(sched, "a", list(range(10, 16)))
    out, updates = step(sched)
    (item,) = out.scheduled
    assert (item.position, item.num_tokens, item.samples, item.block_ids) == (0, 6, True, [0, 1])
    assert item.token_ids == list(range(10, 16))
    assert (out.num_prefill_tokens, out.num_decode_tokens, out.num_active_blocks) == (6, 0, 2)
    assert updates[0].new_token_ids == [fake_token(list(range(10, 16)))]
    out, _ = step(sched)
    (item,) = out.scheduled
    assert (item.position, item.num_tokens, item.is_decode) == (6, 1, True)
    assert (out.num_prefill_tokens, out.num_decode_tokens, out.num_total_blocks) == (0, 1, 64)


def test_chunked_prefill_splits_exactly_at_the_budget():
    sched = make(max_num_batched_tokens=8, max_model_len=64)
    add(sched, "a", list(range(10, 30)))  # 20 tokens
    add(sched, "b", list(range(30, 33)))  # 3 tokens
    chunks = []
    for _ in range(4):
        out, _ = step(sched)
        chunks.append([(i.request_id, i.position, i.num_tokens, i.samples) for i in out.scheduled])
    assert chunks == [
        [("a", 0, 8, False)],
        [("a", 8, 8, False)],
        [("a", 16, 4, True), ("b", 0, 3, True)],
        [("a", 20, 1, True), ("b", 3, 1, True)],
    ]


def test_without_chunked_prefill_a_prompt_waits_until_it_fits_whole():
    sched = make(max_num_batched_tokens=16, max_model_len=16, enable_chunked_prefill=False)
    add(sched, "a", list(range(10, 20)))
    add(sched, "b", list(range(20, 30)))
    out, _ = step(sched)
    assert [(i.request_id, i.num_tokens) for i in out.scheduled] == [("a", 10)]
    out, _ = step(sched)
    assert [(i.request_id, i.num_tokens) for i in out.scheduled] == [("a", 1), ("b", 10)]


def test_max_num_seqs_is_respected_and_outputs_match_reference():
    sched = make(max_num_seqs=3)
    for rid, prompt in PROMPTS.items():
        add(sched, rid, prompt, max_tokens=5)
    outputs: dict[str, list[int]] = {}
    while sched.has_unfinished_requests():
        out, updates = step(sched)
        assert len(out.scheduled) <= 3 and sched.num_running <= 3
        for u in updates:
            outputs.setdefault(u.request_id, []).extend(u.new_token_ids)
    assert outputs == {rid: reference_output(p, 5) for rid, p in PROMPTS.items()}


def test_prefix_hit_reports_cached_tokens_and_gives_same_output():
    events: list = []
    sched = make(events=events)
    prompt = list(range(10, 23))  # 13 tokens: 3 full blocks
    add(sched, "a", prompt)
    run(sched)
    add(sched, "b", prompt)
    out, updates = step(sched)
    assert (out.scheduled[0].position, out.scheduled[0].num_tokens) == (12, 1)
    assert updates[0].num_cached_tokens == 12
    assert run(sched)["b"] == reference_output(prompt, 4)[1:]
    assert sched.stats().num_hit_tokens == 12 and sched.stats().num_queried_tokens == 26
    assert sched.stats().prefix_hit_rate == 12 / 26


def test_decode_blocks_are_cached_for_the_next_turn():
    sched = make()
    prompt = list(range(10, 16))
    add(sched, "turn1", prompt, max_tokens=7)
    answer = run(sched)["turn1"]  # 6 + 7 = 13 tokens, 12 computed: 3 full blocks
    add(sched, "turn2", prompt + answer + [40, 41])
    _, updates = step(sched)
    assert updates[0].num_cached_tokens == 12


def test_salted_requests_do_not_share_cache():
    sched = make()
    prompt = list(range(10, 23))
    sched.add_request(EngineRequest(request_id="a", prompt_token_ids=prompt, cache_salt="x"))
    run(sched)
    sched.add_request(EngineRequest(request_id="b", prompt_token_ids=prompt, cache_salt="y"))
    _, updates = step(sched)
    assert updates[0].num_cached_tokens == 0


def test_preemption_under_a_tiny_pool_completes_every_request():
    sched = make(num_blocks=8, block_size=4)  # 32 tokens for 8 requests of up to 26
    for rid, prompt in PROMPTS.items():
        add(sched, rid, prompt[:14], max_tokens=12)
    outputs = run(sched)
    assert sched.num_preemptions > 0
    assert outputs == {rid: reference_output(p[:14], 12) for rid, p in PROMPTS.items()}


def test_preemption_frees_the_latest_arrival_and_puts_it_first_in_line():
    sched = make(num_blocks=4, block_size=4)
    add(sched, "a", list(range(10, 17)), max_tokens=8)  # 7 tokens: 2 blocks
    add(sched, "b", list(range(20, 27)), max_tokens=8)
    add(sched, "c", list(range(30, 33)), max_tokens=8)
    step(sched)  # a and b hold 2 blocks each; c waits for blocks
    assert [r.request_id for r in sched.running] == ["a", "b"]
    out, _ = step(sched)  # positions 7: still in each one's 2nd block
    assert out.preempted_request_ids == []
    out, _ = step(sched)  # a's position 8 needs a 3rd block: b is preempted
    assert out.preempted_request_ids == ["b"]
    assert [i.request_id for i in out.scheduled] == ["a"]
    b = sched.requests["b"]
    assert (b.status, b.num_computed_tokens, b.num_preemptions) == (RequestStatus.PREEMPTED, 0, 1)
    assert sched.waiting.peek() is b
    assert sched.kv.pool.get_cached_block(b.block_hashes[0]) == 2  # its prefix stays cached
    assert sched.kv.get_computed_blocks(b) == ([2], 4)


def test_watermark_holds_back_admission_but_never_a_lone_request():
    for watermark, expected in [(0.0, ["a", "b"]), (0.2, ["a"])]:
        sched = make(num_blocks=10, block_size=4, watermark=watermark)  # 0.2: 2 blocks
        add(sched, "a", list(range(10, 46)))  # 9 blocks of 10: admitted alone despite 0.2
        add(sched, "b", list(range(50, 54)))  # 1 block: only without the watermark
        out, _ = step(sched)
        assert [i.request_id for i in out.scheduled] == expected


def test_priority_policy_admits_lower_values_first():
    sched = make(max_num_seqs=1, policy="priority")
    for rid, priority in [("low", 5), ("high", -1), ("mid", 2), ("mid2", 2)]:
        add(sched, rid, list(range(10, 15)), max_tokens=2, priority=priority)
    order = []
    while sched.has_unfinished_requests():
        _, updates = step(sched)
        order += [u.request_id for u in updates if u.finished]
    assert order == ["high", "mid", "mid2", "low"]


def test_eos_min_tokens_and_ignore_eos():
    sched = make()
    add(sched, "eos", [10, 11, 12], max_tokens=5)
    add(sched, "min", [10, 11, 12], max_tokens=5, min_tokens=2)
    add(sched, "ign", [10, 11, 12], max_tokens=3, ignore_eos=True)
    forced = {"eos": [EOS], "min": [EOS], "ign": [EOS]}
    _, updates = step(sched, forced)
    assert [(u.request_id, u.finish_reason) for u in updates] == [
        ("eos", FinishReason.STOP),
        ("min", None),
        ("ign", None),
    ]
    _, updates = step(sched, forced)
    assert [(u.request_id, u.finish_reason) for u in updates] == [
        ("min", FinishReason.STOP),
        ("ign", None),
    ]
    _, updates = step(sched, forced)
    assert [(u.request_id, u.finish_reason, u.num_output_tokens) for u in updates] == [
        ("ign", FinishReason.LENGTH, 3)
    ]
    assert sched.kv.num_used_blocks == 0


def test_stop_token_ids_report_the_token_and_extra_tokens_are_dropped():
    sched = make()
    add(sched, "a", [10, 11, 12], max_tokens=9, stop_token_ids=(77,))
    _, (update,) = step(sched, {"a": [50, 77, 51]})
    assert update.new_token_ids == [50, 77]
    assert (update.finish_reason, update.stop_reason) == (FinishReason.STOP, 77)


def test_max_tokens_and_max_model_len_end_with_length():
    sched = make(max_model_len=8)
    add(sched, "a", list(range(10, 16)), max_tokens=None)
    add(sched, "b", list(range(10, 13)), max_tokens=2)
    outputs = run(sched)
    assert (len(outputs["a"]), len(outputs["b"])) == (2, 2)


def test_abort_frees_blocks_of_running_and_waiting_requests():
    sched = make(max_num_seqs=1)
    add(sched, "run", list(range(10, 20)))
    add(sched, "wait", list(range(20, 30)))
    out = sched.schedule()
    aborted = sched.abort_requests(["run", "wait", "unknown", "run"])
    assert [r.finish_reason for r in aborted] == [FinishReason.ABORT] * 2
    assert sched.update_from_output(out, {"run": [11]}) == []  # finished since schedule
    assert sched.kv.num_used_blocks == 0 and not sched.has_unfinished_requests()
    assert sched.schedule().finished_request_ids == ["run", "wait"]
    sched.check_integrity()


def test_finish_requests_from_outside_keeps_tokens():
    sched = make()
    add(sched, "a", [10, 11, 12], max_tokens=9)
    step(sched)
    (done,) = sched.finish_requests(["a"], FinishReason.STOP, "</s>")
    assert (done.stop_reason, done.num_output_tokens, done.is_finished) == ("</s>", 1, True)
    assert sched.num_running == 0 and sched.kv.num_used_blocks == 0


def test_add_request_rejects_bad_requests():
    sched = make(max_model_len=16)
    add(sched, "a", [10])
    with pytest.raises(InvalidRequestError, match="already in flight"):
        add(sched, "a", [10])
    with pytest.raises(InvalidRequestError, match="empty"):
        add(sched, "b", [])
    with pytest.raises(ContextLengthExceededError):
        add(sched, "c", list(range(17)))
    assert make(num_blocks=2, block_size=4).max_model_len == 8  # the pool caps it


def test_config_validation_and_memory_budget():
    from tokenmill.engine.models.config import ModelConfig

    with pytest.raises(ValueError, match="max_num_batched_tokens must be >= max_model_len"):
        SchedulerConfig(max_num_batched_tokens=512, enable_chunked_prefill=False)
    with pytest.raises(ValueError, match="policy"):
        SchedulerConfig(policy="lifo")
    model = ModelConfig("llama", 100, 64, 128, 30, 9, 3, 64, 8192)  # 11,520 values per token
    config = CacheConfig.from_memory_budget(45 * 1024 * 16 * 100 + 5, model, "float32")
    assert (config.block_size, config.num_blocks) == (16, 100)
    with pytest.raises(ValueError, match="holds no block"):
        CacheConfig.from_memory_budget(1000, model, 2)


def test_events_match_pool_contents_in_a_busy_run():
    events: list = []
    sched = make(num_blocks=12, block_size=4, events=events)
    shared = list(range(10, 18))
    for i in range(12):
        add(sched, f"r{i}", shared + [20 + i] * (i % 5 + 1), max_tokens=6)
    run(sched)
    cached: set[int] = set()
    for event in events:
        if isinstance(event, Stored):
            cached.update(b.block_hash for b in event.blocks)
        elif isinstance(event, Removed):
            cached.difference_update(event.block_hashes)
    assert any(isinstance(e, Removed) for e in events)
    assert cached == sched.kv.pool.cached_hashes()


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["add", "abort", "step", "step"]), st.integers(0, 9), st.integers(1, 30)
        ),
        max_size=60,
    ),
    st.sampled_from(["fcfs", "priority"]),
)
def test_random_add_abort_step_keeps_integrity(ops, policy):
    sched = make(
        num_blocks=10, block_size=4, max_num_batched_tokens=12, max_num_seqs=4, policy=policy
    )
    for op, i, n in ops:
        rid = f"r{i}"
        if op == "add" and rid not in sched.requests:
            add(
                sched,
                rid,
                [10 + (i * j) % 7 for j in range(n)],
                max_tokens=n % 6 + 1,
                priority=n % 3,
            )
        elif op == "abort":
            sched.abort_requests([rid])
        else:
            step(sched)
        sched.check_integrity()
    run(sched)
    sched.check_integrity()


@pytest.mark.slow
def test_decode_step_cost_with_256_running_requests():
    """The mocker's hot path: 256 running decodes, 64-token blocks, 16,384 blocks."""
    import time

    sched = make(num_blocks=16_384, block_size=64, max_num_batched_tokens=8192, max_model_len=10**6)
    for i in range(256):
        add(sched, f"r{i}", [10 + (i * j) % 997 for j in range(1000)], max_tokens=10**5)
    while sched.num_waiting:
        step(sched)
    num_steps, elapsed = 1000, 0.0
    for _ in range(num_steps):
        start = time.process_time()
        out = sched.schedule()
        sched.update_from_output(out, {item.request_id: [11] for item in out.scheduled})
        elapsed += time.process_time() - start  # CPU time: the machine is shared
    per_step_us = elapsed / num_steps * 1e6
    print(f"schedule + update_from_output: {per_step_us:.0f} us CPU per step of 256 decodes")
    assert out.num_decode_tokens == 256 and per_step_us < 20_000
    sched.check_integrity()
