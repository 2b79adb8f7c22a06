"""Continuous batching in the "tokens per request" model (pure: no torch, no I/O, no clock).

Each step (``schedule``) hands out a budget of ``max_num_batched_tokens``:

1. running requests first, in order: each gets ``num_tokens - num_computed_tokens`` tokens
   (1 for a decode, the rest of its prompt for a chunked prefill), clipped to the budget.
   When the pool cannot grow a request's table, the last running request (the latest
   arrival under FCFS, the lowest priority under "priority") is preempted by recompute: its
   blocks are freed (its cached prefix stays in the cache until evicted) and it goes back to
   the front of the waiting queue with ``num_computed_tokens = 0``;
2. then, unless someone was preempted this step, waiting requests in queue order while
   ``max_num_seqs`` allows: prefix-cache hits are taken, the rest of the prompt is
   scheduled whole or, with chunked prefill, cut at the remaining budget. A request that
   cannot get its blocks (keeping the watermark free) stops admission (no overtaking).

Loading KV from elsewhere (``kv.connector``): at admission, after the prefix-cache lookup,
the connector says how many more prompt tokens it can load. An async load gets blocks for
the whole prompt and parks the request in ``WAITING_FOR_REMOTE_KV`` (counted against
``max_num_seqs``, not scheduled); ``update_from_kv_output`` then makes the loaded tokens
computed (caching their full blocks) and the request is scheduled first at the next step, or
on a failed load frees its blocks and requeues it at the front to recompute. A sync load
counts its tokens computed at once (the worker side loads them before the forward)::

    prompt    [ local hit | loaded by the connector | computed here (>= 1 token) ]
               get_computed   get_num_new_matched     the step's chunk(s)

``update_from_output`` advances ``num_computed_tokens``, caches blocks that became full,
appends the sampled tokens of requests whose chunk reached their last known token, checks
stop conditions and frees finished requests. Every finished request's blocks (stop, length,
abort, error; not preemption) are freed through ``_free_finished``, which first asks the
scheduler-side connector (``tokenmill.kv.connector``) whether to hold them for a transfer;
held blocks are freed by ``release_held_blocks``. ``schedule`` advances nothing itself, so each
``schedule`` must be followed by ``update_from_output`` before the next one.
"""

from __future__ import annotations

import bisect
from collections.abc import Collection, Iterable, Mapping

from tokenmill.core.errors import (
    ContextLengthExceededError,
    DuplicateRequestError,
    InvalidRequestError,
)
from tokenmill.core.events import KvEventSink, null_sink
from tokenmill.core.request import EngineRequest, FinishReason
from tokenmill.engine.config import CacheConfig, SchedulerConfig
from tokenmill.engine.request import Request, RequestStatus
from tokenmill.engine.request_queue import QUEUES
from tokenmill.engine.scheduler_output import (
    RequestUpdate,
    ScheduledRequest,
    SchedulerOutput,
    SchedulerStats,
)
from tokenmill.kv.connector import NULL_CONNECTOR, ConnectorOutput, SchedulerConnector
from tokenmill.kv.manager import KVCacheManager

_RUNNING = RequestStatus.RUNNING
_LOADING = RequestStatus.WAITING_FOR_REMOTE_KV
_PARKED = -1  # ``_admit``: admitted into WAITING_FOR_REMOTE_KV, nothing scheduled
_STOP, _LENGTH = FinishReason.STOP, FinishReason.LENGTH


