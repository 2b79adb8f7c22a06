"""Worker-failure migration: one engine request's outputs, continued on another worker when
the one serving it fails.

``MigratingStream`` opens the request through the ``Dispatcher`` and iterates it. When the
stream raises ``InstanceFailedError`` (broken connection, sequence gap, inactivity timeout,
worker shutting down), the failed instance is excluded from routing at once
(``Dispatcher.instance_failed``) and the request is re-sent to another instance as a
*continuation*: the same request id, the prompt plus every token generated so far, and
``max_tokens``/``min_tokens`` reduced by that many (and a grammar told to replay them).
Greedy (and the mocker's position-based)
tokens are therefore exactly those of an uninterrupted run, so the client's text has no gap
and no duplicate. Counts in the outputs are rewritten to the client's view (original prompt
length, total output tokens). At most ``limit`` migrations per request; beyond that the
``InstanceFailedError`` reaches the client, and with no instance left a
``RequestAbortedError`` does (both 503, or an SSE error event once streaming).
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import msgspec

from tokenmill.core.errors import RequestAbortedError
from tokenmill.core.request import EngineRequest, FinishReason, RequestOutput
from tokenmill.routing.dispatch import Dispatcher
from tokenmill.runtime.interface import InstanceFailedError, NoInstancesError, ResponseStream

log = logging.getLogger(__name__)

DEFAULT_MIGRATION_LIMIT = 3


class ServedBy(list[str]):
    """The instances that served a request, in order, and (``disagg``) the prefill/decode
    decision of each opening that made one (the request log reads both)."""

    def __init__(self) -> None:
        super().__init__()
        self.disagg: list[dict[str, Any]] = []


def continuation(request: EngineRequest, generated: list[int]) -> EngineRequest:
    """``request`` resumed after ``generated`` tokens: prompt + generated as the prompt, the
    token budgets reduced accordingly. Requires ``len(generated) < max_tokens``."""
    params = request.params
    max_tokens = None if params.max_tokens is None else params.max_tokens - len(generated)
    params = msgspec.structs.replace(
        params, max_tokens=max_tokens, min_tokens=max(0, params.min_tokens - len(generated))
    )
    if params.structured is not None:  # the new worker replays them into the grammar
        structured = msgspec.structs.replace(params.structured, num_resumed_tokens=len(generated))
        params = msgspec.structs.replace(params, structured=structured)
    prompt = [*request.prompt_token_ids, *generated]
    return msgspec.structs.replace(request, prompt_token_ids=prompt, params=params)


class MigratingStream:
    """Batches of ``RequestOutput``s for ``request`` (``next_batch()``); call ``open()`` first
    (routing errors, e.g. shedding, surface there). ``aclose()`` closes the current worker
    stream."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        request: EngineRequest,
        deadline_s: float | None,
        limit: int = DEFAULT_MIGRATION_LIMIT,
        router: Any = None,
    ):
        self.dispatcher, self.request, self.limit = dispatcher, request, limit
        self.router = router  # per-request router options, passed to every routing
        self._deadline = None if deadline_s is None else time.monotonic() + deadline_s
        self._stream: ResponseStream | None = None
        self._generated: list[int] = []
        self._base = 0  # output tokens generated before the current worker's stream
        self.migrations = 0
        self.instances = ServedBy()  # every instance that served this request, in order

    async def open(self) -> MigratingStream:
        await self._open(self.request)
        return self

    async def _open(self, request: EngineRequest) -> None:
        self._stream = await self.dispatcher.open(request, self._time_left(), self.router)
        self.instances.append(self._stream.instance_id)
        disagg = getattr(self._stream, "disagg", None)  # a P/D decision (frontend.disagg)
        if disagg is not None:
            self.instances.disagg.append(disagg)

    def _time_left(self) -> float | None:
        return None if self._deadline is None else max(0.001, self._deadline - time.monotonic())

    async def next_batch(self) -> list[RequestOutput]:
        """Waits until at least one output is ready and returns every output ready now, in
        order; ``StopAsyncIteration`` at the end. A worker failure migrates the request first
        (the outputs that came before it were returned by the previous call)."""
        while True:
            assert self._stream is not None, "open() first"
            try:
                outs = await self._stream.next_batch()
            except InstanceFailedError as exc:
                done = await self._migrate(exc)
                if done is not None:
                    return [done]
                continue
            return [self._rewrite(out) for out in outs]

    def _rewrite(self, out: RequestOutput) -> RequestOutput:
        self._generated.extend(out.new_token_ids)
        out.num_prompt_tokens = len(self.request.prompt_token_ids)
        out.num_output_tokens += self._base
        return out

    async def _migrate(self, exc: InstanceFailedError) -> RequestOutput | None:
        """Moves the request to another instance; returns a final output instead when the
        failed worker had already produced every token."""
        assert self._stream is not None
        failed = self._stream.instance_id
        with contextlib.suppress(Exception):
            await self._stream.aclose()
        self.dispatcher.instance_failed(failed, self.request.request_id)
        if self.migrations >= self.limit:
            raise exc
        self.migrations += 1
        log.warning(
            "request %s: instance %s failed (%s); migrating after %d tokens (%d/%d)",
            self.request.request_id,
            failed,
            exc,
            len(self._generated),
            self.migrations,
            self.limit,
        )
        max_tokens = self.request.params.max_tokens
        if max_tokens is not None and len(self._generated) >= max_tokens:
            return self._length_done()
        self._base = len(self._generated)
        try:
            await self._open(continuation(self.request, self._generated))
        except NoInstancesError as no_worker:
            raise RequestAbortedError(
                f"request {self.request.request_id} was aborted: its worker failed and {no_worker}"
            ) from exc
        return None

    def _length_done(self) -> RequestOutput:
        return RequestOutput(
            request_id=self.request.request_id,
            new_token_ids=[],
            finish_reason=FinishReason.LENGTH,
            num_prompt_tokens=len(self.request.prompt_token_ids),
            num_output_tokens=len(self._generated),
        )

    async def aclose(self) -> None:
        if self._stream is not None:
            await self._stream.aclose()
