"""``EngineCore.step`` is ``finish_step(begin_step())``: two mocker cores fed the same requests,
one stepped whole and one by halves, give the same outputs, KV events and pool state at every
step (a small pool, so prefix hits, eviction and preemption all happen). Plus validation."""

from __future__ import annotations

import numpy as np
import pytest

from tokenmill.core.errors import InvalidRequestError
from tokenmill.core.request import EngineRequest
from tokenmill.core.sampling import SamplingParams
from tokenmill.engine.builder import build_mock_core
from tokenmill.engine.config import CacheConfig, SchedulerConfig

CACHE = CacheConfig(block_size=4, num_blocks=16)
SCHED = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16, max_model_len=96)


def _core(events: list):
    # a still clock: outputs carry queue times, which must not differ by wall time
    return build_mock_core(CACHE, SCHED, vocab_size=50, event_sink=events.append, clock=lambda: 0.0)


def _req(i: int) -> EngineRequest:
    prompt = [1, 2, 3, 4, 5, 6, 7, 8] + [10 + i] * (3 + 2 * i)  # a shared two-block prefix
    params = SamplingParams(max_tokens=12 + 2 * i, ignore_eos=True)
    return EngineRequest(request_id=f"r{i}", prompt_token_ids=prompt, params=params)


def _pool_state(core) -> tuple:
    kv = core.scheduler.kv
    requests = {
        rid: (r.status, r.num_computed_tokens, list(r.all_token_ids), list(kv.get_block_ids(rid)))
        for rid, r in core.scheduler.requests.items()
    }
    running = [r.request_id for r in core.scheduler.running]
    return requests, running, kv.num_free_blocks, kv.num_used_blocks


def test_step_equals_begin_step_then_finish_step():
    ev_whole, ev_halves = [], []
    whole, halves = _core(ev_whole), _core(ev_halves)
    num_steps = num_preempted = 0
    for step in range(200):
        if step < 6:  # a new request arrives before each of the first steps
            whole.add_request(_req(step))
            halves.add_request(_req(step))
        if not whole.has_unfinished_requests():
            break
        inflight = halves.begin_step()
        assert inflight is not None
        num_preempted += len(inflight.scheduler_output.preempted_request_ids)
        assert halves.finish_step(inflight) == whole.step()
        assert _pool_state(halves) == _pool_state(whole)
        assert ev_halves == ev_whole
        num_steps += 1
    assert not halves.has_unfinished_requests() and num_steps > 10
    assert num_preempted > 0 and halves.scheduler.num_hit_tokens > 0  # the pool was tight
    for core in (whole, halves):
        core.check_integrity()
    assert halves.num_steps == whole.num_steps == num_steps


def test_begin_step_with_nothing_to_run_is_none_and_finishing_it_is_empty():
    core = _core([])
    assert core.begin_step() is None
    assert core.finish_step(None) == [] and core.step() == []
    assert core.num_steps == 0


def test_request_added_between_the_halves_joins_the_next_step():
    core = _core([])
    core.add_request(_req(0))
    inflight = core.begin_step()
    core.add_request(_req(1))  # arrives while the step is in flight
    outs = core.finish_step(inflight)
    assert [(o.request_id, len(o.new_token_ids)) for o in outs] == [("r0", 1)]
    assert [s.request_id for s in core.begin_step().scheduler_output.scheduled] == ["r0", "r1"]


@pytest.mark.parametrize(
    ("ids", "bad"),
    [([1, 50], 50), ([-1, 3], -1), ([3, 2, 1 << 40], 1 << 40), ([0, 49, 7, 70, 80], 70)],
)
def test_validate_names_the_first_token_outside_the_vocabulary(ids, bad):
    core = _core([])
    request = EngineRequest(request_id="x", prompt_token_ids=ids, params=SamplingParams())
    with pytest.raises(InvalidRequestError, match=f"prompt token id {bad} is outside"):
        core.validate(request)


def test_validate_accepts_in_range_ids_of_any_int_type():
    """numpy ints (an in-process caller's ``tolist``-less list) pass as before."""
    core = _core([])
    ids = [np.int64(3), np.int64(49), 0]
    core.validate(EngineRequest(request_id="x", prompt_token_ids=ids, params=SamplingParams()))
    too_big = [np.int64(3), np.int64(50)]
    with pytest.raises(InvalidRequestError, match="prompt token id 50"):
        core.validate(EngineRequest(request_id="y", prompt_token_ids=too_big))
