"""``VllmEngine``: vLLM's v1 ``AsyncLLM`` as a ``worker.protocol.EngineClient``.

Contracts (the same as ``engine.async_engine.AsyncEngine``'s, so the worker, migration and
the frontend cannot tell the engines apart):

- ``generate`` checks the request before vLLM sees it (empty prompt, ids outside the
  vocabulary, prompt + ``max_tokens`` over the context: ``InvalidRequestError`` /
  ``ContextLengthExceededError`` naming the parameter; a sampling field without a vLLM
  mapping: ``InvalidRequestError``), then streams our ``RequestOutput``s: token ids only
  (vLLM does not detokenize; the frontend does, and applies stop strings), one per vLLM
  delta, ending with one that has ``finish_reason`` set. ``max_tokens=None`` means the rest
  of the context.
- Leaving the iteration early (``aclose()``, cancellation) aborts the vLLM request, so its
  KV blocks are freed.
- vLLM's engine process dying makes open streams and later calls raise ``EngineDeadError``
  (503, retryable: the frontend migrates the request); ``is_healthy()`` turns False.
- ``stats()`` is load as our engine reports it, from vLLM's scheduler stats
  (``stats.VllmStats``), plus the prompt tokens of requests not yet started.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from tokenmill.core.errors import ContextLengthExceededError, EngineDeadError, InvalidRequestError
from tokenmill.core.request import EngineRequest, FinishReason, RequestOutput, TokenLogprob
from tokenmill.vllm_backend.kv_events import KvEventSubscriber
from tokenmill.vllm_backend.sampling import vllm_sampling_kwargs
from tokenmill.vllm_backend.stats import VllmStats

_FINISH = {
    "stop": FinishReason.STOP,
    "length": FinishReason.LENGTH,
    "abort": FinishReason.ABORT,
    "error": FinishReason.ERROR,
}


class VllmEngine:
    """Owns ``llm`` (an ``AsyncLLM``) and the KV event ``subscriber`` (None: no events);
    call ``shutdown()``."""

    def __init__(
        self,
        llm: Any,
        stats: VllmStats,
        vocab_size: int,
        subscriber: KvEventSubscriber | None = None,
    ):
        from vllm import SamplingParams, TokensPrompt
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.exceptions import EngineDeadError as VllmDeadError

        self.llm = llm
        self.subscriber = subscriber
        self._stats = stats
        self.vocab_size = vocab_size
        self.max_model_len: int = llm.model_config.max_model_len
        self.priority_scheduling = llm.vllm_config.scheduler_config.policy == "priority"
        self._params, self._prompt = SamplingParams, TokensPrompt
        self._delta = RequestOutputKind.DELTA
        self._dead_error = VllmDeadError
        self._waiting_prefill: dict[str, int] = {}  # request id -> prompt tokens, not started

    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        rid = request.request_id
        if not self.is_healthy():
            raise EngineDeadError("the vLLM engine is not running")
        params, prompt = self._convert(request)
        num_prompt = len(request.prompt_token_ids)
        self._waiting_prefill[rid] = num_prompt
        stream = self.llm.generate(prompt, params, rid, priority=request.priority)
        num_output, finished = 0, False
        k = request.params.logprobs or 0
        try:
            async for out in stream:
                self._waiting_prefill.pop(rid, None)
                ours = to_output(out, num_prompt, num_output, k)
                num_output, finished = ours.num_output_tokens, ours.finished
                yield ours
        except self._dead_error as e:
            raise EngineDeadError(f"the vLLM engine died: {e}") from None
        except ValueError as e:  # vLLM's own request checks (VLLMClientError is one)
            raise InvalidRequestError(f"vLLM rejected the request: {e}") from None
        finally:
            self._waiting_prefill.pop(rid, None)
            if not finished:
                await stream.aclose()  # vLLM aborts the request on GeneratorExit
                if self.is_healthy():
                    await self.llm.abort(rid)

    def _convert(self, request: EngineRequest) -> tuple[Any, Any]:
        ids = request.prompt_token_ids
        if not ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise InvalidRequestError(
                f"prompt token id {bad} is outside the vocabulary [0, {self.vocab_size})",
                param="prompt",
            )
        asked = request.params.max_tokens
        max_tokens = self.max_model_len - len(ids) if asked is None else asked
        if max_tokens < 1 or len(ids) + max_tokens > self.max_model_len:
            raise ContextLengthExceededError(
                f"prompt ({len(ids)} tokens) + max_tokens ({asked or 1}) exceeds the maximum "
                f"context length of {self.max_model_len} tokens",
                param="max_tokens" if asked else "prompt",
            )
        if request.priority != 0 and not self.priority_scheduling:
            raise InvalidRequestError(
                "priority needs the vLLM engine started with --scheduling-policy priority "
                "(pass it in --vllm-args)",
                param="priority",
            )
        kwargs = vllm_sampling_kwargs(request.params, max_tokens)
        params = self._params(**kwargs, detokenize=False, output_kind=self._delta)
        prompt = self._prompt(prompt_token_ids=ids)
        if request.cache_salt:
            prompt["cache_salt"] = request.cache_salt
        return params, prompt

    async def abort(self, request_id: str) -> None:
        """Aborts a request; its stream ends with a finish_reason ABORT output."""
        if self.is_healthy():
            await self.llm.abort(request_id)

    def is_healthy(self) -> bool:
        return not self.llm.errored

    def stats(self) -> dict[str, float | int]:
        stats = self._stats.snapshot()
        stats["num_waiting_prefill_tokens"] = sum(self._waiting_prefill.values())
        return stats

    def shutdown(self) -> None:
        if self.subscriber is not None:
            self.subscriber.stop()
        self.llm.shutdown()


def to_output(
    out: Any, num_prompt: int, num_output_before: int, num_logprobs: int = 0
) -> RequestOutput:
    """Our output for one vLLM ``RequestOutput`` in DELTA mode (one completion)."""
    completion = out.outputs[0]
    new_ids = list(completion.token_ids)
    reason = completion.finish_reason
    finish = None if reason is None else _FINISH.get(reason, FinishReason.ERROR)
    return RequestOutput(
        request_id=out.request_id,
        new_token_ids=new_ids,
        logprobs=_logprobs(new_ids, completion.logprobs, num_logprobs),
        finish_reason=finish,
        stop_reason=completion.stop_reason,
        error=f"vLLM finished the request with {reason!r}"
        if finish is FinishReason.ERROR
        else None,
        num_prompt_tokens=num_prompt,
        num_output_tokens=num_output_before + len(new_ids),
        num_cached_tokens=out.num_cached_tokens or 0,
    )


def _logprobs(token_ids: list[int], per_token: Any, k: int) -> list[TokenLogprob] | None:
    """vLLM's per-token ``{id: Logprob(logprob, rank)}`` (the top ``k`` by rank, plus the
    sampled token when it ranks lower) as ours: the sampled token's logprob and the top
    ``k`` best first."""
    if per_token is None:
        return None
    out = []
    for token_id, entries in zip(token_ids, per_token, strict=True):
        ranked = sorted(entries.items(), key=lambda kv: kv[1].rank)
        top = [(t, lp.logprob) for t, lp in ranked if lp.rank <= k]
        out.append(TokenLogprob(token_id, entries[token_id].logprob, top))
    return out
