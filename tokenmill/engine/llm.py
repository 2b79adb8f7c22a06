"""``LLM``: the offline batch API. ``from tokenmill import LLM, SamplingParams``.

Runs an ``EngineCore`` synchronously in the caller's thread (no loop thread offline): all
prompts are queued, then the core is stepped until every request finished, so they are
continuously batched together. Results come back in prompt order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tokenmill.core.errors import InvalidRequestError
from tokenmill.core.request import EngineRequest, FinishReason, RequestOutput, TokenLogprob
from tokenmill.core.sampling import SamplingParams
from tokenmill.engine.builder import DEFAULT_KV_CACHE_MEMORY, build_real_core
from tokenmill.engine.config import CacheConfig, SchedulerConfig


@dataclass
class CompletionResult:
    """One prompt's result. ``text`` excludes stop strings; ``token_ids`` are the output ids
    (EOS or the stop token included when one ended it)."""

    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    error: str | None = None
    num_cached_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None

    def add(self, out: RequestOutput) -> None:
        self.text += out.text_delta
        self.token_ids.extend(out.new_token_ids)
        if out.logprobs is not None:
            self.logprobs = (self.logprobs or []) + list(out.logprobs)
        self.num_cached_tokens = out.num_cached_tokens
        if out.finished:
            self.finish_reason, self.stop_reason, self.error = (
                out.finish_reason,
                out.stop_reason,
                out.error,
            )


class LLM:
    """Loads a model (``model=None``: the default SmolLM2 GGUF) and serves batches offline.

    ``kv_cache_memory`` (bytes) sizes the KV pool unless ``num_blocks`` is given.
    ``max_model_len`` defaults to the model's context length.
    """

    def __init__(
        self,
        model: str | Path | None = None,
        dtype: str = "auto",
        device: str = "auto",
        block_size: int = 16,
        kv_cache_memory: int = DEFAULT_KV_CACHE_MEMORY,
        num_blocks: int | None = None,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 2048,
        max_model_len: int | None = None,
        enable_prefix_caching: bool = True,
        **runner_kwargs,
    ):
        from tokenmill.engine.loader import load_model

        self.loaded = load_model(model, dtype=dtype, device=device)
        config = self.loaded.config
        cache = None if num_blocks is None else CacheConfig(block_size, num_blocks)
        sched = SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=max_model_len or config.max_position_embeddings,
            enable_prefix_caching=enable_prefix_caching,
        )
        self.core = build_real_core(
            self.loaded,
            sched,
            cache=cache,
            block_size=block_size,
            kv_cache_memory=kv_cache_memory,
            **runner_kwargs,
        )
        self.tokenizer = self.loaded.tokenizer
        self._next_id = 0

    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[CompletionResult]:
        """One result per prompt, in order. Text prompts are encoded without special tokens
        added (as a chat-rendered prompt needs); token-id prompts are used as they are.
        Invalid parameters or prompts raise before anything runs."""
        token_lists = self._encode(prompts)
        params_list = _per_prompt(params, len(token_lists))
        requests = [self._request(ids, p) for ids, p in zip(token_lists, params_list, strict=True)]
        for request in requests:
            self.core.validate(request)
            if request.params.n != 1:
                raise InvalidRequestError("n > 1 is not supported offline: repeat the prompt", "n")
        results = {r.request_id: CompletionResult(list(r.prompt_token_ids)) for r in requests}
        for request in requests:
            self.core.add_request(request)
        while self.core.has_unfinished_requests():
            for out in self.core.step():
                results[out.request_id].add(out)
        return [results[r.request_id] for r in requests]

    def chat(
        self, messages: Sequence[dict[str, str]], params: SamplingParams | None = None
    ) -> CompletionResult:
        """Renders the model's chat template (with the generation prompt) and generates."""
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.generate([prompt], params)[0]

    def _encode(self, prompts) -> list[list[int]]:
        if isinstance(prompts, str):
            prompts = [prompts]
        return [
            self.tokenizer.encode(p) if isinstance(p, str) else [int(t) for t in p] for p in prompts
        ]

    def _request(self, ids: list[int], params: SamplingParams) -> EngineRequest:
        self._next_id += 1
        return EngineRequest(request_id=f"llm-{self._next_id}", prompt_token_ids=ids, params=params)


def _per_prompt(params, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    if len(params) != n:
        raise ValueError(f"got {len(params)} SamplingParams for {n} prompts")
    return list(params)