class Scheduler:
    """Decides what each step computes; owns the requests' states and the KV cache manager.

    ``eos_token_ids`` end a request (unless ``ignore_eos``); ``event_sink`` receives the
    pool's KV events; ``connector`` decides whether a finished request's blocks are held
    for a transfer (the null connector never holds). ``max_model_len`` is the config's,
    capped by the pool's capacity so that a lone request always fits. Not thread-safe: one
    engine loop calls it.
    """

    def __init__(
        self,
        scheduler_config: SchedulerConfig,
        cache_config: CacheConfig,
        eos_token_ids: Collection[int] = (),
        event_sink: KvEventSink = null_sink,
        connector: SchedulerConnector = NULL_CONNECTOR,
    ):
        self.config = scheduler_config
        self.connector = connector
        self.cache_config = cache_config
        self.block_size = cache_config.block_size
        self.kv = KVCacheManager(
            cache_config.num_blocks,
            cache_config.block_size,
            scheduler_config.enable_prefix_caching,
            event_sink,
        )
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = min(scheduler_config.max_model_len, cache_config.num_tokens)
        self.waiting = QUEUES[scheduler_config.policy]()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}  # every unfinished request
        self._watermark_blocks = int(scheduler_config.watermark * cache_config.num_blocks)
        self._finished_since_step: list[str] = []
        self._num_added = 0
        self._num_waiting_tokens = 0  # sum of num_tokens over the waiting queue
        # WAITING_FOR_REMOTE_KV: loading (request, num_computed_tokens once loaded), then
        # loaded and scheduled first at the next step
        self._loading: dict[str, tuple[Request, int]] = {}
        self._loaded: list[Request] = []
        self.num_kv_load_failures = 0
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0
        self.num_preemptions = 0

    # ------------------------------------------------------------------ requests in and out

    def add_request(
        self, request: EngineRequest, prompt_hashes: tuple[list[int], list[int]] | None = None
    ) -> Request:
        """Queue a request. Raises ``DuplicateRequestError`` for a duplicate id (an unfinished
        request's, or a finished one's whose blocks are still held), ``InvalidRequestError``
        for an empty prompt and ``ContextLengthExceededError`` for a prompt over
        ``max_model_len``.

        ``prompt_hashes``: optional ``(block_hashes, local_hashes)`` of the prompt's full
        blocks at this engine's block size and the request's salt (``core.block_hash``), so
        a simulator that already hashed the prompt skips hashing it again (trusted as is)."""
        if request.request_id in self.requests or self.kv.is_held(request.request_id):
            raise DuplicateRequestError.for_request(request.request_id)
        num_prompt = len(request.prompt_token_ids)
        if num_prompt == 0:
            raise InvalidRequestError("the prompt is empty", "prompt")
        if num_prompt > self.max_model_len:
            raise ContextLengthExceededError(
                f"prompt has {num_prompt} tokens; this engine holds at most {self.max_model_len}"
            )
        block_size = self.block_size if self.config.enable_prefix_caching else None
        state = Request.from_engine_request(request, block_size, self._num_added, prompt_hashes)
        state.set_stop_conditions(self.eos_token_ids, self.max_model_len)
        self._num_added += 1
        self.requests[state.request_id] = state
        self.waiting.add(state)
        self._num_waiting_tokens += state.num_tokens
        return state

    def abort_requests(self, request_ids: Iterable[str]) -> list[Request]:
        """Finish the given unfinished requests with ABORT; their blocks are freed at once, or
        held while the connector asks (``_free_finished``).
        Unknown or already finished ids are ignored. Returns the requests aborted."""
        return self.finish_requests(request_ids, FinishReason.ABORT)

    def finish_requests(
        self,
        request_ids: Iterable[str],
        reason: FinishReason,
        stop_reason: int | str | None = None,
    ) -> list[Request]:
        """Finish requests decided outside (stop string, error, abort): blocks freed at once
        (or held for the connector), output tokens kept. Unknown ids are ignored. Returns the requests finished."""
        done = [self.requests[i] for i in dict.fromkeys(request_ids) if i in self.requests]
        for request in done:
            if request.status is _RUNNING:
                request.status = RequestStatus.FINISHED  # so the running list drops it
            elif request.status is _LOADING:
                self._unpark(request)
            else:
                self.waiting.discard(request)
                self._num_waiting_tokens -= request.num_tokens
            self._finish(request, reason, stop_reason)
        if done:
            self._drop_finished_running()
        return done

    def release_held_blocks(self, request_ids: Iterable[str]) -> list[str]:
        """Free the blocks held for the given finished requests (the connector reported
        their transfer done, aborted or timed out). Ids holding nothing are ignored (a second
        release is a no-op). Returns the ids whose blocks were freed."""
        return [rid for rid in request_ids if self.kv.release(rid)]

    def update_from_kv_output(self, output: ConnectorOutput) -> None:
        """Apply what the connector's worker side reported: finished loads make their tokens
        computed and full blocks cached (the request runs at the next step); failed loads free
        the request's blocks and requeue it at the front of the waiting queue to recompute.
        Ids not loading here (aborted while loading: the connector holds their blocks) are
        left to the connector."""
        self.connector.update_connector_output(output)
        for request_id in output.finished_loads:
            entry = self._loading.pop(request_id, None)
            if entry is not None:
                request = entry[0]
                request.num_computed_tokens = entry[1]
                self.kv.cache_full_blocks(request)
                self._loaded.append(request)
        for request_id in output.failed_loads:
            entry = self._loading.pop(request_id, None)
            if entry is not None:
                self._requeue_failed_load(entry[0])

    def _requeue_failed_load(self, request: Request) -> None:
        self.kv.free(request.request_id)
        request.status = RequestStatus.WAITING
        request.num_computed_tokens = 0
        self.num_kv_load_failures += 1
        self.waiting.add_preempted(request)  # front of the queue, as a preempted one
        self._num_waiting_tokens += request.num_tokens

    def _unpark(self, request: Request) -> None:
        if self._loading.pop(request.request_id, None) is None:
            self._loaded.remove(request)

    def _release_transfers(self) -> None:
        request_ids = self.connector.take_releasable()
        if request_ids:
            self.release_held_blocks(request_ids)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def has_pending_transfers(self) -> bool:
        """A load in flight or a held table: the engine must keep polling its connector."""
        return bool(self._loading) or self.kv.has_held or self.connector.has_pending()

    @property
    def num_waiting_for_remote_kv(self) -> int:
        return len(self._loading) + len(self._loaded)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            self.num_running,
            self.num_waiting,
            self.kv.usage,
            self.num_queried_tokens,
            self.num_hit_tokens,
            self.num_preemptions,
            self._num_waiting_tokens,
            self.num_waiting_for_remote_kv,
            self.kv.num_held_blocks,
            self.num_kv_load_failures,
        )

    # ------------------------------------------------------------------ one step

    def schedule(self) -> SchedulerOutput:
        """Choose this step's tokens (see the module docstring). Allocates blocks and may
        preempt, but advances no request: call ``update_from_output`` with the result."""
        out = SchedulerOutput(num_total_blocks=self.kv.num_blocks)
        out.finished_request_ids, self._finished_since_step = self._finished_since_step, []
        self._release_transfers()
        budget = self._schedule_running(out, self.config.max_num_batched_tokens)
        if not out.preempted_request_ids:
            if self._loaded:
                budget = self._schedule_loaded(out, budget)
            self._schedule_waiting(out, budget)
        out.num_active_blocks = self.kv.num_used_blocks
        out.kv_connector_metadata = self.connector.build_connector_meta()
        return out

    def _schedule_loaded(self, out: SchedulerOutput, budget: int) -> int:
        """Requests whose load finished run first, in load order: their tables already cover
        the prompt, so each is scheduled as admitted (its whole table new to the plan)."""
        loaded, self._loaded = self._loaded, []
        for i, request in enumerate(loaded):
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if num_new <= 0 or self.kv.allocate_slots(request, num_new) is None:
                self._loaded = loaded[i:]
                break
            request.status = _RUNNING
            self._add_running(request)
            self._add_scheduled(out, request, num_new)
            budget -= num_new
        return budget

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        """The hot loop (O(running), no per-token work): one table lookup per request, an
        allocation only when the step crosses into a block the table does not have yet."""
        running, scheduled, block_size = self.running, out.scheduled, self.block_size
        tables = self.kv.block_tables
        num_decode = num_prefill = i = 0
        while i < len(running) and budget > 0:
            request = running[i]
            position = request.num_computed_tokens
            num_tokens = len(request.all_token_ids)
            num_new = num_tokens - position
            if num_new > budget:
                num_new = budget
            table = tables[request.request_id]  # a running request always holds blocks
            num_held = len(table)
            if position + num_new > num_held * block_size:
                if not self._allocate_or_preempt(request, num_new, out):
                    break  # ``request`` was the last one and preempted itself
            end = position + num_new
            scheduled.append(
                ScheduledRequest(request, position, num_new, table, end == num_tokens, num_held)
            )
            if num_new == 1 and position >= request.num_prompt_tokens:
                num_decode += 1
            else:
                num_prefill += num_new
            budget -= num_new
            i += 1
        out.num_decode_tokens += num_decode
        out.num_prefill_tokens += num_prefill
        return budget

    def _allocate_or_preempt(self, request: Request, num_new: int, out: SchedulerOutput) -> bool:
        while self.kv.allocate_slots(request, num_new) is None:
            victim = self.running.pop()  # never scheduled yet: it is behind ``request``
            self._preempt(victim)
            out.preempted_request_ids.append(victim.request_id)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        self.kv.free(request.request_id)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.add_preempted(request)
        self._num_waiting_tokens += request.num_tokens

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        waiting, max_num_seqs = self.waiting, self.config.max_num_seqs
        while budget > 0 and len(self.running) + self.num_waiting_for_remote_kv < max_num_seqs:
            request = waiting.peek()
            if request is None:
                break
            num_new = self._admit(request, budget)
            if num_new == 0:
                break
            waiting.pop()
            self._num_waiting_tokens -= request.num_tokens
            if num_new == _PARKED:
                continue
            self._add_running(request)
            self._add_scheduled(out, request, num_new)
            budget -= num_new

    def _admit(self, request: Request, budget: int) -> int:
        """Give a waiting request its prefix hits and first chunk's blocks; 0 if it cannot,
        ``_PARKED`` if it was parked for an async load (nothing scheduled)."""
        reserve = self._watermark_blocks if self.running else 0  # alone, it must fit
        if self.kv.num_free_blocks <= reserve:
            return 0  # new tokens start a block of their own: skip the prefix lookup
        computed, num_cached = self.kv.get_computed_blocks(request)
        num_external, is_async = self.connector.get_num_new_matched_tokens(request, num_cached)
        if num_external and is_async:
            return self._park(request, computed, num_cached, num_external, reserve)
        num_new = request.num_tokens - num_cached - num_external
        if num_new > budget:
            if not self.config.enable_chunked_prefill:
                return 0
            num_new = budget
        if self.kv.allocate_slots(request, num_external + num_new, computed, reserve) is None:
            return 0
        self._count_hit(request, num_cached)
        if num_external:  # a sync load: the worker side fills these before the forward
            self.connector.update_state_after_alloc(
                request, self.kv.get_block_ids(request.request_id), num_cached, num_external
            )
        request.num_computed_tokens = num_cached + num_external
        request.status = _RUNNING
        return num_new

    def _park(
        self,
        request: Request,
        computed: list[int],
        num_cached: int,
        num_external: int,
        reserve: int,
    ) -> int:
        """Blocks for the whole prompt, then WAITING_FOR_REMOTE_KV while the load runs."""
        num_new = request.num_tokens - num_cached
        if self.kv.allocate_slots(request, num_new, computed, reserve) is None:
            return 0
        self._count_hit(request, num_cached)
        table = self.kv.get_block_ids(request.request_id)
        self.connector.update_state_after_alloc(request, table, num_cached, num_external)
        request.num_computed_tokens = num_cached
        request.status = _LOADING
        self._loading[request.request_id] = (request, num_cached + num_external)
        return _PARKED

    def _count_hit(self, request: Request, num_cached: int) -> None:
        if request.num_cached_tokens < 0:
            request.num_cached_tokens = num_cached
            self.num_queried_tokens += request.num_tokens
            self.num_hit_tokens += num_cached

    def _add_running(self, request: Request) -> None:
        if self.config.policy == "priority":
            bisect.insort(self.running, request, key=_sort_key)
        else:
            self.running.append(request)

    def _add_scheduled(self, out: SchedulerOutput, request: Request, num_new: int) -> None:
        position = request.num_computed_tokens
        samples = position + num_new == len(request.all_token_ids)
        block_ids = self.kv.get_block_ids(request.request_id)
        out.scheduled.append(ScheduledRequest(request, position, num_new, block_ids, samples))
        out.num_prefill_tokens += num_new  # an admitted request computes at least its last token

    # ------------------------------------------------------------------ results of a step

    def update_from_output(
        self, output: SchedulerOutput, sampled: Mapping[str, list[int]]
    ) -> list[RequestUpdate]:
        """Apply a finished step: ``sampled[request_id]`` holds the token(s) sampled for each
        scheduled request with ``samples`` set (tokens after a stop condition are dropped; a
        missing entry appends nothing). Requests finished or aborted since ``schedule`` are
        skipped. Returns one update per request that got tokens or finished, in step order
        (an update's ``new_token_ids`` may be the very list given in ``sampled``)."""
        updates: list[RequestUpdate] = []
        any_finished = False
        cache_full_blocks, block_size = self.kv.cache_full_blocks, self.block_size
        for item in output.scheduled:
            request = item.request
            if request.status is not _RUNNING:
                continue
            old = request.num_computed_tokens
            new = request.num_computed_tokens = old + item.num_tokens
            if new // block_size != old // block_size:
                cache_full_blocks(request)  # a block became full (computed)
            if not item.samples:
                continue
            new_ids = sampled.get(request.request_id)
            if not new_ids:
                continue
            token_id = new_ids[0]
            if (
                len(new_ids) == 1
                and token_id not in request.stop_ids
                and len(request.all_token_ids) + 1 < request.max_num_tokens
            ):  # the common case, inlined: one token that ends nothing
                request.append_output_token(token_id)
                updates.append(
                    RequestUpdate(
                        request.request_id,
                        new_ids,
                        None,
                        None,
                        request.num_prompt_tokens,
                        len(request.output_token_ids),
                        request.num_cached_tokens,
                    )
                )
            else:
                update = self._append_tokens(request, new_ids)
                updates.append(update)
                any_finished = any_finished or update.finish_reason is not None
        if any_finished:
            self._drop_finished_running()
        return updates

    def _append_tokens(self, request: Request, token_ids: list[int]) -> RequestUpdate:
        appended = []
        stop_ids, max_num_tokens = request.stop_ids, request.max_num_tokens
        for token_id in token_ids:
            request.append_output_token(token_id)
            appended.append(token_id)
            if token_id in stop_ids or len(request.all_token_ids) >= max_num_tokens:
                stop = self._check_stop(request, token_id)  # rare: the full check
                if stop is not None:
                    request.status = RequestStatus.FINISHED  # the running list drops it later
                    self._finish(request, *stop)
                    break
        return RequestUpdate(
            request.request_id,
            appended,
            request.finish_reason,
            request.stop_reason,
            request.num_prompt_tokens,
            len(request.output_token_ids),
            request.num_cached_tokens,
            request.kv_transfer_result,
        )

    def _check_stop(
        self, request: Request, token_id: int
    ) -> tuple[FinishReason, int | None] | None:
        """STOP for EOS (unless ignore_eos) or a stop token id once ``min_tokens`` are out,
        else LENGTH at ``max_tokens`` or ``max_model_len``; None to go on."""
        params = request.params
        num_output = len(request.output_token_ids)
        if num_output >= params.min_tokens:
            if token_id in self.eos_token_ids and not params.ignore_eos:
                return _STOP, None
            if token_id in params.stop_token_ids:
                return _STOP, token_id
        if len(request.all_token_ids) >= request.max_num_tokens:
            return _LENGTH, None
        return None

    def _finish(
        self, request: Request, reason: FinishReason, stop_reason: int | str | None
    ) -> None:
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        request.stop_reason = stop_reason
        self._free_finished(request)
        del self.requests[request.request_id]
        self._finished_since_step.append(request.request_id)

    def _free_finished(self, request: Request) -> None:
        """The one way a finished request's blocks go: held if the connector says so (until
        it makes them releasable, or ``release_held_blocks``), freed now otherwise. A held
        request's ``kv_transfer_result`` is what the connector says its output carries."""
        block_ids = self.kv.get_block_ids(request.request_id)
        if block_ids and self.connector.request_finished(request, block_ids):
            self.kv.hold(request.request_id)
            request.kv_transfer_result = self.connector.transfer_params(request.request_id)
        else:
            self.kv.free(request.request_id)

    def _drop_finished_running(self) -> None:
        self.running = [r for r in self.running if r.status is _RUNNING]

    def check_integrity(self) -> None:
        """The KV manager's check (held blocks included), plus: running / waiting / block
        holders agree, held blocks belong to finished requests only, and the waiting-token
        count is the waiting queue's."""
        self.kv.check_integrity()
        running_ids = {r.request_id for r in self.running}
        parked = [r for r, _ in self._loading.values()] + self._loaded
        _ensure(len(running_ids) == len(self.running), "a request runs twice")
        _ensure(all(r.status is _RUNNING for r in self.running), "a running request is not")
        _ensure(all(r.status is _LOADING for r in parked), "a parked request is not loading")
        num_known = len(self.running) + len(self.waiting) + len(parked)
        _ensure(num_known == len(self.requests), "lost a request")
        with_blocks = running_ids | {r.request_id for r in parked}
        for request in self.requests.values():
            holds = bool(self.kv.get_block_ids(request.request_id))
            _ensure(holds == (request.request_id in with_blocks), "blocks held while not running")
            _ensure(not self.kv.is_held(request.request_id), "held blocks of an unfinished request")
        waiting = [r for r in self.requests.values() if r.status not in (_RUNNING, _LOADING)]
        _ensure(sum(r.num_tokens for r in waiting) == self._num_waiting_tokens, "waiting tokens")


def _sort_key(request: Request) -> tuple[int, float, int]:
    return request.sort_key


def _ensure(ok: bool, message: str) -> None:
    if not ok:
        raise AssertionError(f"Scheduler integrity: {message}")
