"""Offline replay: router + N mocker workers on a virtual clock (discrete events, no I/O).

Each worker is the real ``Scheduler`` (with its block pool) priced by the mocker's timing;
its KV events reach the router's indexer the moment the pool emits them (``Removed`` when a
step allocates, ``Stored`` when a step's results are applied). The router is the production
``KvRouter`` with a clock that reads the virtual time.

Events at equal times run in this order: step completions, then arrivals, then step starts,
so a request arriving exactly when a step ends is in the next step. A worker idles when its
scheduler has nothing to run and wakes on the next request routed to it.

Fast-forward (``fast_forward=True``): when a worker's next steps are pure decode with nothing
but token counts changing (``mocker.decode_run_length``), the run of steps up to the next
arrival is applied at once; step end times are accumulated step by step with the same float
additions, so the timeline is identical to stepping one at a time (tested).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

from tokenmill.core.events import EventNumberer, KvEvent
from tokenmill.core.request import EngineRequest
from tokenmill.core.sampling import SamplingParams
from tokenmill.engine.config import CacheConfig, SchedulerConfig
from tokenmill.engine.mocker import (
    MockExecutor,
    PolynomialTiming,
    StepTiming,
    TokenSource,
    advance_decode,
    decode_run_length,
    step_ms,
)
from tokenmill.engine.scheduler import Scheduler
from tokenmill.router.router import KvRouter, Queued, Routed, RouterConfig
from tokenmill.sim.report import RequestRecord, build_report
from tokenmill.sim.trace import TraceRequest, TraceTokens

_COMPLETE, _ARRIVAL, _START = 0, 1, 2


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
    def __init__(self, worker_id: int, cfg: ReplayConfig, publish, timing: StepTiming):
        sched_cfg = SchedulerConfig(
            max_num_seqs=cfg.max_num_seqs,
            max_num_batched_tokens=cfg.max_num_batched_tokens,
            max_model_len=cfg.num_blocks * cfg.block_size,
            enable_chunked_prefill=cfg.enable_chunked_prefill,
            enable_prefix_caching=cfg.enable_prefix_caching,
            watermark=cfg.watermark,
        )
        cache_cfg = CacheConfig(block_size=cfg.block_size, num_blocks=cfg.num_blocks)
        self.scheduler = Scheduler(sched_cfg, cache_cfg, (), EventNumberer(worker_id, publish))
        tokens = TokenSource(cfg.vocab_size, cfg.seed)
        self.executor = MockExecutor(cfg.num_blocks, cfg.block_size, timing, tokens)
        self.busy = False
        self.num_steps = 0
        self.num_ff_steps = 0


class Replay:
    """One run over ``requests`` (sorted by arrival). ``run()`` returns the report dict."""

    def __init__(
        self, cfg: ReplayConfig, requests: list[TraceRequest], timing: StepTiming | None = None
    ):
        self.cfg = cfg
        self.requests = sorted(requests, key=lambda r: r.arrival_ms)
        self.now = 0.0  # virtual ms
        self.router = KvRouter(cfg.router, clock=lambda: self.now / 1000.0)
        self.timing = timing or PolynomialTiming()
        self.workers = [_Worker(w, cfg, self._publish, self.timing) for w in range(cfg.num_workers)]
        for w in range(cfg.num_workers):
            self.router.add_worker(w)
        self.tokens = TraceTokens(cfg.trace_block_size, cfg.block_size, cfg.vocab_size)
        self.records: dict[str, RequestRecord] = {}
        self.num_event_gaps = 0
        self._heap: list[tuple[float, int, int, int, object]] = []
        self._seq = 0
        self._next = 0  # index of the next arrival

    # ---- event plumbing ------------------------------------------------------------------
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
                else:
                    self._start(w)
            else:
                self.now = t_arr
                self._arrive(self.requests[self._next])
                self._next += 1
        return self.report()

    # ---- handlers ------------------------------------------------------------------------
    def _arrive(self, req: TraceRequest) -> None:
        tokens, hashes = self.tokens.prompt(req)
        rec = RequestRecord(req.request_id, self.now, req.input_length, req.output_length)
        self.records[req.request_id] = rec
        decision = self.router.route(req.request_id, hashes, len(tokens))
        if isinstance(decision, Routed):
            self._dispatch(decision, tokens, rec)
        elif isinstance(decision, Queued):
            rec.pending_tokens = tokens
        else:
            rec.shed = True

    def _dispatch(self, decision: Routed, tokens: list[int], rec: RequestRecord) -> None:
        rec.worker = decision.worker_id
        params = SamplingParams(max_tokens=rec.output_length, ignore_eos=True)
        request = EngineRequest(request_id=rec.request_id, prompt_token_ids=tokens, params=params)
        worker = self.workers[decision.worker_id]
        worker.scheduler.add_request(request)
        if not worker.busy:
            worker.busy = True
            self._push(self.now, _START, decision.worker_id)

    def _start(self, w: int) -> None:
        worker = self.workers[w]
        sched = worker.scheduler
        if self.cfg.fast_forward and self.cfg.router.queue.busy_prefill_tokens is None:
            k = decode_run_length(sched)
            if k > 1:
                self._fast_forward(w, worker, k)
                return
        out = sched.schedule()
        if out.is_empty:
            worker.busy = False
            return
        worker.num_steps += 1
        sampled = worker.executor.sample(out)
        self._push(self.now + step_ms(self.timing, out), _COMPLETE, w, (out, sampled))

    def _fast_forward(self, w: int, worker: _Worker, k: int) -> None:
        sched = worker.scheduler
        dt = self.timing.decode_ms(sched.kv.num_used_blocks / sched.kv.num_blocks)
        t_arr = self._next_arrival_ms()
        t, steps = self.now, 0
        while steps < k and t < t_arr:
            t += dt
            steps += 1
        advance_decode(sched, worker.executor.tokens, steps)
        worker.num_steps += steps
        worker.num_ff_steps += steps
        self._push(t, _COMPLETE, w, None)

    def _complete(self, w: int, payload: object) -> None:
        worker = self.workers[w]
        if payload is not None:
            out, sampled = payload
            for update in worker.scheduler.update_from_output(out, sampled):
                self._on_update(worker, update)
            for decision in self.router.drain():
                rec = self.records[decision.request_id]
                rec.queued_ms = decision.queued_s * 1000.0
                tokens, rec.pending_tokens = rec.pending_tokens, None
                self._dispatch(decision, tokens, rec)
        if worker.scheduler.has_unfinished_requests():
            self._push(self.now, _START, w)
        else:
            worker.busy = False

    def _on_update(self, worker: _Worker, update) -> None:
        rid = update.request_id
        rec = self.records[rid]
        if rec.first_token_ms < 0:
            rec.first_token_ms = self.now
            self.router.mark_prefill_done(rid)
        if update.finished:
            rec.finish_ms = self.now
            rec.num_output_tokens = update.num_output_tokens
            rec.num_cached_tokens = update.num_cached_tokens
            self.router.mark_finished(rid)
            worker.executor.release((rid,))

    def report(self) -> dict:
        stats = [w.scheduler.stats() for w in self.workers]
        extra = {
            "num_steps": sum(w.num_steps for w in self.workers),
            "num_fast_forward_steps": sum(w.num_ff_steps for w in self.workers),
            "num_event_gaps": self.num_event_gaps,
        }
        return build_report(self.cfg, list(self.records.values()), stats, extra)
