"""Conditional disaggregation in the frontend: a ``Dispatcher`` over the decode pool that,
per request, may prefill on a prefill worker first and move the KV to the decode worker.

``DisaggDispatcher.open`` picks the decode worker KV-aware (as aggregated routing does, with
the tokens it caches), asks ``router.disagg.decide`` (one pure function, shared with the
replay), and returns either the decode worker's own stream (local prefill) or a
``DisaggStream``, whose legs are::

    prefill leg   the request with max_tokens 1 and do_remote_decode, on a prefill worker
                  picked KV-aware in the prefill pool -> first token + transfer parameters
                  (the first token goes to the client at once: that is the TTFT)
    decode leg    prompt + first token, the rest of the budget, the parameters, on the
                  decode worker: it READs the blocks it misses and decodes

Failures: a prefill leg that fails (worker gone, no prefill worker, overloaded, engine
error) falls back to prefilling on the decode worker, so the client sees no error (a
client error, e.g. an invalid request, is the client's). A decode leg that ends before its
first output (the decode worker rejected the request, died, or the client left) releases
the prefill worker's held blocks at once through its ``kv_release`` endpoint; otherwise the
decode worker's READ (or its abort notice) releases them, and the prefill worker's
``--kv-transfer-timeout-s`` is the backstop. A decode worker's failure after that is the
migration layer's (``frontend.migration``), as for aggregated serving.

Every decision and its reason is counted (``tokenmill_disagg_decisions_total``) and lands in
the request log (``disagg``: remote, reason, prefill worker, fallback).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import msgspec

from tokenmill.core.errors import InstanceFailedError, TokenmillError
from tokenmill.core.kv_transfer import KvTransferParams
from tokenmill.core.request import EngineRequest, FinishReason, RequestOutput
from tokenmill.frontend.migration import continuation
from tokenmill.router.disagg import Decision, DisaggConfig, DisaggMode, PrefillPool, decide
from tokenmill.routing.dispatch import Dispatcher, RoutePolicy
from tokenmill.runtime.interface import EndpointClient, NoInstancesError, ResponseStream
from tokenmill.runtime.wire import WorkerLoad

log = logging.getLogger(__name__)

ReleaseFn = Callable[[str, list[str]], Awaitable[None]]  # (prefill instance id, request ids)
RELEASE_TIMEOUT_S = 5.0
_BACKGROUND: set[asyncio.Task[None]] = set()


class DisaggDispatcher(Dispatcher):
    """The decode pool's dispatcher (``client``: decode-capable instances, ``policy``: their
    route policy) with the prefill pool's (``prefill``) beside it. ``loads()``: the latest
    ``WorkerLoad``s (the prefill pool's saturation); ``release``: frees a prefill worker's
    held blocks."""

    def __init__(
        self,
        client: EndpointClient,
        policy: RoutePolicy | None,
        prefill: Dispatcher,
        config: DisaggConfig,
        release: ReleaseFn,
        loads: Callable[[], Iterable[WorkerLoad]] = tuple,
    ):
        super().__init__(client, policy)
        self.prefill, self.config = prefill, config
        self._release, self._loads = release, loads
        self.metrics: Any = None  # the model's metrics (``bind_metrics``)

    def bind_metrics(self, metrics: Any) -> None:
        """``metrics``: a ``ModelMetrics`` (decisions, transfers)."""
        self.metrics = metrics

    async def open(
        self, request: EngineRequest, deadline_s: float | None, options: Any = None
    ) -> ResponseStream:
        prefill_ids = [] if self.config.mode is DisaggMode.NEVER else self.prefill.live_instances()
        if not prefill_ids:  # nothing to decide: aggregated routing, unchanged
            self._count(decide(self.config, len(request.prompt_token_ids), 0, PrefillPool()))
            return await super().open(request, deadline_s, options)
        instance_ids = self.live_instances()
        if not instance_ids:
            raise NoInstancesError("no decode worker is serving")
        start = time.perf_counter()
        decode_id, hit = await self._select(request, instance_ids, options)
        if self._observe is not None:
            self._observe(decode_id, time.perf_counter() - start)
        decision = decide(self.config, len(request.prompt_token_ids), hit, self._pool(prefill_ids))
        self._count(decision)
        info = {"remote": decision.remote, "reason": str(decision.reason)}
        try:
            if not decision.remote:
                stream = self.client.generate(request, request.request_id, decode_id, deadline_s)
                return _Tagged(stream, info)
            return DisaggStream(self, request, decode_id, deadline_s, info)
        except BaseException:
            self.policy.on_finished(request.request_id)
            raise

    async def _select(
        self, request: EngineRequest, instance_ids: list[str], options: Any
    ) -> tuple[str, int]:
        select_with_hit = getattr(self.policy, "select_with_hit", None)
        if select_with_hit is not None:
            return await select_with_hit(request, instance_ids, options)
        if options is None:
            return await self.policy.select(request, instance_ids), 0
        return await self.policy.select(request, instance_ids, options), 0  # type: ignore[call-arg]

    def _pool(self, prefill_ids: list[str]) -> PrefillPool:
        live = set(prefill_ids)
        waiting = [ld.num_waiting_prefill_tokens for ld in self._loads() if ld.instance_id in live]
        return PrefillPool(len(prefill_ids), min(waiting) if len(waiting) == len(live) else 0)

    def _count(self, decision: Decision) -> None:
        if self.metrics is not None:
            self.metrics.observe_disagg(decision.remote, str(decision.reason))

    def release_later(self, instance_id: str, request_ids: list[str]) -> None:
        """Frees a prefill worker's held blocks now, in the background (best effort: its
        transfer timeout is the backstop)."""
        task = asyncio.get_running_loop().create_task(
            self._release_quietly(instance_id, request_ids)
        )
        _BACKGROUND.add(task)
        task.add_done_callback(_BACKGROUND.discard)

    async def _release_quietly(self, instance_id: str, request_ids: list[str]) -> None:
        try:
            await asyncio.wait_for(self._release(instance_id, request_ids), RELEASE_TIMEOUT_S)
            if self.metrics is not None:
                self.metrics.kv_releases.inc(len(request_ids))
        except Exception as e:  # noqa: BLE001 - the worker's timeout frees them anyway
            log.warning("could not release KV blocks %s on %s: %r", request_ids, instance_id, e)


class _Tagged(ResponseStream):
    """A decode worker's own stream, carrying the decision for the request log."""

    def __init__(self, stream: ResponseStream, disagg: dict[str, Any]):
        self._stream, self.disagg = stream, disagg
        self.request_id, self.instance_id = stream.request_id, stream.instance_id

    async def __anext__(self) -> Any:
        return await self._stream.__anext__()

    async def next_batch(self) -> list[Any]:
        return await self._stream.next_batch()

    async def aclose(self) -> None:
        await self._stream.aclose()


