"""Offline replay: router + N mocker workers on a virtual clock (discrete events, no I/O).

Each worker is a mocker ``EngineCore`` (``engine.builder.build_mock_core``: the real scheduler
and block pool, ``MockExecutor`` without a pacer, the virtual clock), stepped by the same
``EngineCore.step`` the live engine runs, split at its two halves:

- step start event: ``core.begin_step()`` schedules and executes (the pool emits ``Removed``
  for blocks it evicts to allocate); the step's completion is queued ``executor.last_step_ms``
  (its simulated duration) later;
- step completion event: ``core.finish_step(step)`` applies the results (``Stored`` for blocks
  that became full) and returns ``RequestOutput``s: the first output of a request is its
  first token, the one with ``finish_reason`` its finish.

Requests enter through ``core.add_request`` (validated as live ones are), with the prompt's
block hashes from ``TraceTokens`` so the engine does not hash the prompt again. KV events
reach the router's indexer the moment the pool emits them. The router is the production
``KvRouter`` with a clock that reads the virtual time.

Events at equal times run in this order: step completions, then arrivals, then step starts,
so a request arriving exactly when a step ends is in the next step. A worker idles when its
core has nothing to run and wakes on the next request routed to it.

Fast-forward (``fast_forward=True``): when a worker's next steps are pure decode with nothing
but token counts changing (``mocker.decode_run_length``: no KV event, no first token, no
finish), the run of steps up to the next arrival is applied to the core's scheduler at once
(``mocker.advance_decode``); step end times are accumulated step by step with the same float
additions, so the timeline is identical to stepping one at a time (tested).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

from tokenmill.core.events import EventNumberer, KvEvent
from tokenmill.core.request import EngineRequest, RequestOutput
from tokenmill.core.sampling import SamplingParams
from tokenmill.engine.builder import build_mock_core
from tokenmill.engine.config import CacheConfig, SchedulerConfig
from tokenmill.engine.core import InflightStep
from tokenmill.engine.mocker import (
    MockExecutor,
    PolynomialTiming,
    StepTiming,
    advance_decode,
    decode_run_length,
)
from tokenmill.router.router import KvRouter, Queued, Routed, RouterConfig
from tokenmill.sim.report import RequestRecord, build_report
from tokenmill.sim.trace import TraceRequest, TraceTokens

_COMPLETE, _ARRIVAL, _START, _CONTROL = 0, 1, 2, 3


@dataclass(frozen=True)
class ReplayConfig:
    """Defaults equal Dynamo's offline replay anchor (shared/anchors/dynamo)."""

    num_workers: int = 8
    block_size: int = 64
    trace_block_size: int = 512
    num_blocks: int = 16_384  # per worker
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8_192
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    watermark: float = 0.01  # Dynamo's mocker keeps 1% free at admission
    # Token ids of trace prompts and mock outputs. 256 on purpose: CPython shares the int
    # objects below 257, so million-token prompt lists cost no allocations (3.5x faster
    # trace expansion); 64 tokens of 8 bits still make block hashes collision-free.
    vocab_size: int = 256
    seed: int = 0
    fast_forward: bool = True
    sla_ttft_ms: float = 2_000.0
    sla_itl_ms: float = 25.0
    router: RouterConfig = field(default_factory=RouterConfig)


class _Worker:
    """One simulated replica: a mocker ``EngineCore`` and where its step loop stands."""

    def __init__(self, worker_id: int, cfg: ReplayConfig, publish, timing: StepTiming, clock):
        sched_cfg = SchedulerConfig(
            max_num_seqs=cfg.max_num_seqs,
            max_num_batched_tokens=cfg.max_num_batched_tokens,
            max_model_len=cfg.num_blocks * cfg.block_size,
            enable_chunked_prefill=cfg.enable_chunked_prefill,
            enable_prefix_caching=cfg.enable_prefix_caching,
            watermark=cfg.watermark,
        )
        cache_cfg = CacheConfig(block_size=cfg.block_size, num_blocks=cfg.num_blocks)
        self.core = build_mock_core(
            cache_cfg,
            sched_cfg,
            timing=timing,
            vocab_size=cfg.vocab_size,
            seed=cfg.seed,
            event_sink=EventNumberer(worker_id, publish),
            clock=clock,
        )
        self.executor: MockExecutor = self.core.executor
        self.busy = False  # a step start or completion event is in the heap
        self.num_ff_steps = 0


