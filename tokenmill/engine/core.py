"""``EngineCore``: one model replica's synchronous heart (no threads, no torch import).

A step is two halves, so that a simulator can put virtual time between them:

- ``begin_step()``: ``scheduler.schedule()`` (allocates blocks, may preempt; the pool emits
  ``Removed`` events for blocks it evicts) -> ``executor.execute()``. Returns the in-flight
  step, or None when nothing was scheduled (the executor then releases the requests that
  finished since the last step).
- ``finish_step(step)``: per-request failures finished with ERROR ->
  ``scheduler.update_from_output()`` (blocks that became full are cached: ``Stored``
  events) -> detokenization and stop strings -> a list of ``RequestOutput`` (one per request
  that got tokens or finished this step).

KV connector (``kv.connector`` + ``engine.executor.kv_connector``): when the scheduler's
output carries connector metadata, ``begin_step`` hands it to the executor's worker-side
connector before executing, and the worker side's report (loads finished or failed, sends
finished) goes back to the scheduler at the end of ``finish_step``, or at once in
``begin_step`` when nothing was scheduled (loads in flight, blocks held). The null connector
produces no metadata, so none of this runs.

``step()`` is ``finish_step(begin_step())``: the live engine loop and the offline ``LLM`` call
it; the offline replay (``tokenmill.sim.replay``) calls the halves at a step's simulated start
and end. Between the halves only ``add_request`` (and ``abort_requests``) may be called; each
``begin_step`` must be finished before the next one. Cores are assembled by
``tokenmill.engine.builder``.

Not thread-safe: the engine loop thread (``loop.py``), the offline ``LLM`` or the replay owns
it. Only ``validate`` is safe from any thread (it reads immutable limits).

Failure isolation: a request whose row failed (NaN logits, an exception re-raised when it
ran alone) is finished with ``FinishReason.ERROR`` and its blocks are freed; the others go on.
If ``execute`` raises for the whole batch, every request of that batch fails, the engine
does not. Exceptions from the scheduler itself propagate: the loop treats them as death.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated

import msgspec

from tokenmill.core.detokenize import IncrementalDetokenizer
from tokenmill.core.errors import ContextLengthExceededError, InvalidRequestError
from tokenmill.core.request import EngineRequest, FinishReason, RequestOutput
from tokenmill.engine.executor.base import Executor, ExecutorOutput
from tokenmill.engine.scheduler import Scheduler
from tokenmill.engine.scheduler_output import RequestUpdate, SchedulerOutput

log = logging.getLogger(__name__)

Decode = Callable[..., str]  # tokenizer.decode(ids, skip_special_tokens=...)


@dataclass(slots=True)
class _Stream:
    """What the core keeps per unfinished request beyond the scheduler's state."""

    detok: IncrementalDetokenizer | None
    num_prompt_tokens: int
    want_logprobs: bool
    added_at: float = 0.0  # the clock's time at add_request
    queue_time_s: float | None = None  # added_at to first scheduled; None once it was sent


@dataclass(slots=True)
class InflightStep:
    """A step between ``begin_step`` and ``finish_step``: what was scheduled and what the
    executor returned for it. Opaque to callers."""

    scheduler_output: SchedulerOutput
    result: ExecutorOutput


