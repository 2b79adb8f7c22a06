"""Finished requests' blocks go through one method that a scheduler-side connector may
delay: held blocks stay referenced (not evictable, not reusable) until released, then are
freed as usual; preemption never asks the connector; nothing leaks."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from tokenmill.core.errors import InvalidRequestError
from tokenmill.core.request import EngineRequest, FinishReason
from tokenmill.core.sampling import SamplingParams
from tokenmill.engine.config import CacheConfig, SchedulerConfig
from tokenmill.engine.scheduler import Scheduler
from tokenmill.kv.connector import NULL_CONNECTOR, SchedulerConnector
from tokenmill.kv.manager import KVRequest

EOS = 2


class HoldingConnector(SchedulerConnector):
    """Holds the blocks of the requests named in ``hold``; records every question."""

    def __init__(self, hold: set[str]):
        self.hold = hold
        self.asked: list[tuple[str, list[int]]] = []

    def request_finished(self, request: KVRequest, block_ids: Sequence[int]) -> bool:
        self.asked.append((request.request_id, list(block_ids)))
        return request.request_id in self.hold


def make(connector: SchedulerConnector, num_blocks: int = 8) -> Scheduler:
    cache = CacheConfig(block_size=4, num_blocks=num_blocks)
    return Scheduler(SchedulerConfig(), cache, [EOS], connector=connector)


def add(sched: Scheduler, rid: str, prompt: list[int], max_tokens: int = 2) -> None:
    params = SamplingParams(max_tokens=max_tokens)
    sched.add_request(EngineRequest(request_id=rid, prompt_token_ids=prompt, params=params))


def step(sched: Scheduler) -> None:
    out = sched.schedule()
    sched.update_from_output(out, {i.request_id: [50] for i in out.scheduled if i.samples})
    sched.check_integrity()


def test_held_blocks_stay_referenced_until_released():
    connector = HoldingConnector({"a"})
    sched = make(connector)
    add(sched, "a", list(range(10, 17)), max_tokens=1)  # 7 tokens: blocks 0, 1
    step(sched)  # prefill samples its only token: finished (LENGTH)
    assert connector.asked == [("a", [0, 1])]
    assert not sched.has_unfinished_requests()
    assert sched.kv.held_request_ids == ["a"]
    assert (sched.kv.pool.ref_count(0), sched.kv.pool.ref_count(1)) == (1, 1)
    assert sched.kv.num_free_blocks == 6
    assert sched.schedule().num_active_blocks == 2  # held blocks are in use
    assert sched.release_held_blocks(["a", "unknown"]) == ["a"]
    assert sched.release_held_blocks(["a"]) == []  # a second release is a no-op
    assert sched.kv.num_free_blocks == 8 and sched.kv.held_request_ids == []
    sched.check_integrity()


def test_every_finish_path_asks_the_connector_and_preemption_does_not():
    connector = HoldingConnector({"stop", "abort", "error"})
    sched = make(connector, num_blocks=4)
    add(sched, "stop", list(range(10, 17)), max_tokens=8)
    add(sched, "abort", list(range(20, 23)), max_tokens=8)
    add(sched, "error", list(range(30, 33)), max_tokens=8)
    step(sched)  # stop: 2 blocks, abort: 1, error: 1
    out = sched.schedule()  # no preemption yet: every table has room
    sched.update_from_output(out, {"stop": [EOS], "abort": [60], "error": [61]})
    sched.abort_requests(["abort"])
    sched.finish_requests(["error"], FinishReason.ERROR)
    sched.check_integrity()
    assert [rid for rid, _ in connector.asked] == ["stop", "abort", "error"]
    assert sorted(sched.kv.held_request_ids) == ["abort", "error", "stop"]
    assert sched.kv.num_free_blocks == 0
    sched.release_held_blocks(["stop", "abort", "error"])
    assert sched.kv.num_free_blocks == 4
    sched.check_integrity()


def test_preemption_frees_at_once_without_asking():
    connector = HoldingConnector({"a", "b"})
    sched = make(connector, num_blocks=4)
    add(sched, "a", list(range(10, 17)), max_tokens=8)
    add(sched, "b", list(range(20, 27)), max_tokens=8)
    step(sched)
    step(sched)
    out = sched.schedule()  # a's 3rd block: b is preempted
    assert out.preempted_request_ids == ["b"]
    assert connector.asked == [] and sched.kv.held_request_ids == []


def test_an_id_whose_blocks_are_held_cannot_be_reused_until_released():
    sched = make(HoldingConnector({"a"}))
    add(sched, "a", [10, 11, 12], max_tokens=1)
    step(sched)
    with pytest.raises(InvalidRequestError, match="already in flight"):
        add(sched, "a", [10, 11, 12])
    sched.release_held_blocks(["a"])
    add(sched, "a", [10, 11, 12])
    sched.check_integrity()


def test_the_null_connector_never_holds():
    sched = make(NULL_CONNECTOR)
    assert sched.connector is NULL_CONNECTOR
    add(sched, "a", list(range(10, 17)), max_tokens=1)
    step(sched)
    assert sched.kv.held_request_ids == [] and sched.kv.num_free_blocks == 8
    assert Scheduler(SchedulerConfig(), CacheConfig(4, 8)).connector is NULL_CONNECTOR


def test_manager_integrity_counts_held_tables():
    sched = make(HoldingConnector({"a"}))
    add(sched, "a", list(range(10, 17)), max_tokens=1)
    step(sched)
    sched.kv.pool.free([0])  # a reference lost behind the manager's back
    with pytest.raises(AssertionError):
        sched.kv.check_integrity()