class DisaggStream(ResponseStream):
    """One request's two legs as one stream of ``RequestOutput``s (see the module
    docstring). ``instance_id`` is the decode worker's: a failure raised from here is the
    decode worker's, and the migration layer moves the request on."""

    def __init__(
        self,
        owner: DisaggDispatcher,
        request: EngineRequest,
        decode_id: str,
        deadline_s: float | None,
        disagg: dict[str, Any],
    ):
        self._owner, self._request, self._deadline_s = owner, request, deadline_s
        self.request_id, self.instance_id, self.disagg = request.request_id, decode_id, disagg
        self._leg: ResponseStream | None = None
        self._phase = "prefill"  # then "decode", then "done"
        self._offset = 0  # tokens produced before the decode leg (the first token)
        self._cached = -1  # the prefill worker's cached prompt tokens (-1: the decode's)
        self._hold: str | None = None  # prefill instance whose hold is not settled yet
        self._buffer: list[RequestOutput] = []

    async def __anext__(self) -> RequestOutput:
        if not self._buffer:
            self._buffer = await self.next_batch()
        return self._buffer.pop(0)

    async def next_batch(self) -> list[RequestOutput]:
        if self._buffer:
            out, self._buffer = self._buffer, []
            return out
        if self._phase == "prefill":
            return await self._prefill()
        if self._phase == "decode":
            return await self._decode()
        raise StopAsyncIteration

    # ------------------------------------------------------------------ prefill leg

    async def _prefill(self) -> list[RequestOutput]:
        request, prefill = self._request, self._owner.prefill
        params = request.params
        one = msgspec.structs.replace(params, max_tokens=1, min_tokens=min(params.min_tokens, 1))
        leg_request = msgspec.structs.replace(
            request, params=one, kv_transfer_params=KvTransferParams(do_remote_decode=True)
        )
        outs: list[RequestOutput] = []
        stream = None
        try:
            stream = await prefill.open(leg_request, self._deadline_s)
            self.disagg["prefill_worker"] = stream.instance_id
            while not (outs and outs[-1].finished):
                outs.extend(await stream.next_batch())
        except (StopAsyncIteration, InstanceFailedError, NoInstancesError, TimeoutError) as e:
            return await self._fallback(type(e).__name__, stream, outs)
        except TokenmillError as e:
            if not e.retryable:
                raise  # the client's fault: the decode worker would say the same
            return await self._fallback(e.code, stream, outs)
        finally:
            if stream is not None:
                await stream.aclose()
                prefill.finished(request.request_id)
        return self._after_prefill(stream.instance_id, outs)

    def _after_prefill(self, prefill_id: str, outs: list[RequestOutput]) -> list[RequestOutput]:
        last = outs[-1]
        params = last.kv_transfer_params
        if params is not None:
            self._hold = prefill_id
        if last.finish_reason is FinishReason.ERROR:
            self._release_hold()
            return self._start_local("prefill_error")
        if last.finish_reason is not FinishReason.LENGTH or self._request.params.max_tokens == 1:
            self._release_hold()  # the first token was the last: nothing to decode
            self._phase = "done"
            return [_without_params(o) for o in outs]
        generated = [t for o in outs for t in o.new_token_ids]
        leg = continuation(self._request, generated)
        if params is not None:
            leg = msgspec.structs.replace(leg, kv_transfer_params=params.for_decode())
        self._offset, self._cached = len(generated), last.num_cached_tokens
        self._open_decode(leg)
        first = [_without_params(o) for o in outs]
        first[-1].finish_reason = None
        return first

    async def _fallback(
        self, why: str, stream: ResponseStream | None, outs: list[RequestOutput]
    ) -> list[RequestOutput]:
        held = next((o for o in outs if o.kv_transfer_params is not None), None)
        if held is not None and stream is not None:
            self._hold = stream.instance_id
            self._release_hold()
        log.warning(
            "request %s: remote prefill failed (%s); prefilling locally", self.request_id, why
        )
        return self._start_local(why)

    def _start_local(self, why: str) -> list[RequestOutput]:
        self.disagg["fallback"] = why
        if self._owner.metrics is not None:
            self._owner.metrics.disagg_fallbacks.labels(why).inc()
        self._offset, self._cached = 0, -1
        self._open_decode(self._request)
        return []

    def _open_decode(self, request: EngineRequest) -> None:
        client = self._owner.client
        self._leg = client.generate(request, self.request_id, self.instance_id, self._deadline_s)
        self._phase = "decode"

    # ------------------------------------------------------------------ decode leg

    async def _decode(self) -> list[RequestOutput]:
        assert self._leg is not None
        try:
            outs = await self._leg.next_batch()
        except StopAsyncIteration:
            self._phase = "done"
            self._release_hold()
            raise
        except BaseException:
            self._release_hold()  # rejected before admission, died, or deadline
            raise
        if not outs:
            return outs
        if self._hold is not None:  # the decode worker has it: its READ settles the hold
            self._hold = None
        if not (self._offset or self._cached >= 0):
            return outs
        for out in outs:
            out.num_output_tokens += self._offset
            if self._cached >= 0:
                out.num_cached_tokens = self._cached
            if out.kv_transfer is not None and self._owner.metrics is not None:
                self._owner.metrics.observe_kv_transfer(out.kv_transfer)
        return outs

    def _release_hold(self) -> None:
        if self._hold is not None:
            self._owner.release_later(self._hold, [self.request_id])
            self._hold = None

    async def aclose(self) -> None:
        self._phase = "done"
        self._release_hold()  # the client left before the decode worker took over
        if self._leg is not None:
            with contextlib.suppress(Exception):
                await self._leg.aclose()


def _without_params(out: RequestOutput) -> RequestOutput:
    """The client never sees a prefill worker's transfer parameters."""
    if out.kv_transfer_params is not None:
        out.kv_transfer_params = None
    return out