class EngineCore:
    """Scheduler + executor + detokenization. ``decode`` None: outputs carry no text.

    ``vocab_size``: prompt ids and logit_bias keys must be in ``[0, vocab_size)``.
    ``clock`` stamps ``arrival_time`` of requests that come without one.
    """

    def __init__(
        self,
        scheduler: Scheduler,
        executor: Executor,
        vocab_size: int,
        decode: Decode | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.scheduler = scheduler
        self.executor = executor
        self.vocab_size = vocab_size
        self._prompt_ids_type = list[Annotated[int, msgspec.Meta(ge=0, lt=vocab_size)]]
        self.decode = decode
        self.clock = clock
        self.max_model_len = scheduler.max_model_len
        self._streams: dict[str, _Stream] = {}
        self.num_steps = 0

    # ------------------------------------------------------------------ requests in

    def validate(self, request: EngineRequest) -> None:
        """Raises ``InvalidRequestError`` naming the parameter, or ``ContextLengthExceededError``.
        Pure: safe from any thread."""
        ids = request.prompt_token_ids
        if not ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        bad = self._first_bad_token(ids)
        if bad is not None:
            raise InvalidRequestError(
                f"prompt token id {bad} is outside the vocabulary [0, {self.vocab_size})",
                param="prompt",
            )
        params = request.params
        if params.logit_bias and any(not 0 <= t < self.vocab_size for t in params.logit_bias):
            raise InvalidRequestError(
                f"logit_bias keys must be token ids in [0, {self.vocab_size})", param="logit_bias"
            )
        max_tokens = params.max_tokens or 1
        if len(ids) + max_tokens > self.max_model_len:
            raise ContextLengthExceededError(
                f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the maximum "
                f"context length of {self.max_model_len} tokens",
                param="max_tokens" if params.max_tokens else "prompt",
            )

    def _first_bad_token(self, ids: list[int]) -> int | None:
        """The first id outside ``[0, vocab_size)``; None when there is none."""
        try:  # one C pass, ~9 ns a token (a generator: ~17, min() and max(): ~25)
            msgspec.convert(ids, self._prompt_ids_type)
            return None
        except msgspec.ValidationError:  # find which one (or none: e.g. numpy ints)
            vocab_size = self.vocab_size
            return next((t for t in ids if not 0 <= t < vocab_size), None)

    def add_request(
        self, request: EngineRequest, prompt_hashes: tuple[list[int], list[int]] | None = None
    ) -> None:
        """Validates and queues ``request`` (raises as ``validate`` does, or on a duplicate id).
        ``prompt_hashes``: the prompt's block hashes if the caller has them (see
        ``Scheduler.add_request``; trusted, not recomputed)."""
        self.validate(request)
        now = self.clock()
        if request.arrival_time is None:
            request = _with_arrival(request, now)
        self.scheduler.add_request(request, prompt_hashes)
        params = request.params
        detok = None
        if self.decode is not None:
            skip = params.skip_special_tokens
            detok = IncrementalDetokenizer(
                lambda ids, _d=self.decode, _s=skip: _d(ids, skip_special_tokens=_s),
                params.stop,
                request.prompt_token_ids,
            )
        self._streams[request.request_id] = _Stream(
            detok, len(request.prompt_token_ids), params.logprobs is not None, now
        )

    def abort_requests(self, request_ids: Iterable[str]) -> list[RequestOutput]:
        """Finishes the given requests with ABORT (blocks freed now); unknown ids are ignored."""
        done = self.scheduler.abort_requests(request_ids)
        return [self._terminal(r.request_id, FinishReason.ABORT, r) for r in done]

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    # ------------------------------------------------------------------ one step

    def step(self) -> list[RequestOutput]:
        """Runs one scheduler step; [] when nothing was scheduled."""
        return self.finish_step(self.begin_step())

    def begin_step(self) -> InflightStep | None:
        """Schedules and executes a step; None (and nothing to finish) when nothing was
        scheduled. The result must go to ``finish_step`` before the next ``begin_step``."""
        sched = self.scheduler.schedule()
        meta = sched.kv_connector_metadata
        if meta is not None:
            self.executor.kv_connector.start_load_kv(meta)
        if sched.is_empty:
            if sched.finished_request_ids:
                self.executor.release(sched.finished_request_ids)
            if meta is not None:
                self._poll_kv_connector()
            return None
        self.num_steps += 1
        self._stamp_scheduled(sched)
        return InflightStep(sched, self._execute(sched))

    def finish_step(self, step: InflightStep | None) -> list[RequestOutput]:
        """Applies an executed step's results; [] for None. Requests finished or aborted since
        ``begin_step`` get no output from it."""
        if step is None:
            return []
        result = step.result
        outputs = self._fail(result.errors)
        updates = self.scheduler.update_from_output(step.scheduler_output, result.sampled)
        outputs.extend(self._output(u, result) for u in updates)
        if step.scheduler_output.kv_connector_metadata is not None:
            self._poll_kv_connector()
        return outputs

    def _poll_kv_connector(self) -> None:
        report = self.executor.kv_connector.get_finished()
        if report is not None and not report.is_empty:
            self.scheduler.update_from_kv_output(report)

    def release_transfers(self, request_ids: Iterable[str]) -> None:
        """The consumers of these finished requests' held blocks will not read them (a
        decode worker rejected or aborted, the client left): free them at the next step."""
        self.scheduler.connector.release(request_ids)

    def has_pending_transfers(self) -> bool:
        """A KV load or held blocks in flight: keep stepping (polling) while idle."""
        return self.scheduler.has_pending_transfers()

    def _stamp_scheduled(self, sched) -> None:
        """Queue time of the requests scheduled for the first time in this step (sent, and
        cleared, with each one's first output)."""
        now = None
        for s in sched.scheduled:
            if s.is_first_schedule and (stream := self._streams.get(s.request_id)) is not None:
                now = self.clock() if now is None else now
                stream.queue_time_s = now - stream.added_at

    def _execute(self, sched) -> ExecutorOutput:
        try:
            return self.executor.execute(sched)
        except Exception as e:  # noqa: BLE001 - the batch fails, the engine does not
            log.exception("executor failed for a batch of %d requests", len(sched.scheduled))
            why = f"executor error: {type(e).__name__}: {e}"
            return ExecutorOutput(errors={s.request_id: why for s in sched.scheduled})

    def _fail(self, errors: dict[str, str]) -> list[RequestOutput]:
        if not errors:
            return []
        done = self.scheduler.finish_requests(list(errors), FinishReason.ERROR)
        return [
            self._terminal(r.request_id, FinishReason.ERROR, r, error=errors[r.request_id])
            for r in done
        ]

    def _output(self, update: RequestUpdate, result: ExecutorOutput) -> RequestOutput:
        rid = update.request_id
        stream = self._streams[rid]
        finish, stop_reason = update.finish_reason, update.stop_reason
        text = ""
        if stream.detok is not None:
            text = stream.detok.push(update.new_token_ids)
            if stream.detok.stopped and finish is None:
                finish, stop_reason = FinishReason.STOP, stream.detok.stop_reason
                self.scheduler.finish_requests([rid], finish, stop_reason)
            elif finish is not None:
                text += stream.detok.flush()
        if finish is not None:
            del self._streams[rid]
        logprobs = result.logprobs.get(rid) if stream.want_logprobs else None
        queue_time_s, stream.queue_time_s = stream.queue_time_s, None  # first output only
        transfer = update.kv_transfer_params
        if transfer is not None:
            transfer = self.executor.kv_connector.complete_transfer_params(transfer)
        return RequestOutput(
            request_id=rid,
            new_token_ids=update.new_token_ids,
            text_delta=text,
            logprobs=logprobs[: len(update.new_token_ids)] if logprobs else logprobs,
            finish_reason=finish,
            stop_reason=stop_reason,
            num_prompt_tokens=update.num_prompt_tokens,
            num_output_tokens=update.num_output_tokens,
            num_cached_tokens=update.num_cached_tokens,
            queue_time_s=queue_time_s,
            kv_transfer_params=transfer,
        )

    def _terminal(self, rid: str, reason: FinishReason, request, error: str | None = None):
        """The last output of a request finished outside ``update_from_output``."""
        stream = self._streams.pop(rid, None)
        text = stream.detok.flush() if stream and stream.detok and reason != "error" else ""
        return RequestOutput(
            request_id=rid,
            new_token_ids=[],
            text_delta=text,
            finish_reason=reason,
            error=error,
            num_prompt_tokens=request.num_prompt_tokens,
            num_output_tokens=request.num_output_tokens,
            num_cached_tokens=max(request.num_cached_tokens, 0),
        )

    # ------------------------------------------------------------------ introspection

    def stats(self) -> dict[str, float | int]:
        s = self.scheduler.stats()
        return {
            "num_running": s.num_running,
            "num_waiting": s.num_waiting,
            "num_waiting_prefill_tokens": s.num_waiting_prefill_tokens,
            "kv_usage": s.kv_usage,
            "prefix_hit_rate": s.prefix_hit_rate,
            "num_preemptions": s.num_preemptions,
            "num_blocks": self.scheduler.kv.num_blocks,
            "num_steps": self.num_steps,
            "num_waiting_for_remote_kv": s.num_waiting_for_remote_kv,
            "num_held_blocks": s.num_held_blocks,
            "num_kv_load_failures": s.num_kv_load_failures,
        }

    def check_integrity(self) -> None:
        self.scheduler.check_integrity()
        assert set(self._streams) == set(self.scheduler.requests), "core streams out of sync"

    def shutdown(self) -> None:
        self.executor.shutdown()


def _with_arrival(request: EngineRequest, now: float) -> EngineRequest:
    return msgspec.structs.replace(request, arrival_time=now)
