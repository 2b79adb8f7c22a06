"""The mocker: the real scheduler and block pool with a simulated executor (no torch).

Timing (Dynamo's mocker polynomial by default, so numbers compare with Dynamo's replay):

    prefill_ms(N) = 4.209989e-7 N^2 + 1.518344e-2 N + 16.50142   N = new prompt tokens in the step
    decode_ms(u)  = max(1, -25.74 u^2 + 54.01 u + 5.74)           u = used blocks / total blocks
    step_ms       = prefill_ms(N) [if N > 0] + decode_ms(u) [if the step has decode tokens]

"Used" blocks are those referenced by running requests (``SchedulerOutput.num_active_blocks``);
cached-but-free blocks do not count. A request's first token is the token sampled by the step
that completes its prefill, so one request alone has TTFT = prefill_ms(N) exactly.
``ProfileTiming`` interpolates a measured profile instead (JSON: ``{"prefill": [[N, ms], ...],
"decode": [[u, ms], ...]}``, linear between points, clamped at the ends).

Token ids come from a deterministic function of (request id, position, seed) over a
configurable vocabulary. ``tokenmill.engine.builder.build_mock_core`` assembles a mocker
``EngineCore``; the offline replay steps such cores on its virtual clock. For live use a
``StepPacer`` makes each step *end* on its simulated
deadline (``step start + step_ms / speedup_ratio``): the real CPU work of a busy engine
(scheduling, output handling, the executor itself) is absorbed inside the simulated step, as
in the offline replay, instead of being added to it.

``decode_run_length`` / ``advance_decode`` are the replay's exact shortcut over a mocker
core's scheduler: k pure-decode steps in which nothing but the token counts changes (no
allocation, no block becoming full, no finish, nobody waiting: so no KV event, no first
token, nothing the replay records) are applied to the request states directly, giving
exactly the state k ``EngineCore.step`` rounds would. They touch ``Request`` fields the scheduler owns, so they
live here, next to the one user that needs them, and are tested against stepping.
"""

from __future__ import annotations

import bisect
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import xxhash

from tokenmill.engine.executor.base import Executor, ExecutorOutput
from tokenmill.engine.scheduler import Scheduler
from tokenmill.engine.scheduler_output import SchedulerOutput

_MULT = 0x9E3779B97F4A7C15


class StepTiming(Protocol):
    def prefill_ms(self, num_tokens: int) -> float: ...

    def decode_ms(self, usage: float) -> float: ...


@dataclass(frozen=True)
class PolynomialTiming:
    """Dynamo's mocker polynomials (defaults); coefficients highest power first."""

    prefill: tuple[float, float, float] = (4.209989e-7, 1.518344e-2, 16.50142)
    decode: tuple[float, float, float] = (-25.74, 54.01, 5.74)
    min_decode_ms: float = 1.0

    def prefill_ms(self, num_tokens: int) -> float:
        a, b, c = self.prefill
        return a * num_tokens * num_tokens + b * num_tokens + c

    def decode_ms(self, usage: float) -> float:
        a, b, c = self.decode
        return max(self.min_decode_ms, a * usage * usage + b * usage + c)


class ProfileTiming:
    """Piecewise-linear interpolation over measured points (see the module docstring)."""

    def __init__(self, prefill: list[tuple[float, float]], decode: list[tuple[float, float]]):
        if not prefill or not decode:
            raise ValueError("a timing profile needs at least one prefill and one decode point")
        self._prefill = sorted(prefill)
        self._decode = sorted(decode)

    @classmethod
    def load(cls, path: str | Path) -> ProfileTiming:
        data = json.loads(Path(path).read_text())
        return cls([tuple(p) for p in data["prefill"]], [tuple(p) for p in data["decode"]])

    def prefill_ms(self, num_tokens: int) -> float:
        return _interp(self._prefill, num_tokens)

    def decode_ms(self, usage: float) -> float:
        return _interp(self._decode, usage)


