from __future__ import annotations

import json
import threading

import pytest

from tokenmill.core.request import EngineRequest
from tokenmill.core.sampling import SamplingParams
from tokenmill.engine.builder import build_mock_core
from tokenmill.engine.config import CacheConfig, SchedulerConfig
from tokenmill.engine.mocker import (
    MockExecutor,
    PolynomialTiming,
    ProfileTiming,
    StepPacer,
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


class FakeClock:
    """A clock that only moves when the code under test sleeps or the test says so."""

    def __init__(self) -> None:
        self.now, self.slept = 0.0, []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def _pacer(clock: FakeClock, speedup: float = 1.0) -> StepPacer:
    return StepPacer(speedup, clock=clock, sleep=clock.sleep, max_lag_s=0.010)


def test_pacer_busy_chain_absorbs_real_work_between_steps():
    clock = FakeClock()
    pacer = _pacer(clock, speedup=2.0)
    pacer.on_wake()  # t = 0: the busy period starts
    for work_s, ms in ((0.001, 10.0), (0.002, 20.0), (0.0, 4.0)):
        clock.now += work_s  # scheduling, output handling: part of the simulated step
        pacer.pace(ms)
    assert clock.now == pytest.approx((10 + 20 + 4) / 1000 / 2)  # ends on the simulated time
    assert clock.slept == pytest.approx([0.004, 0.008, 0.002])


def test_pacer_starts_at_wake_up_after_an_idle_gap():
    clock = FakeClock()
    pacer = _pacer(clock)
    pacer.on_wake()
    pacer.pace(5.0)  # busy until t = 0.005, then idle
    clock.now = 1.0
    pacer.on_wake()
    clock.now += 0.001
    pacer.pace(5.0)
    assert clock.now == pytest.approx(1.005)  # wake-up + 5 ms, not the stale chain's deadline
    assert clock.slept == pytest.approx([0.005, 0.004])


def test_pacer_overrun_does_not_sleep_and_makes_up_at_most_max_lag():
    clock = FakeClock()
    pacer = _pacer(clock)  # max_lag_s = 10 ms
    pacer.on_wake()
    pacer.pace(5.0)  # ends at 0.005
    clock.now = 0.105  # 100 ms of real work: overran by 95 ms
    pacer.pace(4.0)  # no sleep; the schedule is now 6 ms behind (capped at 10), not 91
    pacer.pace(4.0)  # no sleep: 2 ms behind
    pacer.pace(4.0)  # sleeps what is left of the step
    assert clock.slept == pytest.approx([0.005, 0.002])
    assert clock.now == pytest.approx(0.107)  # 0.105 - 0.010 + 3 x 0.004: 10 ms made up
    assert (pacer.num_steps, pacer.num_late) == (4, 2)
    assert pacer.late_s == pytest.approx(0.006 + 0.002)


def test_pacer_first_step_without_wake_up_starts_now():
    clock = FakeClock()
    clock.now = 3.0
    pacer = _pacer(clock, speedup=10.0)
    pacer.pace(20.0)
    assert clock.slept == pytest.approx([0.002])


def test_executor_paces_scaled_step_time():
    clock = FakeClock()
    ex = MockExecutor(100, 16, pacer=_pacer(clock, speedup=10.0))
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=2048), CacheConfig(16, 100))
    sched.add_request(EngineRequest(request_id="r", prompt_token_ids=list(range(1000))))
    out = sched.schedule()
    result = ex.execute(out)
    assert ex.last_step_ms == PolynomialTiming().prefill_ms(1000)
    assert clock.slept == [pytest.approx(ex.last_step_ms / 1000 / 10)]
    assert result.sampled == {"r": [ex.tokens.token("r", 1000)]}


class _IdleCondition(threading.Condition):
    """Sets ``idle`` whenever the engine loop waits for work (``wait`` releases the lock, so
    a command queued after ``idle`` is seen can only reach the loop through that wait)."""

    def __init__(self) -> None:
        super().__init__()
        self.idle = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        self.idle.set()
        return super().wait(timeout)


def test_engine_loop_wakes_the_executor_after_each_idle_wait():
    from tokenmill.engine.loop import EngineLoop

    log: list[str] = []
    core = build_mock_core(CacheConfig(16, 64), SchedulerConfig(), vocab_size=100)
    core.executor.on_wake = lambda: log.append("wake")
    execute = core.executor.execute
    core.executor.execute = lambda out: (log.append("step"), execute(out))[1]
    finished = threading.Semaphore(0)
    loop = EngineLoop(core, lambda outs: [finished.release() for o in outs if o.finished])
    loop._cond = cond = _IdleCondition()
    loop.start()
    try:
        params = SamplingParams(max_tokens=3, ignore_eos=True)
        for rid in ("a", "b"):  # the loop is idle before each request
            assert cond.idle.wait(10)
            cond.idle.clear()
            loop.add(EngineRequest(request_id=rid, prompt_token_ids=[1, 2, 3], params=params))
            assert finished.acquire(timeout=10)
    finally:
        loop.shutdown()
    assert log == ["wake", "step", "step", "step"] * 2


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
    events, clock = [], FakeClock()
    core = build_mock_core(
        CacheConfig(block_size=16, num_blocks=64),
        SchedulerConfig(max_num_batched_tokens=512),
        pacer=_pacer(clock, speedup=100.0),
        vocab_size=1000,
        event_sink=events.append,
    )
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    core.add_request(EngineRequest(request_id="a", prompt_token_ids=list(range(40)), params=params))
    outputs = []
    while core.has_unfinished_requests():
        outputs.extend(core.step())
    assert sum(len(o.new_token_ids) for o in outputs) == 4
    assert outputs[-1].finished
    assert clock.slept[0] == pytest.approx(PolynomialTiming().prefill_ms(40) / 1000 / 100)
    assert len(clock.slept) == 4 and events  # 2 full prompt blocks stored
    core.scheduler.check_integrity()


def test_queue_time_is_add_to_first_scheduled_on_the_first_output_only():
    from tokenmill.engine.builder import build_mock_core

    clock = FakeClock()
    core = build_mock_core(
        CacheConfig(16, 16), SchedulerConfig(max_num_seqs=1, max_model_len=64), clock=clock
    )
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    for rid in ("a", "b"):
        core.add_request(EngineRequest(request_id=rid, prompt_token_ids=[1, 2, 3], params=params))
    outs: dict[str, list] = {"a": [], "b": []}
    while core.has_unfinished_requests():
        clock.now += 0.5  # each step starts half a second later
        for out in core.step():
            outs[out.request_id].append(out.queue_time_s)
    # a: scheduled by the first step (0.5 s after it was added); b waits for a's two steps
    assert outs == {"a": [0.5, None], "b": [1.5, None]}
    core.check_integrity()