class Replay:
    """One run over ``requests`` (sorted by arrival). ``run()`` returns the report dict."""

    def __init__(
        self, cfg: ReplayConfig, requests: list[TraceRequest], timing: StepTiming | None = None
    ):
        self.cfg = cfg
        self.requests = sorted(requests, key=lambda r: r.arrival_ms)
        self.now = 0.0  # virtual ms
        self.router = KvRouter(cfg.router, clock=self._clock_s)
        self.timing = timing or PolynomialTiming()
        clock = self._clock_s
        self.workers = [
            _Worker(w, cfg, self._publish, self.timing, clock) for w in range(cfg.num_workers)
        ]
        for w in range(cfg.num_workers):
            self.router.add_worker(w)
        self.tokens = TraceTokens(cfg.trace_block_size, cfg.block_size, cfg.vocab_size)
        self.records: dict[str, RequestRecord] = {}
        self.num_event_gaps = 0
        self._heap: list[tuple[float, int, int, int, object]] = []
        self._seq = 0
        self._next = 0  # index of the next arrival

    # ---- event plumbing ------------------------------------------------------------------
    def _clock_s(self) -> float:
        return self.now / 1000.0

    def _publish(self, event: KvEvent) -> None:
        if self.router.apply_event(event) is not None:
            self.num_event_gaps += 1

    def _push(self, t: float, kind: int, worker: int, payload: object = None) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, kind, self._seq, worker, payload))

    def _next_arrival_ms(self) -> float:
        return self.requests[self._next].arrival_ms if self._next < len(self.requests) else math.inf

    def run(self) -> dict:
        heap = self._heap
        while heap or self._next < len(self.requests):
            t_arr = self._next_arrival_ms()
            if heap and (heap[0][0], heap[0][1]) < (t_arr, _ARRIVAL):
                t, kind, _, w, payload = heapq.heappop(heap)
                self.now = t
                if kind == _COMPLETE:
                    self._complete(w, payload)
                elif kind == _START:
                    self._start(w)
                else:
                    payload()  # a control event (``sim.cluster``: planner ticks, workers up)
            else:
                self.now = t_arr
                self._arrive(self.requests[self._next])
                self._next += 1
        return self.report()

    # ---- handlers ------------------------------------------------------------------------
    def _arrive(self, req: TraceRequest) -> None:
        prompt = self.tokens.prompt_blocks(req)
        tokens, hashes, _ = prompt
        rec = RequestRecord(req.request_id, self.now, req.input_length, req.output_length)
        self.records[req.request_id] = rec
        decision = self.router.route(req.request_id, hashes, len(tokens))
        if isinstance(decision, Routed):
            self._dispatch(decision, prompt, rec)
        elif isinstance(decision, Queued):
            rec.pending_prompt = prompt
        else:
            rec.shed = True

    def _dispatch(self, decision: Routed, prompt: tuple, rec: RequestRecord) -> None:
        """``prompt``: ``TraceTokens.prompt_blocks``; the engine takes the hashes as they are."""
        tokens, hashes, local = prompt
        rec.worker = decision.worker_id
        params = SamplingParams(max_tokens=rec.output_length, ignore_eos=True)
        request = EngineRequest(
            request_id=rec.request_id,
            prompt_token_ids=tokens,
            params=params,
            arrival_time=self.now / 1000.0,
        )
        worker = self.workers[decision.worker_id]
        worker.core.add_request(request, (hashes, local))
        if not worker.busy:
            worker.busy = True
            self._push(self.now, _START, decision.worker_id)

    def _start(self, w: int) -> None:
        """A step starts: ``begin_step`` now (allocation: ``Removed`` events), its completion
        ``last_step_ms`` later; or a fast-forwarded run of decode steps; or the worker idles."""
        worker = self.workers[w]
        if self.cfg.fast_forward and self.cfg.router.queue.busy_prefill_tokens is None:
            k = decode_run_length(worker.core.scheduler)
            if k > 1:
                self._fast_forward(w, worker, k)
                return
        step = worker.core.begin_step()
        if step is None:
            worker.busy = False
            return
        self._push(self.now + worker.executor.last_step_ms, _COMPLETE, w, step)

    def _fast_forward(self, w: int, worker: _Worker, k: int) -> None:
        """Up to ``k`` decode steps, ending at the first step end at or after the next arrival
        (so a request arriving mid-run joins where it would have joined stepping)."""
        sched = worker.core.scheduler
        dt = self.timing.decode_ms(sched.kv.num_used_blocks / sched.kv.num_blocks)
        t_arr = self._next_arrival_ms()
        t, steps = self.now, 0
        while steps < k and t < t_arr:
            t += dt  # one addition per step: the same floats as stepping
            steps += 1
        advance_decode(sched, worker.executor.tokens, steps)
        worker.num_ff_steps += steps
        self._push(t, _COMPLETE, w, None)

    def _complete(self, w: int, step: InflightStep | None) -> None:
        """A step ends: ``finish_step`` (``Stored`` events), records, router queue, next step."""
        worker = self.workers[w]
        if step is not None:
            for out in worker.core.finish_step(step):
                self._on_output(out)
            for decision in self.router.drain():
                rec = self.records[decision.request_id]
                rec.queued_ms = decision.queued_s * 1000.0
                prompt, rec.pending_prompt = rec.pending_prompt, None
                self._dispatch(decision, prompt, rec)
        if worker.core.has_unfinished_requests():
            self._push(self.now, _START, w)
        else:
            worker.busy = False

    def _on_output(self, out: RequestOutput) -> None:
        rid = out.request_id
        rec = self.records[rid]
        if rec.first_token_ms < 0:
            rec.first_token_ms = self.now
            self.router.mark_prefill_done(rid)
        if out.finish_reason is not None:
            rec.finish_ms = self.now
            rec.num_output_tokens = out.num_output_tokens
            rec.num_cached_tokens = out.num_cached_tokens
            self.router.mark_finished(rid)

    def report(self) -> dict:
        stats = [w.core.scheduler.stats() for w in self.workers]
        extra = {
            "num_steps": sum(w.core.num_steps + w.num_ff_steps for w in self.workers),
            "num_fast_forward_steps": sum(w.num_ff_steps for w in self.workers),
            "num_event_gaps": self.num_event_gaps,
        }
        return build_report(self.cfg, list(self.records.values()), stats, extra)