def _interp(points: list[tuple[float, float]], x: float) -> float:
    i = bisect.bisect_left(points, (x, float("-inf")))
    if i == 0:
        return points[0][1]
    if i == len(points):
        return points[-1][1]
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def step_ms(
    timing: StepTiming, out: SchedulerOutput, remote_tokens: dict[str, int] | None = None
) -> float:
    """Simulated duration of one scheduled step (0 for an empty step).

    ``remote_tokens``: request id -> how many leading prompt tokens of that request were
    loaded from elsewhere (a disaggregated decode leg): they are not computed, and the one
    token computed right after them (the recomputed tail whose logits give the next token)
    is priced as a decode token, as an engine batches it with the decodes."""
    num_prefill, num_decode = out.num_prefill_tokens, out.num_decode_tokens
    if remote_tokens and num_prefill:
        free, tails = remote_token_counts(out, remote_tokens)
        num_prefill -= free + tails
        num_decode += tails
    ms = timing.prefill_ms(num_prefill) if num_prefill else 0.0
    if num_decode:
        ms += timing.decode_ms(out.num_active_blocks / out.num_total_blocks)
    return ms


def remote_token_counts(out: SchedulerOutput, remote_tokens: dict[str, int]) -> tuple[int, int]:
    """``(tokens loaded remotely, 1-token tails after them)`` among the step's scheduled
    chunks (see ``step_ms``)."""
    free = tails = 0
    for s in out.scheduled:
        loaded = remote_tokens.get(s.request.request_id)
        if loaded is None:
            continue
        start, end = s.position, s.position + s.num_tokens
        if start < loaded:
            free += min(end, loaded) - start
        if end - max(start, loaded) == 1 and s.samples and end == loaded + 1:
            tails += 1
    return free, tails


class TokenSource:
    """Deterministic token ids in ``[0, vocab_size)``: ``(key(request id) + position * M) mod
    vocab_size``, with the key an XXH3 of the request id and M an odd 64-bit constant. Cheap
    on purpose: the replay draws millions of them."""

    def __init__(self, vocab_size: int = 32_000, seed: int = 0):
        self.vocab_size = vocab_size
        self.seed = seed
        self._keys: dict[str, int] = {}

    def _key(self, request_id: str) -> int:
        key = self._keys.get(request_id)
        if key is None:
            key = self._keys[request_id] = xxhash.xxh3_64_intdigest(
                request_id.encode(), seed=self.seed
            )
        return key

    def token(self, request_id: str, position: int) -> int:
        return (self._key(request_id) + position * _MULT) % self.vocab_size

    def tokens(self, request_id: str, start: int, stop: int) -> list[int]:
        """``[token(request_id, p) for p in range(start, stop)]``."""
        key, vocab = self._key(request_id), self.vocab_size
        return [(key + p * _MULT) % vocab for p in range(start, stop)]

    def release(self, request_ids: Iterable[str]) -> None:
        for rid in request_ids:
            self._keys.pop(rid, None)


MAX_LAG_S = 0.025  # wall time a live mocker may make up after steps that overran


class StepPacer:
    """Wall-clock pacing of live mocker steps: each step ends at its deadline
    ``start + step_ms / 1000 / speedup_ratio`` (seconds of ``clock``), where ``start`` is

    - the previous step's deadline while the engine is continuously busy, so the real work
      between two steps is part of the simulated step, not added to it;
    - the wake-up time (``on_wake``) when the engine loop was idle before this step;
    - "now" for the first step ever (no wake-up seen, e.g. a core stepped by hand).

    A step whose real work overran its deadline does not sleep. The schedule may then run
    behind the clock, but by at most ``max_lag_s``: ``start`` is never earlier than
    ``now - max_lag_s``, so a stall (GC, CPU contention) longer than that is lost, not made up
    later by a burst of steps that do not sleep. ``clock`` and ``sleep`` are injectable.
    ``num_steps``, ``num_late`` (steps that found their deadline passed) and ``late_s`` (by how
    much, summed) tell how well the host kept up.
    """

    def __init__(
        self,
        speedup_ratio: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        max_lag_s: float = MAX_LAG_S,
    ):
        if speedup_ratio <= 0:
            raise ValueError("speedup_ratio must be positive")
        self.speedup_ratio = speedup_ratio
        self.max_lag_s = max_lag_s
        self._clock = clock
        self._sleep = sleep
        self._deadline: float | None = None  # where the next step starts
        self.num_steps = self.num_late = 0
        self.late_s = 0.0

    def on_wake(self) -> None:
        """The engine was idle and has work again: the next step starts now."""
        self._deadline = self._clock()

    def pace(self, step_ms: float) -> None:
        """Sleeps until the end of a step of ``step_ms`` simulated milliseconds."""
        now = self._clock()
        start = now if self._deadline is None else max(self._deadline, now - self.max_lag_s)
        self._deadline = start + step_ms / 1000.0 / self.speedup_ratio
        self.num_steps += 1
        if self._deadline > now:
            self._sleep(self._deadline - now)
        else:
            self.num_late += 1
            self.late_s += now - self._deadline


