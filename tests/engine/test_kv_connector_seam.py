"""The KV connector seam, scheduler side, with plain data: a request whose prompt KV can be
loaded from elsewhere is parked while the load runs, becomes schedulable with those tokens
computed (full blocks cached) when the worker side reports it, recomputes when the load
fails, keeps its blocks while a load may still write them; sync loads count at once; the
null connector changes nothing; the engine core drives the worker side."""

from __future__ import annotations

from collections.abc import Sequence

from tokenmill.core.block_hash import block_hashes
from tokenmill.core.request import EngineRequest, FinishReason
from tokenmill.core.sampling import SamplingParams
from tokenmill.engine.builder import build_mock_core
from tokenmill.engine.config import CacheConfig, SchedulerConfig
from tokenmill.engine.executor.kv_connector import WorkerConnector
from tokenmill.engine.request import RequestStatus
from tokenmill.engine.scheduler import Scheduler
from tokenmill.kv.connector import (
    ConnectorMetadata,
    ConnectorOutput,
    ConnectorRequest,
    KvLoad,
    SchedulerConnector,
)

B = 4
EOS = 2


class ScriptedConnector(SchedulerConnector):
    """Offers ``loadable[request_id]`` prompt tokens past the local hit (once: a failed
    load is not offered again); holds an aborted request's blocks until its load is over."""

    def __init__(self, loadable: dict[str, int], is_async: bool = True):
        self.loadable = dict(loadable)
        self.is_async = is_async
        self.new_loads: list[KvLoad] = []
        self.in_flight: set[str] = set()
        self.held: set[str] = set()
        self.releasable: list[str] = []

    def get_num_new_matched_tokens(self, request: ConnectorRequest, num_computed_tokens: int):
        offer = self.loadable.get(request.request_id, 0) - num_computed_tokens
        return max(0, min(offer, request.num_tokens - 1 - num_computed_tokens)), self.is_async

    def update_state_after_alloc(self, request, block_ids, num_computed_tokens, n) -> None:
        first = num_computed_tokens // B
        num_blocks = -(-(num_computed_tokens + n) // B) - first
        load = KvLoad(
            request_id=request.request_id,
            block_ids=list(block_ids[first : first + num_blocks]),
            first_block=first,
            num_tokens=n,
            is_async=self.is_async,
        )
        self.new_loads.append(load)
        self.in_flight.add(request.request_id)

    def build_connector_meta(self) -> ConnectorMetadata | None:
        if not (self.new_loads or self.in_flight or self.held):
            return None
        loads, self.new_loads = self.new_loads, []
        return ConnectorMetadata(loads=loads)

    def update_connector_output(self, output: ConnectorOutput) -> None:
        for rid in [*output.finished_loads, *output.failed_loads]:
            self.in_flight.discard(rid)
            self.loadable.pop(rid, None)
            if rid in self.held:
                self.held.discard(rid)
                self.releasable.append(rid)

    def take_releasable(self) -> list[str]:
        out, self.releasable = self.releasable, []
        return out

    def request_finished(self, request: ConnectorRequest, block_ids: Sequence[int]) -> bool:
        if request.request_id in self.in_flight:
            self.held.add(request.request_id)
            return True
        return False

    def has_pending(self) -> bool:
        return bool(self.in_flight or self.held)


def make(connector: SchedulerConnector, num_blocks: int = 16, **config) -> Scheduler:
    cache = CacheConfig(block_size=B, num_blocks=num_blocks)
    return Scheduler(SchedulerConfig(**config), cache, [EOS], connector=connector)


def add(sched: Scheduler, rid: str, prompt: list[int], max_tokens: int = 3) -> None:
    params = SamplingParams(max_tokens=max_tokens)
    sched.add_request(EngineRequest(request_id=rid, prompt_token_ids=prompt, params=params))


def finish_step(sched: Scheduler, out) -> None:
    sched.update_from_output(out, {i.request_id: [50] for i in out.scheduled if i.samples})
    sched.check_integrity()


PROMPT = list(range(10, 21))  # 11 tokens: blocks 0..2, the last one partial


def test_async_load_parks_then_schedules_the_rest_with_blocks_cached():
    connector = ScriptedConnector({"a": 10})
    sched = make(connector)
    add(sched, "a", PROMPT)
    out = sched.schedule()
    assert out.scheduled == []  # nothing computes while the load runs
    request = sched.requests["a"]
    assert request.status is RequestStatus.WAITING_FOR_REMOTE_KV
    assert sched.kv.get_block_ids("a") == [0, 1, 2]  # the whole prompt's blocks
    assert out.kv_connector_metadata.loads == [
        KvLoad(request_id="a", block_ids=[0, 1, 2], first_block=0, num_tokens=10)
    ]
    assert sched.stats().num_waiting_for_remote_kv == 1 and sched.has_pending_transfers()
    sched.check_integrity()
    assert sched.schedule().scheduled == []  # still loading: nothing, and no second load

    sched.update_from_kv_output(ConnectorOutput(finished_loads=["a"]))
    cached = sched.kv.pool.cached_hashes()
    assert cached == set(block_hashes(PROMPT, B)[:2])  # full blocks of the loaded tokens
    out = sched.schedule()
    [item] = out.scheduled
    assert (item.position, item.num_tokens, item.samples) == (10, 1, True)
    assert item.is_first_schedule
    plan = out.to_plan()
    assert [r.request_id for r in plan.new_requests] == ["a"]
    assert plan.scheduled[0].new_block_ids == [0, 1, 2]
    finish_step(sched, out)
    assert request.num_computed_tokens == 11 and request.output_token_ids == [50]
    while sched.has_unfinished_requests():
        finish_step(sched, sched.schedule())
    assert sched.kv.num_used_blocks == 0
    assert not sched.has_pending_transfers()


def test_only_blocks_past_the_local_prefix_hit_are_loaded():
    sched = make(ScriptedConnector({"b": 10}))
    add(sched, "a", [*PROMPT[:8], 99], max_tokens=1)  # caches blocks 0, 1 (8 tokens)
    finish_step(sched, sched.schedule())
    add(sched, "b", PROMPT)
    out = sched.schedule()
    [load] = out.kv_connector_metadata.loads
    table = sched.kv.get_block_ids("b")
    assert (load.first_block, load.num_tokens, load.block_ids) == (2, 2, table[2:])
    assert sched.requests["b"].num_cached_tokens == 8


def test_failed_load_frees_its_blocks_and_recomputes():
    connector = ScriptedConnector({"a": 10})
    sched = make(connector)
    add(sched, "a", PROMPT)
    sched.schedule()
    sched.update_from_kv_output(ConnectorOutput(failed_loads=["a"]))
    assert sched.kv.num_used_blocks == 0 and sched.kv.pool.cached_hashes() == set()
    assert sched.requests["a"].status is RequestStatus.WAITING
    sched.check_integrity()
    out = sched.schedule()
    [item] = out.scheduled
    assert (item.position, item.num_tokens) == (0, 11)  # the whole prompt, computed here
    assert out.to_plan().new_requests[0].request_id == "a"
    assert sched.stats().num_kv_load_failures == 1
    finish_step(sched, out)
    while sched.has_unfinished_requests():
        finish_step(sched, sched.schedule())
    assert sched.kv.num_used_blocks == 0


def test_abort_while_loading_holds_blocks_until_the_load_is_over():
    connector = ScriptedConnector({"a": 10})
    sched = make(connector)
    add(sched, "a", PROMPT)
    sched.schedule()
    [aborted] = sched.abort_requests(["a"])
    assert aborted.finish_reason is FinishReason.ABORT
    assert sched.kv.held_request_ids == ["a"] and sched.kv.num_used_blocks == 3
    sched.check_integrity()
    sched.update_from_kv_output(ConnectorOutput(finished_loads=["a"]))
    sched.schedule()  # releasable now
    assert sched.kv.num_used_blocks == 0 and sched.kv.pool.cached_hashes() == set()
    assert not sched.has_pending_transfers()
    sched.check_integrity()


def test_abort_after_load_before_schedule_frees_at_once():
    sched = make(ScriptedConnector({"a": 10}))
    add(sched, "a", PROMPT)
    sched.schedule()
    sched.update_from_kv_output(ConnectorOutput(finished_loads=["a"]))
    sched.abort_requests(["a"])
    assert sched.kv.num_used_blocks == 0 and sched.stats().num_waiting_for_remote_kv == 0
    sched.check_integrity()


def test_sync_load_counts_its_tokens_computed_in_the_same_step():
    sched = make(ScriptedConnector({"a": 8}, is_async=False))
    add(sched, "a", PROMPT)
    out = sched.schedule()
    [item] = out.scheduled
    assert (item.position, item.num_tokens) == (8, 3)
    assert out.kv_connector_metadata.loads[0].is_async is False
    finish_step(sched, out)


def test_parked_requests_count_against_max_num_seqs():
    sched = make(ScriptedConnector({"a": 10}), max_num_seqs=1)
    add(sched, "a", PROMPT)
    add(sched, "b", [5, 6, 7])
    assert sched.schedule().scheduled == []  # "b" waits: "a" takes the only seat
    assert sched.num_waiting == 1


def test_null_connector_has_no_metadata_and_nothing_pending():
    sched = make(SchedulerConnector())
    add(sched, "a", PROMPT)
    out = sched.schedule()
    assert out.kv_connector_metadata is None and out.to_plan().kv_connector_metadata is None
    assert not sched.has_pending_transfers()


class ReportingWorker(WorkerConnector):
    """Finishes every load one poll after it started; records the calls."""

    def __init__(self):
        self.started: list[KvLoad] = []
        self.pending: list[str] = []
        self.calls = 0

    def start_load_kv(self, metadata: ConnectorMetadata) -> None:
        self.calls += 1
        self.started.extend(metadata.loads)

    def get_finished(self) -> ConnectorOutput | None:
        done, self.pending = self.pending, [load.request_id for load in self.started]
        self.started = []
        return ConnectorOutput(finished_loads=done) if done else None


def _core(connector: SchedulerConnector, worker: WorkerConnector):
    cache = CacheConfig(block_size=B, num_blocks=16)
    return build_mock_core(
        cache, SchedulerConfig(), connector=connector, worker_connector=worker, vocab_size=100
    )


def test_core_drives_the_worker_side_through_empty_steps():
    worker = ReportingWorker()
    core = _core(ScriptedConnector({"a": 10}), worker)
    params = SamplingParams(max_tokens=3)
    core.add_request(EngineRequest(request_id="a", prompt_token_ids=PROMPT, params=params))
    assert core.begin_step() is None  # parked: the connector ran, nothing else
    assert worker.calls == 1 and core.has_pending_transfers()
    assert core.begin_step() is None  # the load is reported finished at this poll
    outputs = []
    while core.has_unfinished_requests():
        outputs.extend(core.step())
    assert [o.finish_reason for o in outputs][-1] is FinishReason.LENGTH
    assert sum(len(o.new_token_ids) for o in outputs) == 3
    core.check_integrity()
    assert core.scheduler.kv.num_used_blocks == 0


def test_null_connector_never_calls_the_worker_side():
    worker = ReportingWorker()
    core = _core(SchedulerConnector(), worker)
    core.add_request(EngineRequest(request_id="a", prompt_token_ids=PROMPT))
    for _ in range(3):
        core.step()
    assert worker.calls == 0
