"""``tokenmill profile``: measure one worker's timing into a ``TimingProfile``
(``core.timing_profile``: the JSON the planner and ``--timing-profile`` read).

The worker is an ``EngineCore`` stepped here, alone: a real engine (step times are wall
time) or the mocker (step times are its simulated ``last_step_ms``, so the profile of the
mocker is exact and machine independent). Two sweeps:

- prefill: for each input length and prefix-hit level, a request whose first
  ``hit * length`` tokens (whole blocks) were prefilled by an earlier request sharing them;
  the time from its first step to its first token (all its prefill steps);
- decode: for each batch size and context length that fit the KV pool, that many requests
  with prompts of the context length are prefilled, then ``decode_steps`` pure decode steps
  are timed; the ITL is their mean, ``kv_usage`` the pool share the batch holds.

Prompts are distinct token ids per request (no accidental prefix sharing) except the shared
prefix of the hit levels.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tokenmill.core.request import EngineRequest
from tokenmill.core.sampling import SamplingParams
from tokenmill.core.timing_profile import DecodePoint, PrefillPoint, TimingProfile
from tokenmill.engine.core import EngineCore


@dataclass(frozen=True)
class ProfileConfig:
    input_lengths: Sequence[int] = (128, 512, 1024, 2048, 4096, 8192, 16384, 32768)
    prefix_hits: Sequence[float] = (0.0, 0.5, 0.9)
    batch_sizes: Sequence[int] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    context_lengths: Sequence[int] = (256, 1024, 4096, 8192, 16384)
    decode_steps: int = 8


class _Prompts:
    """Distinct prompts: request k's tokens are ``(k * 7919 + i) % (vocab - 1) + 1``."""

    def __init__(self, vocab_size: int):
        self.vocab, self.k = vocab_size, 0

    def make(self, n: int, prefix: list[int] | None = None) -> list[int]:
        self.k += 1
        head = list(prefix or [])
        v = self.vocab - 1
        return head + [(self.k * 7919 + i * 31) % v + 1 for i in range(n - len(head))]


class Profiler:
    """Measures ``core``. ``simulated_ms`` (the mocker's ``last_step_ms``) prices the step just
    run; None: the step's wall time. A warm-up request runs first (not measured: the first
    forward pass of a real engine pays one-off initialisation)."""

    def __init__(
        self, core: EngineCore, engine: str, simulated_ms: Callable[[], float] | None = None
    ):
        self.core, self.engine, self._simulated = core, engine, simulated_ms
        sched = core.scheduler
        self.block_size, self.num_blocks = sched.block_size, sched.kv.num_blocks
        self.prompts = _Prompts(core.vocab_size)
        self._n = 0

    def _add(self, prompt: list[int], max_tokens: int) -> str:
        self._n += 1
        rid = f"profile-{self._n}"
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        self.core.add_request(EngineRequest(request_id=rid, prompt_token_ids=prompt, params=params))
        return rid

    def _step(self) -> tuple[list, float]:
        """One engine step: its outputs and its time (ms)."""
        t0 = time.perf_counter()
        outs = self.core.step()
        wall_ms = (time.perf_counter() - t0) * 1e3
        return outs, wall_ms if self._simulated is None else self._simulated()

    def _run(self, until: Callable[[list], bool]) -> float:
        """Steps until ``until(outputs of the step)``; returns the summed step time (ms)."""
        total = 0.0
        while self.core.has_unfinished_requests():
            outs, ms = self._step()
            total += ms
            if until(outs):
                break
        return total

    def _drain(self) -> None:
        while self.core.has_unfinished_requests():
            self.core.step()

    def prefill_point(self, length: int, hit: float) -> PrefillPoint:
        cached = int(length * hit) // self.block_size * self.block_size
        prefix = self.prompts.make(cached) if cached else []
        if cached:
            self._add(prefix + self.prompts.make(self.block_size), 1)
            self._drain()
        self._add(self.prompts.make(length, prefix), 1)
        ms = self._run(lambda outs: any(o.num_output_tokens >= 1 for o in outs))
        self._drain()
        return PrefillPoint(length, round(cached / length, 4), round(ms, 4))

    def decode_point(self, batch: int, context: int, steps: int) -> DecodePoint:
        chunk = self.core.scheduler.config.max_num_batched_tokens
        # long enough that the first request still decodes when the last one is prefilled
        max_tokens = steps + 2 + batch + -(-batch * context // chunk)
        ids = [self._add(self.prompts.make(context), max_tokens) for _ in range(batch)]
        started: set[str] = set()

        def all_started(outs: list) -> bool:
            started.update(o.request_id for o in outs if o.num_output_tokens >= 1)
            return len(started) == len(ids)

        self._run(all_started)
        kv = self.core.scheduler.kv
        total = usage = 0.0
        for _ in range(steps):
            total += self._step()[1]
            usage += kv.num_used_blocks / kv.num_blocks / steps  # as the step was priced
        self.core.abort_requests(ids)
        self._drain()
        return DecodePoint(batch, context, round(total / steps, 4), round(usage, 6))

    def run(self, cfg: ProfileConfig, log: Callable[[str], None] = lambda s: None) -> TimingProfile:
        sched_cfg = self.core.scheduler.config
        max_len = min(sched_cfg.max_model_len, self.num_blocks * self.block_size)
        self._add(self.prompts.make(min(64, max_len - 4)), 4)  # warm-up
        self._drain()
        prefill = []
        for length in (n for n in cfg.input_lengths if n + 1 < max_len):
            for hit in cfg.prefix_hits:
                prefill.append(self.prefill_point(length, hit))
                log(f"prefill {length} tokens, hit {hit}: {prefill[-1].ms:.2f} ms")
        decode = []
        capacity = self.num_blocks * self.block_size
        chunk = sched_cfg.max_num_batched_tokens
        for batch in (b for b in cfg.batch_sizes if b <= sched_cfg.max_num_seqs):
            for context in cfg.context_lengths:
                steps = cfg.decode_steps + 2 + batch + -(-batch * context // chunk)
                need = batch * (context + steps + self.block_size)
                if need > capacity or context + steps > max_len:
                    continue
                decode.append(self.decode_point(batch, context, cfg.decode_steps))
                log(f"decode batch {batch} context {context}: {decode[-1].itl_ms:.3f} ms")
        self.core.check_integrity()
        return TimingProfile(
            engine=self.engine,
            block_size=self.block_size,
            num_blocks=self.num_blocks,
            max_num_batched_tokens=sched_cfg.max_num_batched_tokens,
            max_num_seqs=sched_cfg.max_num_seqs,
            prefill=prefill,
            decode=decode,
        )
