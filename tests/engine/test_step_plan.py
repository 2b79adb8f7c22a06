"""The scheduler's step plan as wire data: a msgpack round trip keeps it, and a consumer that
sees only the plans of a run (chunked prefills, prefix hits, decodes, preemption, finishes,
aborts) keeps each request's token ids and block table exactly as the scheduler has them."""

from __future__ import annotations

import msgspec
import pytest

from tokenmill.core.request import EngineRequest
from tokenmill.core.sampling import SamplingParams
from tokenmill.engine.config import CacheConfig, SchedulerConfig
from tokenmill.engine.scheduler import Scheduler
from tokenmill.engine.scheduler_output import (
    PLAN_VERSION,
    SchedulerOutput,
    StepPlan,
    decode_plan,
    encode_plan,
)

EOS = 2


def fake_token(token_ids: list[int]) -> int:
    return 10 + (sum(token_ids) * 31 + len(token_ids)) % 997


class PlanConsumer:
    """What another process keeps from the plans alone (the rules of scheduler_output)."""

    def __init__(self) -> None:
        self.tokens: dict[str, list[int]] = {}
        self.tables: dict[str, list[int]] = {}
        self.params: dict[str, SamplingParams] = {}

    def apply(self, plan: StepPlan) -> None:
        for rid in plan.preempted_request_ids:
            self.tables[rid] = []
        for new in plan.new_requests:
            assert new.request_id not in self.tokens
            self.tokens[new.request_id] = list(new.prompt_token_ids)
            self.tables[new.request_id] = []
            self.params[new.request_id] = new.params
        for item in plan.scheduled:
            tokens = self.tokens[item.request_id]
            end = item.position + item.num_tokens
            assert tokens[item.position : end] == item.token_ids[: len(tokens) - item.position]
            tokens[item.position : end] = item.token_ids
            self.tables[item.request_id] += item.new_block_ids
        for rid in plan.finished_request_ids:
            for kept in (self.tokens, self.tables, self.params):
                kept.pop(rid, None)


def make(num_blocks: int, block_size: int = 4, **config) -> Scheduler:
    return Scheduler(SchedulerConfig(**config), CacheConfig(block_size, num_blocks), [EOS])


def add(sched: Scheduler, rid: str, prompt: list[int], max_tokens: int) -> None:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    sched.add_request(EngineRequest(request_id=rid, prompt_token_ids=prompt, params=params))


def step_through_plans(sched: Scheduler, consumer: PlanConsumer) -> SchedulerOutput:
    out = sched.schedule()
    plan = decode_plan(encode_plan(out.to_plan()))
    consumer.apply(plan)
    for item in out.scheduled:  # before update_from_output frees finished tables
        rid, end = item.request_id, item.position + item.num_tokens
        assert consumer.tokens[rid][:end] == item.request.all_token_ids[:end]
        assert consumer.tables[rid] == sched.kv.get_block_ids(rid)
        assert consumer.params[rid] == item.request.params
    sampled = {
        i.request_id: [fake_token(i.request.all_token_ids)] for i in out.scheduled if i.samples
    }
    sched.update_from_output(out, sampled)
    sched.check_integrity()
    return out


def test_a_plan_survives_a_msgpack_round_trip():
    sched = make(num_blocks=16, max_num_batched_tokens=6)
    add(sched, "a", list(range(10, 19)), max_tokens=3)
    add(sched, "b", list(range(30, 33)), max_tokens=3)
    out = sched.schedule()
    plan = out.to_plan()
    assert decode_plan(encode_plan(plan)) == plan
    assert plan.version == PLAN_VERSION
    assert [(p.request_id, p.position, p.num_tokens, p.samples) for p in plan.scheduled] == [
        ("a", 0, 6, False)
    ]
    assert plan.scheduled[0].token_ids == list(range(10, 16))
    assert plan.scheduled[0].new_block_ids == sched.kv.get_block_ids("a") == [0, 1]
    assert [n.request_id for n in plan.new_requests] == ["a"]
    assert plan.new_requests[0].num_prompt_tokens == 9
    assert plan.num_scheduled_tokens == out.num_scheduled_tokens == 6
    assert (plan.num_active_blocks, plan.num_total_blocks) == (2, 16)


def test_a_plan_from_a_newer_version_is_refused():
    newer = msgspec.structs.replace(
        make(num_blocks=4).schedule().to_plan(), version=PLAN_VERSION + 1
    )
    with pytest.raises(ValueError, match="newer"):
        decode_plan(encode_plan(newer))


def test_only_new_blocks_travel_after_the_first_schedule():
    sched = make(num_blocks=16)
    add(sched, "a", list(range(10, 17)), max_tokens=4)  # 7 tokens: blocks 0, 1
    first = sched.schedule()
    sched.update_from_output(first, {"a": [50]})
    plans = []
    for _ in range(2):  # positions 7 (block 1 again) and 8 (a new block)
        out = sched.schedule()
        plans.append(out.to_plan())
        sched.update_from_output(out, {"a": [51]})
    assert [p.scheduled[0].new_block_ids for p in plans] == [[], [2]]
    assert [p.new_requests for p in plans] == [[], []]


def test_a_consumer_of_the_plans_alone_mirrors_tokens_and_tables():
    shared = list(range(100, 112))  # 3 full blocks: later requests hit them
    sched = make(num_blocks=10, max_num_batched_tokens=10)
    consumer = PlanConsumer()
    for i in range(6):
        add(sched, f"r{i}", shared + [200 + i] * (2 + i), max_tokens=6)
    seen_hit = seen_preempted = seen_resumed = False
    aborted = False
    for _ in range(500):
        if not sched.has_unfinished_requests():
            break
        out = step_through_plans(sched, consumer)
        seen_preempted |= bool(out.preempted_request_ids)
        for item in out.scheduled:
            if item.num_held_blocks == 0 and item.position > 0:
                seen_hit = True
                seen_resumed |= item.request.num_preemptions > 0
        if not aborted and "r5" in consumer.tokens:
            sched.abort_requests(["r5"])  # aborted mid-run: its id finishes in the next plan
            aborted = True
    step_through_plans(sched, consumer)  # the last finished ids
    assert seen_hit and seen_preempted and seen_resumed and aborted
    assert consumer.tokens == consumer.tables == consumer.params == {}
    assert sched.kv.num_used_blocks == 0
