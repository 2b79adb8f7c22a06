"""A zero-cost engine (``--engine echo``): it answers by echoing the prompt's token ids back,
cyclically, one step of ``tokens_per_step`` ids at a time. It measures the serving path
(frontend, transport, worker) with no model in the way, and gives tests deterministic text.

It keeps honest block bookkeeping: ``ceil((prompt + output) / block_size)`` blocks per
running request, taken from a pool of ``num_blocks`` and returned when the request finishes,
is aborted or its stream is closed; ``check_integrity()`` verifies ``free + used == total``.
Prefix caching is modelled by remembering the sequence hashes (``core.block_hash``, salted
with ``cache_salt``) of prompts' full blocks: ``num_cached_tokens`` is the leading run of
known blocks. EOS ids in the prompt are skipped in the echo, so only ``max_tokens``, stop
strings and ``stop_token_ids`` end a request.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass

from tokenmill.core.block_hash import block_hashes
from tokenmill.core.request import EngineRequest, FinishReason, RequestOutput, TokenLogprob


@dataclass(frozen=True)
class EchoConfig:
    block_size: int = 16
    num_blocks: int = 65536
    token_delay_s: float = 0.0  # sleep per step (0: just yield to the event loop)
    tokens_per_step: int = 1
    max_cached_blocks: int = 1 << 20
    eos_token_ids: tuple[int, ...] = ()


class EchoEngine:
    def __init__(self, config: EchoConfig | None = None):
        self.config = config or EchoConfig()
        self.num_free_blocks = self.config.num_blocks
        self._allocated: dict[str, int] = {}
        self._aborted: set[str] = set()
        self._cache: OrderedDict[int, None] = OrderedDict()
        self.num_prompt_tokens = 0
        self.num_cached_tokens = 0
        self.num_aborted = 0
        self._healthy = True

    # ---- the engine protocol -------------------------------------------------------------
    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        rid = request.request_id
        num_cached = self._lookup_prefix(request)
        self._allocated[rid] = 0
        try:
            async for output in self._steps(request, num_cached):
                yield output
        finally:
            self._free(rid)

    def abort(self, request_id: str) -> None:
        if request_id in self._allocated:
            self._aborted.add(request_id)

    def is_healthy(self) -> bool:
        return self._healthy

    def stats(self) -> dict[str, float]:
        total = self.config.num_blocks
        return {
            "num_running_requests": len(self._allocated),
            "num_waiting_requests": 0,
            "kv_usage": (total - self.num_free_blocks) / total,
            "prefix_hit_rate": self.num_cached_tokens / max(self.num_prompt_tokens, 1),
            "num_total_blocks": total,
        }

    def shutdown(self) -> None:
        for rid in list(self._allocated):
            self.abort(rid)
        self._healthy = False

    @property
    def num_used_blocks(self) -> int:
        return sum(self._allocated.values())

    def check_integrity(self) -> None:
        assert self.num_free_blocks + self.num_used_blocks == self.config.num_blocks
        assert all(n >= 0 for n in self._allocated.values())

    # ---- internals -----------------------------------------------------------------------
    async def _steps(self, request: EngineRequest, num_cached: int) -> AsyncIterator[RequestOutput]:
        cfg, params, rid = self.config, request.params, request.request_id
        prompt = request.prompt_token_ids
        echo = [t for t in prompt if t not in cfg.eos_token_ids] or list(prompt)
        max_tokens = params.max_tokens or 16
        num_out = 0
        while True:
            await asyncio.sleep(cfg.token_delay_s)
            if rid in self._aborted:
                yield self._output(request, [], num_out, num_cached, FinishReason.ABORT)
                return
            step = min(cfg.tokens_per_step, max_tokens - num_out)
            new = [echo[(num_out + i) % len(echo)] for i in range(step)]
            num_out += step
            if not self._grow(rid, len(prompt) + num_out):
                yield self._output(request, [], num_out, num_cached, FinishReason.ERROR)
                return
            finish, stop_reason = self._finish(params, new, num_out, max_tokens)
            out = self._output(request, new, num_out, num_cached, finish, stop_reason)
            out.logprobs = _logprobs(new, echo, params.logprobs)
            yield out
            if finish is not None:
                return

    @staticmethod
    def _finish(params, new: list[int], num_out: int, max_tokens: int):
        hit = next((t for t in new if t in params.stop_token_ids), None)
        if hit is not None and num_out >= params.min_tokens:
            return FinishReason.STOP, hit
        return (FinishReason.LENGTH, None) if num_out >= max_tokens else (None, None)

    def _output(self, request, new, num_out, num_cached, finish, stop_reason=None):
        error = "out of KV blocks" if finish is FinishReason.ERROR else None
        return RequestOutput(
            request_id=request.request_id,
            new_token_ids=new,
            finish_reason=finish,
            stop_reason=stop_reason,
            error=error,
            num_prompt_tokens=len(request.prompt_token_ids),
            num_output_tokens=num_out,
            num_cached_tokens=num_cached,
        )

    def _lookup_prefix(self, request: EngineRequest) -> int:
        hashes = block_hashes(request.prompt_token_ids, self.config.block_size, request.cache_salt)
        num_hit = 0
        while num_hit < len(hashes) and hashes[num_hit] in self._cache:
            num_hit += 1
        for h in hashes:
            self._cache[h] = None
            self._cache.move_to_end(h)
        while len(self._cache) > self.config.max_cached_blocks:
            self._cache.popitem(last=False)
        num_cached = num_hit * self.config.block_size
        self.num_prompt_tokens += len(request.prompt_token_ids)
        self.num_cached_tokens += num_cached
        return num_cached

    def _grow(self, request_id: str, num_tokens: int) -> bool:
        needed = -(-num_tokens // self.config.block_size) - self._allocated[request_id]
        if needed > self.num_free_blocks:
            return False
        self._allocated[request_id] += max(needed, 0)
        self.num_free_blocks -= max(needed, 0)
        return True

    def _free(self, request_id: str) -> None:
        self.num_free_blocks += self._allocated.pop(request_id, 0)
        if request_id in self._aborted:
            self._aborted.discard(request_id)
            self.num_aborted += 1


def _logprobs(new: list[int], echo: list[int], k: int | None) -> list[TokenLogprob] | None:
    if k is None:
        return None
    alternatives = list(dict.fromkeys(echo))
    out = []
    for t in new:
        others = [a for a in alternatives if a != t][: max(k - 1, 0)]
        top = [(t, 0.0)] + [(a, -float(i + 1)) for i, a in enumerate(others)]
        out.append(TokenLogprob(t, 0.0, top[:k]))
    return out
