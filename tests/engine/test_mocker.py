from __future__ import annotations

import json

import pytest

from tokenmill.core.request import EngineRequest
from tokenmill.core.sampling import SamplingParams
from tokenmill.engine.config import CacheConfig, SchedulerConfig
from tokenmill.engine.mocker import (
    MockExecutor,
    PolynomialTiming,
    ProfileTiming,
    TokenSource,
    advance_decode,
    decode_run_length,
    step_ms,
)
from tokenmill.engine.scheduler import Scheduler
from tokenmill.engine.scheduler_output import SchedulerOutput


def test_polynomial_probes_and_terms():
    t = PolynomialTiming()
    assert t.prefill_ms(1000) == pytest.approx(32.106, abs=5e-4)
    assert t.prefill_ms(4000) == pytest.approx(83.971, abs=5e-4)
    assert t.decode_ms(0.0) == pytest.approx(5.74)
    assert t.decode_ms(0.5) == pytest.approx(-25.74 * 0.25 + 54.01 * 0.5 + 5.74)
    assert PolynomialTiming(decode=(0.0, -10.0, 0.0)).decode_ms(0.9) == 1.0  # floor at 1 ms


def test_step_ms_charges_prefill_and_decode_only_when_present():
    t = PolynomialTiming()
    prefill_only = SchedulerOutput(
        num_prefill_tokens=1000, num_active_blocks=10, num_total_blocks=100
    )
    assert step_ms(t, prefill_only) == t.prefill_ms(1000)
    decode_only = SchedulerOutput(num_decode_tokens=3, num_active_blocks=25, num_total_blocks=100)
    assert step_ms(t, decode_only) == t.decode_ms(0.25)
    mixed = SchedulerOutput(
        num_prefill_tokens=64, num_decode_tokens=1, num_active_blocks=50, num_total_blocks=100
    )
    assert step_ms(t, mixed) == t.prefill_ms(64) + t.decode_ms(0.5)
    assert step_ms(t, SchedulerOutput(num_total_blocks=100)) == 0.0


def test_profile_timing_interpolates_and_clamps(tmp_path):
    path = tmp_path / "profile.json"
    path.write_text(
        json.dumps({"prefill": [[0, 10.0], [1000, 30.0]], "decode": [[0.0, 5.0], [1.0, 9.0]]})
    )
    t = ProfileTiming.load(path)
    assert t.prefill_ms(500) == 20.0
    assert t.prefill_ms(5000) == 30.0
    assert t.decode_ms(0.25) == 6.0


def test_tokens_deterministic_in_vocab():
    src = TokenSource(vocab_size=50, seed=3)
    toks = src.tokens("a", 0, 100)
    assert toks == [src.token("a", p) for p in range(100)]
    assert all(0 <= x < 50 for x in toks)
    assert toks == TokenSource(vocab_size=50, seed=3).tokens("a", 0, 100)
    assert toks != src.tokens("b", 0, 100)


def test_executor_sleeps_scaled_step_time():
    slept = []
    ex = MockExecutor(100, 16, speedup_ratio=10.0, sleep=slept.append)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=2048), CacheConfig(16, 100))
    sched.add_request(EngineRequest(request_id="r", prompt_token_ids=list(range(1000))))
    out = sched.schedule()
    result = ex.execute(out)
    assert ex.last_step_ms == PolynomialTiming().prefill_ms(1000)
    assert slept == [pytest.approx(ex.last_step_ms / 1000 / 10)]
    assert result.sampled == {"r": [ex.tokens.token("r", 1000)]}


def _scheduler(events: list) -> Scheduler:
    cfg = SchedulerConfig(max_num_batched_tokens=256, max_model_len=4096)
    return Scheduler(cfg, CacheConfig(block_size=8, num_blocks=200), (), events.append)


def _add(sched: Scheduler, rid: str, n: int, out: int) -> None:
    params = SamplingParams(max_tokens=out, ignore_eos=True)
    sched.add_request(EngineRequest(request_id=rid, prompt_token_ids=list(range(n)), params=params))


def _state(sched: Scheduler) -> list:
    return [
        (
            r.request_id,
            r.all_token_ids,
            r.block_hashes,
            r.num_computed_tokens,
            sched.kv.get_block_ids(r.request_id),
        )
        for r in sched.running
    ]


def test_fast_forward_equals_stepping():
    """k fast-forwarded decode steps leave exactly the state of k real steps."""
    ev_a, ev_b = [], []
    a, b = _scheduler(ev_a), _scheduler(ev_b)
    ex = MockExecutor(200, 8)
    for s in (a, b):
        _add(s, "x", 13, 40)
        _add(s, "y", 21, 30)
    num_ff = 0
    for _ in range(200):
        if not a.has_unfinished_requests():
            break
        k = decode_run_length(b)
        if k > 1:
            advance_decode(b, ex.tokens, k)
            num_ff += k
            for _ in range(k):
                out = a.schedule()
                assert out.num_prefill_tokens == 0
                a.update_from_output(out, ex.sample(out))
        else:
            for s in (a, b):
                out = s.schedule()
                s.update_from_output(out, ex.sample(out))
        assert _state(a) == _state(b)
        assert ev_a == ev_b
    assert not b.has_unfinished_requests() and num_ff > 20
    b.check_integrity()


def test_no_fast_forward_while_someone_waits_or_prefills():
    sched = _scheduler([])
    _add(sched, "x", 13, 40)
    assert decode_run_length(sched) == 0  # waiting
    out = sched.schedule()
    sched.update_from_output(out, MockExecutor(200, 8).sample(out))
    # 14 tokens, 13 computed: blocks of 8 -> 16 slots; next full block at token 16
    assert decode_run_length(sched) == 2


def test_live_engine_core_with_mocker_streams_tokens_and_events():
    from tokenmill.engine.mocker import build_mock_engine_core

    events, slept = [], []
    core = build_mock_engine_core(
        SchedulerConfig(max_num_batched_tokens=512),
        CacheConfig(block_size=16, num_blocks=64),
        speedup_ratio=100.0,
        vocab_size=1000,
        event_sink=events.append,
        sleep=slept.append,
    )
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    core.add_request(EngineRequest(request_id="a", prompt_token_ids=list(range(40)), params=params))
    outputs = []
    while core.has_unfinished_requests():
        outputs.extend(core.step())
    assert sum(len(o.new_token_ids) for o in outputs) == 4
    assert outputs[-1].finished
    assert slept[0] == pytest.approx(PolynomialTiming().prefill_ms(40) / 1000 / 100)
    assert len(slept) == 4 and events  # 2 full prompt blocks stored
    core.scheduler.check_integrity()