class MockExecutor(Executor):
    """Simulated executor: samples ``TokenSource`` tokens and prices the step with ``timing``.

    ``pacer`` None: no sleeping (the offline replay reads ``last_step_ms``, the simulated
    duration of the last executed step, and advances its virtual clock by it); otherwise each
    ``execute`` ends on the step's deadline (``StepPacer``). Requests that finished since the
    previous step (``finished_request_ids``) are released from the token source.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        timing: StepTiming | None = None,
        tokens: TokenSource | None = None,
        pacer: StepPacer | None = None,
    ):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.timing = timing or PolynomialTiming()
        self.tokens = tokens or TokenSource()
        self.pacer = pacer
        self.last_step_ms = 0.0
        # request id -> leading prompt tokens loaded from elsewhere (see ``step_ms``)
        self.remote_tokens: dict[str, int] = {}

    def sample(self, out: SchedulerOutput) -> dict[str, list[int]]:
        token = self.tokens.token
        return {
            s.request.request_id: [token(s.request.request_id, s.position + s.num_tokens)]
            for s in out.scheduled
            if s.samples
        }

    def execute(self, scheduler_output: SchedulerOutput) -> ExecutorOutput:
        self.release(scheduler_output.finished_request_ids)
        self.last_step_ms = step_ms(self.timing, scheduler_output, self.remote_tokens)
        if self.pacer is not None:
            self.pacer.pace(self.last_step_ms)
        return ExecutorOutput(sampled=self.sample(scheduler_output))

    def on_wake(self) -> None:
        if self.pacer is not None:
            self.pacer.on_wake()

    def release(self, request_ids: Iterable[str]) -> None:
        request_ids = list(request_ids)
        self.tokens.release(request_ids)
        if self.remote_tokens:
            for rid in request_ids:
                self.remote_tokens.pop(rid, None)


# ---- fast-forward over pure-decode steps (offline replay) --------------------------------
def decode_run_length(scheduler: Scheduler) -> int:
    """How many next steps are pure decode with nothing but token counts changing: every
    running request decodes, nobody waits, no block is allocated or becomes full, no request
    finishes (only max_tokens / max_model_len can end one: 0 if any could stop on a token)."""
    if len(scheduler.waiting) or not scheduler.running:
        return 0
    if len(scheduler.running) > scheduler.config.max_num_batched_tokens:
        return 0
    size = scheduler.block_size
    eos = bool(scheduler.eos_token_ids)
    get_table = scheduler.kv.get_block_ids
    best = 1 << 62
    for r in scheduler.running:
        computed = r.num_computed_tokens
        if r.num_tokens - computed != 1 or computed < r.num_prompt_tokens:
            return 0
        params = r.params
        if params.stop_token_ids or (eos and not params.ignore_eos):
            return 0
        best = min(
            best,
            len(get_table(r.request_id)) * size - computed,  # no allocation
            (size - (computed + 1) % size) % size,  # no block becomes full
            r.max_tokens - len(r.output_token_ids) - 1,  # no finish by length
            scheduler.max_model_len - r.num_tokens - 1,
        )
    return max(best, 0)


def advance_decode(scheduler: Scheduler, tokens: TokenSource, num_steps: int) -> None:
    """Apply ``num_steps`` (<= ``decode_run_length``) decode steps to the running requests:
    the same tokens, counts and block hashes as ``num_steps`` real steps. Tokens are appended
    in bulk; the one that completes a block (at most one per run) goes through
    ``append_output_token`` so the request hashes that block as it would have."""
    size = scheduler.block_size
    for r in scheduler.running:
        start = r.num_computed_tokens + 1  # all_token_ids index of the first new token
        new = tokens.tokens(r.request_id, start, start + num_steps)
        boundary = -(start + 1) % size  # appending new[boundary] makes len % size == 0
        head = new[:boundary] if boundary < num_steps else new
        r.output_token_ids.extend(head)
        r.all_token_ids.extend(head)
        if boundary < num_steps:
            r.append_output_token(new[boundary])
            rest = new[boundary + 1 :]
            r.output_token_ids.extend(rest)
            r.all_token_ids.extend(rest)
        r.num_computed_tokens += num_steps
