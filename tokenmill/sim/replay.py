"""Offline replay: routers + pools of mocker workers on a virtual clock (discrete events, no I/O).

Each worker is a mocker ``EngineCore`` (``engine.builder.build_mock_core``: the real scheduler
and block pool, ``MockExecutor`` without a pacer, the virtual clock), stepped by the same
``EngineCore.step`` the live engine runs, split at its two halves:

- step start event: ``core.begin_step()`` schedules and executes (the pool emits ``Removed``
  for blocks it evicts to allocate); the step's completion is queued ``executor.last_step_ms``
  (its simulated duration) later;
- step completion event: ``core.finish_step(step)`` applies the results (``Stored`` for blocks
  that became full) and returns ``RequestOutput``s: the first output of a request is its
  first token, the one with ``finish_reason`` its finish.

Pools. Workers live in pools (``Pool``), one per role, each behind its own production
``KvRouter`` (clock: the virtual time) fed by the KV events of its own workers:

- aggregated (``num_prefill_workers == num_decode_workers == 0``): one ``both`` pool of
  ``num_workers``; a request is routed and served there (the replay as it always was);
- a P/D split: a ``prefill`` pool and a ``decode`` pool. ``control="tokenmill"`` runs the live
  frontend's flow: the decode worker is picked first (KV-aware), ``router.disagg.decide``
  says whether to prefill remotely (on a prefill worker picked KV-aware in its pool) or
  locally on the decode worker. A remote prefill computes the prompt and the first token,
  which reaches the client at once; its blocks stay held on the prefill worker while the KV
  moves (``sim.transfer``: bytes from the model shape, bandwidth, latency, link); then the
  decode worker takes the prompt plus that token and decodes the rest. ``control="dynamo"``
  reproduces Dynamo 1.6's replay: every request prefills on the prefill pool (KV-aware, no
  decode term), the decode worker is picked at the hand-off by decode load alone, it decodes
  every output token, and TTFT is its first one (prefill + transfer + one decode step).

The decode side of a remote prefill: the decode worker's request names its remotely
loaded prompt tokens to the mocker (``MockExecutor.remote_tokens``), which prices them as
not computed and the one recomputed tail token as a decode token.

Planner seams (stable): ``add_worker(role, delay_ms)`` creates a worker that joins its
pool's routing after a start-up delay; ``remove_worker(worker_id)`` takes it out of routing
at once and lets it drain: it leaves (``on_worker_left``) once it has no request and holds no
block; ``call_at(t_ms, fn)`` runs ``fn(replay)`` at a virtual time (a planner tick).

Requests enter through ``core.add_request`` (validated as live ones are), with the prompt's
block hashes from ``TraceTokens`` so the engine does not hash the prompt again. KV events
reach the pool router's indexer the moment the pool emits them.

Events at equal times run in this order: step completions, transfer completions, timers,
then arrivals, then step starts, so a request arriving exactly when a step ends is in the
next step. A worker idles when its core has nothing to run and wakes on the next request.

Fast-forward (``fast_forward=True``): when a worker's next steps are pure decode with nothing
but token counts changing (``mocker.decode_run_length``: no KV event, no first token, no
finish), the run of steps up to the next event that could touch it (an arrival, a transfer,
a timer) is applied to the core's scheduler at once (``mocker.advance_decode``); step end
times are accumulated step by step with the same float additions, so the timeline is
identical to stepping one at a time (tested).
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

from tokenmill.core.block_hash import chain_hashes, local_block_hashes
from tokenmill.core.events import EventNumberer, KvEvent
from tokenmill.core.kv_transfer import KvTransferParams
from tokenmill.core.request import EngineRequest, RequestOutput
from tokenmill.core.sampling import SamplingParams
from tokenmill.engine.builder import build_mock_core
from tokenmill.engine.config import CacheConfig, SchedulerConfig
from tokenmill.engine.core import InflightStep
from tokenmill.engine.mocker import (
    MockExecutor,
    MockPdConnector,
    MockWorkerConnector,
    PolynomialTiming,
    StepTiming,
    advance_decode,
    decode_run_length,
)
from tokenmill.kv.connector import NULL_CONNECTOR, KvLoad, SchedulerConnector
from tokenmill.router.disagg import DecodeLoad, DisaggConfig, PrefillPool, Reason, decide
from tokenmill.router.policy import PolicyConfig
from tokenmill.router.router import KvRouter, Queued, Routed, RouterConfig
from tokenmill.sim.report import GapStats, RequestRecord, build_report, disagg_report
from tokenmill.sim.trace import TraceRequest, TraceTokens
from tokenmill.sim.transfer import TransferConfig, TransferLinks

_COMPLETE, _TRANSFER, _TIMER, _ARRIVAL, _START = 0, 1, 2, 3, 4
CONTROLS = ("tokenmill", "dynamo")


class Role(StrEnum):
    BOTH = "both"
    PREFILL = "prefill"
    DECODE = "decode"


def dynamo_prefill_router(cfg: RouterConfig) -> RouterConfig:
    """Dynamo's prefill-pool router: KV overlap and queued prefill, no decode-load term
    (``router_track_active_blocks=false``)."""
    policy = PolicyConfig(prefill_load_scale=1.0, decode_weight=0.0, lower_tier_credit=0.0)
    return RouterConfig(mode="kv", block_size=cfg.block_size, policy=policy, seed=cfg.seed)


def dynamo_decode_router(cfg: RouterConfig) -> RouterConfig:
    """Dynamo's decode-pool router: decode load only (``overlap_score_weight=0``, no
    prefill-token tracking)."""
    policy = PolicyConfig(prefill_load_scale=0.0, decode_weight=1.0, lower_tier_credit=0.0)
    return RouterConfig(mode="kv", block_size=cfg.block_size, policy=policy, seed=cfg.seed + 1)


@dataclass(frozen=True)
class ReplayConfig:
    """Defaults equal Dynamo's offline replay anchor (shared/anchors/dynamo). A split
    (``num_prefill_workers`` or ``num_decode_workers`` > 0) ignores ``num_workers``."""

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
    # ---- P/D split
    num_prefill_workers: int = 0
    num_decode_workers: int = 0
    control: str = "tokenmill"
    disagg: DisaggConfig = field(default_factory=DisaggConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    # prefill workers' queue: "fcfs", or "spf" (shortest prefill first: fewest tokens left
    # after the prefill worker's prefix hit, then arrival; the engine's "priority" policy)
    prefill_order: str = "fcfs"
    prefill_router: RouterConfig | None = None  # None: ``router`` (dynamo: its prefill router)
    decode_router: RouterConfig | None = None  # None: ``router`` (dynamo: its decode router)

    def __post_init__(self) -> None:
        if self.control not in CONTROLS:
            raise ValueError(f"control must be one of {CONTROLS}")
        if self.prefill_order not in ("fcfs", "spf"):
            raise ValueError("prefill_order must be 'fcfs' or 'spf'")
        if min(self.num_prefill_workers, self.num_decode_workers, self.num_workers) < 0:
            raise ValueError("worker counts must be >= 0")
        if self.split and self.num_decode_workers == 0:
            raise ValueError("a P/D split needs at least one decode worker")
        if self.split and self.control == "dynamo" and self.num_prefill_workers == 0:
            raise ValueError("the dynamo control prefills remotely: it needs prefill workers")

    @property
    def split(self) -> bool:
        return self.num_prefill_workers > 0 or self.num_decode_workers > 0

    def pool_router(self, role: Role) -> RouterConfig:
        """The router config of the pool of ``role``."""
        if role is Role.PREFILL:
            if self.prefill_router is not None:
                return self.prefill_router
            return dynamo_prefill_router(self.router) if self.control == "dynamo" else self.router
        if role is Role.DECODE:
            if self.decode_router is not None:
                return self.decode_router
            if self.control == "dynamo":
                return dynamo_decode_router(self.router)
        return self.router


class _HoldForTransfer(SchedulerConnector):
    """A prefill worker's scheduler-side connector: every finished request's blocks are held
    until the replay releases them (its KV transfer is done)."""

    def request_finished(self, request, block_ids) -> bool:
        return True


class SimWorker:
    """One simulated replica: a mocker ``EngineCore``, its role and where its step loop
    stands. ``draining``: out of routing, leaves when idle; ``left_ms``: when it left."""

    def __init__(
        self,
        worker_id: int,
        role: Role,
        cfg: ReplayConfig,
        publish,
        timing: StepTiming,
        clock,
        connectors: tuple[SchedulerConnector, MockWorkerConnector] | None = None,
    ):
        self.worker_id = worker_id
        self.role = role
        connector, worker_connector = connectors or (NULL_CONNECTOR, None)
        if role is Role.PREFILL:
            connector = _HoldForTransfer()
        sched_cfg = SchedulerConfig(
            max_num_seqs=cfg.max_num_seqs,
            max_num_batched_tokens=cfg.max_num_batched_tokens,
            max_model_len=cfg.num_blocks * cfg.block_size,
            enable_chunked_prefill=cfg.enable_chunked_prefill,
            enable_prefix_caching=cfg.enable_prefix_caching,
            watermark=cfg.watermark,
            policy="priority" if role is Role.PREFILL and cfg.prefill_order == "spf" else "fcfs",
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
            connector=connector,
            worker_connector=worker_connector,
        )
        self.executor: MockExecutor = self.core.executor
        self.busy = False  # a step start or completion event is in the heap
        self.num_ff_steps = 0
        self.routable = False
        self.draining = False
        self.left_ms: float | None = None

    @property
    def loaded_waiting(self) -> int:
        """Requests whose KV load finished but which have not been scheduled yet."""
        connector = self.core.scheduler.connector
        if not isinstance(connector, MockPdConnector):
            return 0
        return self.core.scheduler.num_waiting_for_remote_kv - connector.num_loading

    def poll_kv(self) -> None:
        """What ``EngineCore`` does after a step with connector work: the worker side's
        report goes to the scheduler (a fast-forwarded run of steps ends with it too)."""
        report = self.executor.kv_connector.get_finished()
        if report is not None and not report.is_empty:
            self.core.scheduler.update_from_kv_output(report)

    @property
    def idle(self) -> bool:
        """Nothing to run and no block held for a transfer."""
        core = self.core
        return not core.has_unfinished_requests() and not core.scheduler.kv.held_request_ids


class Pool:
    """The workers of one role behind one router. ``workers``: the routable members (by
    id); ``draining``: removed from routing, still finishing their requests."""

    def __init__(self, role: Role, router: KvRouter):
        self.role = role
        self.router = router
        self.workers: dict[int, SimWorker] = {}
        self.draining: dict[int, SimWorker] = {}

    def __len__(self) -> int:
        return len(self.workers)

    def add_worker(self, worker: SimWorker) -> None:
        """Make ``worker`` routable in this pool."""
        self.workers[worker.worker_id] = worker
        worker.routable = True
        self.router.add_worker(worker.worker_id)

    def remove_worker(self, worker_id: int) -> SimWorker:
        """Take a worker out of routing (its cached blocks leave the index); it keeps
        serving what it has (``draining``) until the replay retires it."""
        worker = self.workers.pop(worker_id)
        worker.routable = False
        worker.draining = True
        self.router.remove_worker(worker_id)
        self.draining[worker_id] = worker
        return worker

    def retire(self, worker_id: int) -> SimWorker:
        return self.draining.pop(worker_id)

    def prefill_view(self) -> PrefillPool:
        """The pool as ``router.disagg.decide`` sees it (router-side load, as live)."""
        if not self.workers:
            return PrefillPool(0, 0)
        active = self.router.active
        waiting = min(active.active_prefill_tokens(w) for w in self.workers)
        return PrefillPool(len(self.workers), waiting)


class Replay:
    """One run over ``requests`` (sorted by arrival). ``run()`` returns the report dict."""

    def __init__(
        self, cfg: ReplayConfig, requests: list[TraceRequest], timing: StepTiming | None = None
    ):
        self.cfg = cfg
        self.requests = sorted(requests, key=lambda r: r.arrival_ms)
        self.now = 0.0  # virtual ms
        self.timing = timing or PolynomialTiming()
        self.tokens = TraceTokens(cfg.trace_block_size, cfg.block_size, cfg.vocab_size)
        self.records: dict[str, RequestRecord] = {}
        self.gaps = GapStats()
        self.num_event_gaps = 0
        self.links = TransferLinks(cfg.transfer)
        self.on_worker_left: Callable[[SimWorker], None] | None = None
        self._heap: list[tuple[float, int, int, int, object]] = []
        self._seq = 0
        self._next = 0  # index of the next arrival
        self._next_worker_id = 0
        self._num_timers = 0
        self.workers: dict[int, SimWorker] = {}  # every worker ever started
        self.pools: dict[Role, Pool] = {}
        self._prompts: dict[str, tuple] = {}  # remote requests' prompts until the decode leg
        self._first_token: dict[str, int] = {}  # the prefill leg's token (tokenmill control)
        roles = (
            [(Role.PREFILL, cfg.num_prefill_workers), (Role.DECODE, cfg.num_decode_workers)]
            if cfg.split
            else [(Role.BOTH, cfg.num_workers)]
        )
        for role, n in roles:
            self.pools[role] = Pool(role, KvRouter(cfg.pool_router(role), clock=self._clock_s))
            for _ in range(n):
                self.add_worker(role)

    # ---- pools and workers (the planner's seams) -----------------------------------------
    @property
    def router(self) -> KvRouter:
        """The router requests enter by: the aggregated pool's, or the decode pool's
        (tokenmill control) / the prefill pool's (dynamo control) in a split."""
        if not self.cfg.split:
            return self.pools[Role.BOTH].router
        role = Role.PREFILL if self.cfg.control == "dynamo" else Role.DECODE
        return self.pools[role].router

    def add_worker(self, role: Role | str, delay_ms: float = 0.0) -> int:
        """Start a worker of ``role``; it joins its pool's routing ``delay_ms`` from now (its
        start-up time). Returns its id (ids are never reused)."""
        role = Role(role)
        if role not in self.pools:
            raise ValueError(f"this replay has no {role} pool (pools: {list(self.pools)})")
        wid = self._next_worker_id
        self._next_worker_id += 1
        connectors = None
        if role is Role.DECODE:
            size = self.cfg.block_size
            # dynamo: its hand-off comes after the transfer; no transfer model: 0 ms loads
            sync = self.cfg.control == "dynamo" or not self.cfg.transfer.modelled
            on_load = None if sync else (lambda load, w=wid: self._load_started(w, load))
            clock_ms = lambda: self.now  # noqa: E731
            connectors = (MockPdConnector(size, sync), MockWorkerConnector(size, clock_ms, on_load))
        worker = SimWorker(
            wid, role, self.cfg, self._publish, self.timing, self._clock_s, connectors
        )
        self.workers[wid] = worker
        if delay_ms <= 0:
            self.pools[role].add_worker(worker)
        else:
            self.call_at(self.now + delay_ms, lambda replay: replay._join(worker))
        return wid

    def remove_worker(self, worker_id: int) -> None:
        """Stop routing to a worker at once; it drains (finishes its requests, releases its
        held blocks) and then leaves. A worker still starting up leaves at once."""
        worker = self.workers[worker_id]
        pool = self.pools[worker.role]
        if worker.routable:
            pool.remove_worker(worker_id)
            self._retire_if_idle(worker)
        elif worker.left_ms is None and not worker.draining:
            worker.draining = True  # never joined: _join will retire it
            pool.draining[worker_id] = worker

    def call_at(self, t_ms: float, fn: Callable[[Replay], None]) -> None:
        """Run ``fn(self)`` at virtual time ``t_ms`` (not before now)."""
        self._num_timers += 1
        self._push(max(t_ms, self.now), _TIMER, -1, fn)

    def _join(self, worker: SimWorker) -> None:
        if worker.draining:  # removed while starting
            self._retire_if_idle(worker)
            return
        self.pools[worker.role].add_worker(worker)
        self._drain_queues()

    def _retire_if_idle(self, worker: SimWorker) -> None:
        if worker.draining and worker.left_ms is None and worker.idle and not worker.busy:
            self.pools[worker.role].retire(worker.worker_id)
            worker.left_ms = self.now
            if self.on_worker_left is not None:
                self.on_worker_left(worker)

    # ---- event plumbing ------------------------------------------------------------------
    def _clock_s(self) -> float:
        return self.now / 1000.0

    def _publish(self, event: KvEvent) -> None:
        worker = self.workers.get(event.worker_id)
        if worker is None or not worker.routable:
            return  # a draining worker's blocks are no longer routed to
        if self.pools[worker.role].router.apply_event(event) is not None:
            self.num_event_gaps += 1

    def _push(self, t: float, kind: int, worker: int, payload: object = None) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, kind, self._seq, worker, payload))

    def _next_arrival_ms(self) -> float:
        return self.requests[self._next].arrival_ms if self._next < len(self.requests) else math.inf

    def _next_external_ms(self) -> float:
        """The next event that may add work to a decode or aggregated worker: an arrival, a
        timer, a transfer, or a prefill worker's step end (it may start a transfer)."""
        t = self._next_arrival_ms()
        if self.cfg.split or self._num_timers:
            workers = self.workers
            for ev in self._heap:
                if ev[0] < t and (
                    ev[1] in (_TRANSFER, _TIMER)
                    or (ev[1] == _COMPLETE and workers[ev[3]].role is Role.PREFILL)
                ):
                    t = ev[0]
        return t

    def run(self) -> dict:
        heap = self._heap
        while heap or self._next < len(self.requests):
            t_arr = self._next_arrival_ms()
            if heap and (heap[0][0], heap[0][1]) < (t_arr, _ARRIVAL):
                t, kind, _, w, payload = heapq.heappop(heap)
                self.now = t
                if kind == _COMPLETE:
                    self._complete(w, payload)  # type: ignore[arg-type]
                elif kind == _START:
                    self._start(w)
                elif kind == _TRANSFER:
                    self._transfer_done(payload)  # type: ignore[arg-type]
                else:
                    self._num_timers -= 1
                    payload(self)  # type: ignore[operator]
            else:
                self.now = t_arr
                self._arrive(self.requests[self._next])
                self._next += 1
        return self.report()

    # ---- arrivals and routing ------------------------------------------------------------
    def _arrive(self, req: TraceRequest) -> None:
        prompt = self.tokens.prompt_blocks(req)
        tokens, hashes, _ = prompt
        rec = RequestRecord(req.request_id, self.now, req.input_length, req.output_length)
        self.records[req.request_id] = rec
        decision = self.router.route(req.request_id, hashes, len(tokens))
        if isinstance(decision, Routed):
            self._placed(decision, prompt, rec)
        elif isinstance(decision, Queued):
            rec.pending_prompt = prompt
        else:
            rec.shed = True

    def _placed(self, decision: Routed, prompt: tuple, rec: RequestRecord) -> None:
        """A request placed by the entry router (at arrival or from its queue)."""
        if not self.cfg.split:
            self._dispatch(decision.worker_id, prompt, rec)
        elif self.cfg.control == "dynamo":
            self._dispatch_prefill(decision, prompt, rec)
        else:
            self._decide(decision, prompt, rec)

    def _decide(self, decision: Routed, prompt: tuple, rec: RequestRecord) -> None:
        """Tokenmill control: the decode worker is chosen; prefill remotely or locally."""
        tokens, hashes, _ = prompt
        rec.worker = decision.worker_id
        hit = min(decision.overlap_blocks * self.cfg.block_size, len(tokens))
        prefill_pool = self.pools[Role.PREFILL]
        decoding = self.pools[Role.DECODE].router.active.num_requests(decision.worker_id) - 1
        load = DecodeLoad(num_decoding=decoding)  # router-side, as live (less this request)
        d = decide(self.cfg.disagg, len(tokens), hit, prefill_pool.prefill_view(), load)
        rec.reason = d.reason.value
        if not d.remote:
            self._dispatch(decision.worker_id, prompt, rec)
            return
        # the decode worker will compute no prefill: its router stops counting one
        self.pools[Role.DECODE].router.mark_prefill_done(rec.request_id)
        rec.transfer_tokens = len(tokens) - hit  # refined when the transfer starts
        placed = prefill_pool.router.route(rec.request_id, hashes, len(tokens))
        if not isinstance(placed, Routed):  # the prefill router never queues (no limit)
            raise RuntimeError(f"prefill pool router returned {placed!r}")
        self._dispatch_prefill(placed, prompt, rec)

    def _dispatch(self, worker_id: int, prompt: tuple, rec: RequestRecord) -> None:
        """Serve the whole request on one worker (aggregated, or a local prefill)."""
        tokens, hashes, local = prompt
        rec.worker = worker_id
        params = SamplingParams(max_tokens=rec.output_length, ignore_eos=True)
        self._add(worker_id, rec.request_id, tokens, params, (hashes, local))

    def _dispatch_prefill(self, placed: Routed, prompt: tuple, rec: RequestRecord) -> None:
        tokens, hashes, local = prompt
        worker_id = rec.prefill_worker = placed.worker_id
        if rec.reason is None:
            rec.reason = Reason.MODE_ALWAYS.value  # dynamo control: every request
        self._prompts[rec.request_id] = prompt
        params = SamplingParams(max_tokens=1, ignore_eos=True)
        new = max(0, len(tokens) - placed.overlap_blocks * self.cfg.block_size)
        priority = new if self.cfg.prefill_order == "spf" else 0
        self._add(worker_id, rec.request_id, tokens, params, (hashes, local), priority=priority)

    def _add(
        self, worker_id: int, rid: str, tokens, params, hashes, transfer=None, priority: int = 0
    ) -> None:
        request = EngineRequest(
            request_id=rid,
            prompt_token_ids=tokens,
            params=params,
            arrival_time=self.now / 1e3,
            kv_transfer_params=transfer,
            priority=priority,
        )
        worker = self.workers[worker_id]
        worker.core.add_request(request, hashes)
        if not worker.busy:
            worker.busy = True
            self._push(self.now, _START, worker_id)

    def _drain_queues(self) -> None:
        for role, pool in self.pools.items():
            for decision in pool.router.drain():
                rec = self.records[decision.request_id]
                rec.queued_ms += decision.queued_s * 1000.0
                prompt, rec.pending_prompt = rec.pending_prompt, None
                if role is Role.DECODE and self.cfg.control == "dynamo":
                    self._dispatch_decode(decision.worker_id, rec)
                else:
                    self._placed(decision, prompt, rec)

    # ---- the KV hand-off -----------------------------------------------------------------
    def _prefill_done(self, worker: SimWorker, out: RequestOutput) -> None:
        """A remote prefill produced its token: the transfer to the decode worker starts."""
        rid = out.request_id
        rec = self.records[rid]
        router = self.pools[Role.PREFILL].router
        router.mark_prefill_done(rid)
        router.mark_finished(rid)
        rec.num_cached_tokens = out.num_cached_tokens  # prefill-pool hits (as Dynamo counts)
        tokenmill = self.cfg.control == "tokenmill"
        if tokenmill:  # the first token streams to the client now
            rec.first_token_ms = rec.last_token_ms = self.now
            self._first_token[rid] = out.new_token_ids[-1]
            if rec.output_length <= 1:  # nothing left to decode: no transfer
                rec.finish_ms = self.now
                rec.num_output_tokens = 1
                worker.core.scheduler.release_held_blocks([rid])
                self._prompts.pop(rid, None)
                self._first_token.pop(rid, None)
                self.pools[Role.DECODE].router.mark_finished(rid)
                return
        if tokenmill:
            # the decode leg starts now: the decode worker allocates its blocks and waits in
            # WAITING_FOR_REMOTE_KV while the load runs (``_load_started`` times it). Without
            # a transfer model the bytes are there at once: a sync load, the hold ends now.
            if not self.cfg.transfer.modelled:
                full = self.cfg.transfer.tokens == "full_prompt"
                rec.transfer_tokens = rec.input_length if full else rec.transfer_tokens
                rec.transfer_bytes = self.cfg.transfer.num_bytes(rec.transfer_tokens)
                rec.transfer_ms = rec.kv_wait_ms = 0.0
                worker.core.scheduler.release_held_blocks([rid])
            self._dispatch_decode(rec.worker, rec)
            return
        # dynamo: a fixed hand-off delay for the whole prompt, then the decode worker is picked
        rec.transfer_tokens = rec.input_length
        rec.transfer_bytes = self.cfg.transfer.num_bytes(rec.input_length)
        start, end = self.links.schedule(worker.worker_id, self.now, rec.transfer_bytes)
        rec.transfer_ms, rec.kv_wait_ms = end - start, end - self.now
        self._push(end, _TRANSFER, worker.worker_id, rid)

    def _load_started(self, decode_worker: int, load: KvLoad) -> float:
        """A decode worker starts loading a request's KV (the mocker's worker-side connector
        asks): when it will be there. Tokens moved: what the decode worker misses, or the
        whole prompt (``transfer.tokens``); the link model may queue it behind others."""
        rec = self.records[load.request_id]
        full = self.cfg.transfer.tokens == "full_prompt"
        rec.transfer_tokens = rec.input_length if full else load.num_tokens
        rec.transfer_bytes = self.cfg.transfer.num_bytes(rec.transfer_tokens)
        start, end = self.links.schedule(rec.prefill_worker, self.now, rec.transfer_bytes)
        rec.transfer_ms = end - start
        rec.kv_wait_ms = end - rec.first_token_ms  # prefill end -> KV in place
        self._push(end, _TRANSFER, decode_worker, load.request_id)
        return end

    def _transfer_done(self, rid: str) -> None:
        """The KV is on the decode side: the prefill worker frees the held blocks; the decode
        worker notices the finished load at its next step (woken if idle). Dynamo: the
        decode worker is picked now and its leg starts with the KV in place."""
        rec = self.records[rid]
        prefill = self.workers[rec.prefill_worker]
        prefill.core.scheduler.release_held_blocks([rid])
        self._retire_if_idle(prefill)
        if self.cfg.control == "tokenmill":
            decode = self.workers[rec.worker]
            if not decode.busy:
                decode.busy = True
                self._push(self.now, _START, decode.worker_id)
            return
        tokens, hashes, _ = self._prompts[rid]
        placed = self.pools[Role.DECODE].router.route(rid, hashes, len(tokens))
        if isinstance(placed, Routed):
            self._dispatch_decode(placed.worker_id, rec)
        elif isinstance(placed, Queued):
            rec.pending_prompt = self._prompts[rid]
        else:
            rec.shed = True

    def _dispatch_decode(self, worker_id: int, rec: RequestRecord) -> None:
        """The decode leg, through the engine's KV connector seam (``kv_transfer_params`` with
        ``do_remote_prefill``; the mocker's connector loads the prompt past the decode
        worker's own hit). Tokenmill: the prompt plus the prefill's token, the rest of the
        output. Dynamo: the prompt and every output token (all but the prompt's last token
        loaded: its activation pass is one decode step)."""
        rid = rec.request_id
        tokens, hashes, local = self._prompts.pop(rid)
        rec.worker = worker_id
        if self.cfg.control == "dynamo":
            params = SamplingParams(max_tokens=rec.output_length, ignore_eos=True)
        else:
            first = self._first_token.pop(rid)
            hashes, local = self._extend_hashes(tokens, hashes, local, first)
            tokens = tokens + [first]
            params = SamplingParams(max_tokens=rec.output_length - 1, ignore_eos=True)
        transfer = KvTransferParams(
            do_remote_prefill=True,
            remote_request_id=rid,
            remote_engine_id=f"worker-{rec.prefill_worker}",
            num_tokens=rec.input_length,
        )
        self._add(worker_id, rid, tokens, params, (hashes, local), transfer)

    def _extend_hashes(self, tokens: list[int], hashes: list[int], local: list[int], first: int):
        """The block hashes of ``tokens + [first]``: one more full block at most."""
        size = self.cfg.block_size
        n = len(tokens) + 1
        if n % size:
            return hashes, local
        new_local = local_block_hashes(tokens[n - size :] + [first], size)
        new_seq = chain_hashes(new_local, hashes[-1] if hashes else None)
        return hashes + new_seq, local + new_local

    # ---- steps ---------------------------------------------------------------------------
    def _start(self, w: int) -> None:
        """A step starts: ``begin_step`` now (allocation: ``Removed`` events), its completion
        ``last_step_ms`` later; or a fast-forwarded run of decode steps; or the worker idles."""
        worker = self.workers[w]
        if self.cfg.fast_forward and self._ff_ok():
            k = decode_run_length(worker.core.scheduler) if not worker.loaded_waiting else 0
            if k > 1:
                self._fast_forward(w, worker, k)
                return
        step = worker.core.begin_step()
        if step is None and worker.core.has_unfinished_requests():
            step = worker.core.begin_step()  # the empty step's poll may have made one runnable
        if step is None:
            worker.busy = False
            self._retire_if_idle(worker)
            return
        self._push(self.now + worker.executor.last_step_ms, _COMPLETE, w, step)

    def _ff_ok(self) -> bool:
        return all(p.router.config.queue.busy_prefill_tokens is None for p in self.pools.values())

    def _fast_forward(self, w: int, worker: SimWorker, k: int) -> None:
        """Up to ``k`` decode steps, ending at the first step end at or after the next event
        that may add work (so a request arriving mid-run joins where it would have joined
        stepping). Records the run's inter-token gaps."""
        sched = worker.core.scheduler
        dt = self.timing.decode_ms(sched.kv.num_used_blocks / sched.kv.num_blocks)
        t_ext = self._next_external_ms()
        t, steps = self.now, 0
        ends: list[float] = []
        while steps < k and t < t_ext:
            t += dt  # one addition per step: the same floats as stepping
            ends.append(t)
            steps += 1
        records = self.records
        first: Counter[float] = Counter()
        for r in sched.running:
            rec = records[r.request_id]
            first[ends[0] - rec.last_token_ms] += 1
            rec.last_token_ms = t
        for g, n in first.items():
            self.gaps.add(g, n)
        n = len(sched.running)
        for i in range(1, steps):
            self.gaps.add(ends[i] - ends[i - 1], n)
        advance_decode(sched, worker.executor.tokens, steps)
        worker.num_ff_steps += steps
        self._push(t, _COMPLETE, w, None)

    def _complete(self, w: int, step: InflightStep | None) -> None:
        """A step ends: ``finish_step`` (``Stored`` events), records, router queues, next step."""
        worker = self.workers[w]
        if step is not None:
            for out in worker.core.finish_step(step):
                self._on_output(worker, out)
            self._drain_queues()
        elif worker.core.scheduler.has_pending_transfers():
            worker.poll_kv()  # the fast-forwarded steps' last poll
        if worker.core.has_unfinished_requests():
            self._push(self.now, _START, w)
        else:
            worker.busy = False
            self._retire_if_idle(worker)

    def _on_output(self, worker: SimWorker, out: RequestOutput) -> None:
        rid = out.request_id
        rec = self.records[rid]
        if worker.role is Role.PREFILL:
            if out.finish_reason is not None:
                self._prefill_done(worker, out)
            return
        remote = rec.prefill_worker >= 0
        router = self.pools[worker.role].router
        first_seen = rec.last_token_ms < 0  # the client's first token
        if first_seen:
            rec.first_token_ms = self.now
        else:
            self.gaps.add(self.now - rec.last_token_ms)
        rec.last_token_ms = self.now
        if remote and rec.decode_first_ms < 0:
            rec.decode_first_ms = self.now
            router.mark_prefill_done(rid)
            if rec.transfer_ms < 0:  # the decode worker had it all: nothing was read
                rec.transfer_tokens = 0
                self.workers[rec.prefill_worker].core.scheduler.release_held_blocks([rid])
                self._retire_if_idle(self.workers[rec.prefill_worker])
        elif first_seen:
            router.mark_prefill_done(rid)
        if out.finish_reason is not None:
            rec.finish_ms = self.now
            rec.num_output_tokens = out.num_output_tokens
            if remote:
                worker.executor.remote_tokens.pop(rid, None)
                if self.cfg.control == "tokenmill":
                    rec.num_output_tokens += 1  # the prefill worker's token
            else:
                rec.num_cached_tokens = out.num_cached_tokens
            router.mark_finished(rid)

    def report(self) -> dict:
        ids = sorted(self.workers)
        stats = [self.workers[w].core.scheduler.stats() for w in ids]
        extra: dict = {
            "num_steps": sum(w.core.num_steps + w.num_ff_steps for w in self.workers.values()),
            "num_fast_forward_steps": sum(w.num_ff_steps for w in self.workers.values()),
            "num_event_gaps": self.num_event_gaps,
        }
        records = list(self.records.values())
        if self.cfg.split:
            extra["disagg"] = disagg_report(records)
            extra["pools"] = {
                role.value: [w for w in ids if self.workers[w].role is role] for role in self.pools
            }
        return build_report(self.cfg, records, stats, extra, self.gaps, ids)
