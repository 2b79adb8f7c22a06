"""The figures a worker's load is made of: the scheduler's waiting prefill tokens (kept as
requests enter and leave the waiting queue), the engine's stats dict, and the loop's
step-time average (steps that computed something only), all with plain data."""

from __future__ import annotations

from tokenmill.core.request import EngineRequest, FinishReason
from tokenmill.core.sampling import SamplingParams
from tokenmill.engine.config import CacheConfig, SchedulerConfig
from tokenmill.engine.core import EngineCore
from tokenmill.engine.executor.base import Executor, ExecutorOutput
from tokenmill.engine.loop import STEP_TIME_EWMA_ALPHA, EngineLoop
from tokenmill.engine.scheduler import Scheduler


def add(sched: Scheduler, rid: str, num_prompt_tokens: int, max_tokens: int = 8) -> None:
    params = SamplingParams(max_tokens=max_tokens)
    prompt = list(range(10, 10 + num_prompt_tokens))
    sched.add_request(EngineRequest(request_id=rid, prompt_token_ids=prompt, params=params))


def waiting_tokens(sched: Scheduler) -> int:
    sched.check_integrity()  # recounts the waiting queue
    return sched.stats().num_waiting_prefill_tokens


def test_waiting_prefill_tokens_follow_the_waiting_queue():
    sched = Scheduler(SchedulerConfig(max_num_seqs=1), CacheConfig(block_size=4, num_blocks=4))
    add(sched, "a", 7)
    add(sched, "b", 3)
    add(sched, "c", 5)
    assert waiting_tokens(sched) == 15
    out = sched.schedule()  # a is admitted (max_num_seqs=1)
    assert waiting_tokens(sched) == 8
    sched.update_from_output(out, {"a": [50]})
    sched.finish_requests(["c"], FinishReason.ABORT)  # aborted while waiting
    assert waiting_tokens(sched) == 3
    sched.finish_requests(["a"], FinishReason.STOP)
    sched.schedule()
    assert waiting_tokens(sched) == 0


def test_a_preempted_request_waits_with_its_output_tokens():
    sched = Scheduler(SchedulerConfig(), CacheConfig(block_size=4, num_blocks=4))
    add(sched, "a", 7)
    add(sched, "b", 7)
    for _ in range(2):
        out = sched.schedule()
        sched.update_from_output(out, {i.request_id: [50] for i in out.scheduled if i.samples})
    out = sched.schedule()  # a needs a 3rd block: b (7 prompt + 2 output tokens) is preempted
    assert out.preempted_request_ids == ["b"]
    assert waiting_tokens(sched) == 9


class _NoopExecutor(Executor):
    def execute(self, sched) -> ExecutorOutput:
        return ExecutorOutput(sampled={s.request_id: [50] for s in sched.scheduled if s.samples})


def test_engine_stats_report_waiting_prefill_tokens():
    scheduler = Scheduler(SchedulerConfig(), CacheConfig(block_size=4, num_blocks=8))
    core = EngineCore(scheduler, _NoopExecutor(), vocab_size=100)
    add(scheduler, "a", 6)
    assert core.stats()["num_waiting_prefill_tokens"] == 6


class _StubCore:
    """What ``EngineLoop`` reads of a core: one step per turn, ``work`` says if it computed."""

    def __init__(self, clock: list[float], step_ms: list[float], work: list[bool]):
        self.clock, self.step_ms, self.work = clock, step_ms, work
        self.num_steps = 0
        self.executor = _NoopExecutor()

    def has_pending_transfers(self) -> bool:
        return False

    def has_unfinished_requests(self) -> bool:
        return True

    def step(self) -> list:
        self.clock[0] += self.step_ms.pop(0) / 1000.0
        self.num_steps += self.work.pop(0)
        return []


def test_step_time_is_an_average_of_steps_that_computed_something():
    now = [0.0]
    core = _StubCore(now, step_ms=[10.0, 0.0, 20.0], work=[True, False, True])
    loop = EngineLoop(core, on_outputs=lambda outputs: None, clock=lambda: now[0])  # type: ignore[arg-type]
    assert loop.step_time_ms == 0.0
    loop._next_commands()
    assert loop.step_time_ms == 10.0  # the first step sets it
    loop._next_commands()  # nothing computed: the average is unchanged
    assert loop.step_time_ms == 10.0 and loop.last_step_s == 0.0
    loop._next_commands()
    assert abs(loop.step_time_ms - (10.0 + STEP_TIME_EWMA_ALPHA * 10.0)) < 1e-9
    assert abs(loop.last_step_s - 0.020) < 1e-9
