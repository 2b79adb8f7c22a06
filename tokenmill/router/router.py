"""``KvRouter``: indexer + active sequences + policy + queue behind one pure facade.

No sockets, no asyncio, no clock reads except through the injected ``clock`` callable, so the
offline replay (virtual clock) and the frontend (monotonic clock) run the same code.

Life of a request: ``route`` -> ``Routed`` (or ``Queued`` while every worker is busy, or
``Shed`` beyond the queue's hard limit); the caller reports ``mark_prefill_done`` at the first
token and ``mark_finished`` at the end; each of these may free capacity, after which the
caller calls ``drain`` to place queued requests.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

from tokenmill.core.events import KvEvent, Tier
from tokenmill.router.active import ActiveSequences
from tokenmill.router.approx import ApproxConfig, ApproxIndexer
from tokenmill.router.indexer import EventGap, KvIndexer
from tokenmill.router.policy import (
    PolicyConfig,
    RouteInput,
    WorkerView,
    default_policy_config,
    make_policy,
)
from tokenmill.router.queue import QueueConfig, RequestQueue

ROUTER_MODES = ("round-robin", "random", "least-loaded", "kv", "dynamo")


@dataclass(frozen=True)
class RouterConfig:
    """``policy`` None: the mode's defaults (``policy.default_policy_config``). ``approx`` set:
    predict caches from routing decisions instead of KV events."""

    mode: str = "kv"
    block_size: int = 64
    policy: PolicyConfig | None = None
    queue: QueueConfig = field(default_factory=QueueConfig)
    active_ttl_s: float = 300.0
    approx: ApproxConfig | None = None
    seed: int = 0


@dataclass(frozen=True)
class RouteOverrides:
    """Per-request overrides: pin a worker, or use other policy knobs (e.g. temperature)."""

    worker_id: int | None = None
    policy: PolicyConfig | None = None


@dataclass(frozen=True)
class Routed:
    request_id: str
    worker_id: int
    overlap_blocks: int  # leading prompt blocks cached (device) on the chosen worker
    queued_s: float = 0.0  # time spent in the router's queue


@dataclass(frozen=True)
class Queued:
    request_id: str


@dataclass(frozen=True)
class Shed:
    request_id: str
    reason: str


Decision = Routed | Queued | Shed


@dataclass
class _Waiting:
    request_id: str
    block_hashes: Sequence[int]
    num_prompt_tokens: int
    overrides: RouteOverrides | None
    since: float


class KvRouter:
    def __init__(self, config: RouterConfig, clock: Callable[[], float]):
        self.config = config
        self.clock = clock
        self.index = KvIndexer()
        self.active = ActiveSequences(config.block_size, config.active_ttl_s)
        self.approx = ApproxIndexer(self.index, config.approx) if config.approx else None
        self.queue: RequestQueue[_Waiting] = RequestQueue(config.queue)
        self._policy = make_policy(config.mode, config.policy or default_policy_config(config.mode))
        self._rng = random.Random(config.seed)
        self._workers: list[int] = []

    # ---- membership and events -----------------------------------------------------------
    @property
    def workers(self) -> list[int]:
        return list(self._workers)

    def add_worker(self, worker_id: int) -> None:
        if worker_id not in self._workers:
            self._workers.append(worker_id)
        self.index.add_worker(worker_id)
        self.active.add_worker(worker_id)

    def remove_worker(self, worker_id: int) -> list[str]:
        """Forget the worker and its blocks; return its in-flight request ids (to migrate)."""
        if worker_id in self._workers:
            self._workers.remove(worker_id)
        self.index.remove_worker(worker_id)
        if self.approx:
            self.approx.remove_worker(worker_id)
        return self.active.remove_worker(worker_id)

    def apply_event(self, event: KvEvent) -> EventGap | None:
        """Feed one KV event to the index; a returned gap means the worker must replay."""
        return self.index.apply_event(event)

    # ---- routing -------------------------------------------------------------------------
    def route(
        self,
        request_id: str,
        block_hashes: Sequence[int],
        num_prompt_tokens: int,
        overrides: RouteOverrides | None = None,
    ) -> Decision:
        """Pick a worker for a prompt (``block_hashes``: sequence hashes of its full blocks)."""
        if not self._workers:
            return Shed(request_id, "no workers")
        self._expire()
        item = _Waiting(request_id, block_hashes, num_prompt_tokens, overrides, self.clock())
        if len(self.queue) or self._all_busy():
            if not self.queue.push(item, num_prompt_tokens):
                return Shed(request_id, "queue full")
            return Queued(request_id)
        return self._place(item)

    def drain(self) -> list[Routed]:
        """Place queued requests, in queue order, while some worker is not busy."""
        placed: list[Routed] = []
        while len(self.queue) and self._workers and not self._all_busy():
            placed.append(self._place(cast(_Waiting, self.queue.pop())))  # len(queue) > 0
        return placed

    def mark_prefill_done(self, request_id: str) -> None:
        self.active.mark_prefill_done(request_id, self.clock())

    def mark_finished(self, request_id: str) -> None:
        self.active.mark_finished(request_id)

    # ---- internals -----------------------------------------------------------------------
    def _expire(self) -> None:
        now = self.clock()
        self.active.expire(now)
        if self.approx:
            self.approx.expire(now)

    def _all_busy(self) -> bool:
        limit = self.config.queue.busy_prefill_tokens
        if limit is None:
            return False
        return all(self.active.active_prefill_tokens(w) > limit for w in self._workers)

    def _place(self, item: _Waiting) -> Routed:
        hashes, ntok = item.block_hashes, item.num_prompt_tokens
        inp = self._route_input(hashes, ntok)
        ov = item.overrides
        if ov and ov.worker_id is not None and ov.worker_id in self._workers:
            worker = ov.worker_id
        elif ov and ov.policy is not None:
            worker = make_policy(self.config.mode, ov.policy)(inp, self._rng)
        else:
            worker = self._policy(inp, self._rng)
        view = next(v for v in inp.workers if v.worker_id == worker)
        cached = min(view.device_overlap * self.config.block_size, ntok)
        now = self.clock()
        self.active.add_request(item.request_id, worker, hashes, ntok, ntok - cached, now)
        if self.approx:
            self.approx.record_route(worker, hashes, now)
        return Routed(item.request_id, worker, view.device_overlap, now - item.since)

    def _route_input(self, hashes: Sequence[int], ntok: int) -> RouteInput:
        device = self.index.find_matches(hashes, Tier.DEVICE)
        any_tier = self.index.find_matches_any_tier(hashes) if self._has_lower_tiers() else device
        views = []
        act = self.active
        for w in self._workers:
            dev = device.get(w, 0)
            views.append(
                WorkerView(
                    worker_id=w,
                    device_overlap=dev,
                    lower_overlap=any_tier.get(w, 0) - dev,
                    active_blocks=act.active_blocks(w),
                    active_prefill_tokens=act.active_prefill_tokens(w),
                    new_blocks=act.new_blocks(w, hashes, ntok),
                    num_requests=act.num_requests(w),
                    cached_blocks=self.index.num_blocks(w),
                )
            )
        return RouteInput(ntok, self.config.block_size, tuple(views))

    def _has_lower_tiers(self) -> bool:
        return any(
            self.index.num_blocks(w, t) for w in self._workers for t in Tier if t is not Tier.DEVICE
        )
