"""The real executor: flattens a scheduler step into one forward of the model over the paged
KV cache, computes logits only for the rows that sample, and samples them.

One step, for sequences s0, s1, ... scheduled with ``q_len_i`` new tokens each::

    input_ids  [T] = s0's new tokens | s1's new tokens | ...
    positions  [T] = num_computed_i .. num_computed_i + q_len_i - 1, per sequence
    logits     [N, V] for the last row of each sequence that samples this step

Failure isolation: a row whose logits are not finite fails alone (the sampler). If the
forward raises with several sequences in the batch, each sequence is re-run alone (its K/V
writes are idempotent: same slots, same values), and only those that still raise fail.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from tokenmill.core.errors import InvalidRequestError
from tokenmill.core.sampling import SamplingParams
from tokenmill.engine.executor.base import Executor, ExecutorOutput
from tokenmill.engine.executor.paged_attention import PagedAttention
from tokenmill.engine.executor.sampler import Sampler, SamplingRow

if TYPE_CHECKING:
    from tokenmill.engine.structured.grammar import GrammarCompiler

log = logging.getLogger(__name__)


@dataclass
class StepSeq:
    """One scheduled sequence, in the executor's own terms (decoupled from the scheduler)."""

    request_id: str
    token_ids: Sequence[int]  # the new tokens to compute this step
    num_computed: int  # tokens already in the KV cache: the position of token_ids[0]
    block_table: Sequence[int]
    sample: bool  # whether the last token's logits are sampled this step
    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]


class ModelRunner(Executor):
    """``model``: ``forward(input_ids [T], positions [T], attn) -> [T, H]`` and
    ``compute_logits(hidden [N, H]) -> [N, V]``. Owns the KV cache (``num_blocks`` blocks)."""

    def __init__(
        self,
        model,
        model_config,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        eos_token_ids: Sequence[int] = (),
        batched_decode: bool = True,
        decode_group_size: int = 8,
        num_threads: int | None = None,
        grammars: GrammarCompiler | None = None,
    ):
        self.model = model
        self.device = torch.device(device)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.attn = PagedAttention(
            model_config.num_layers,
            num_blocks,
            block_size,
            model_config.num_kv_heads,
            model_config.head_dim,
            dtype,
            self.device,
            batched_decode=batched_decode,
            decode_group_size=decode_group_size,
        )
        self.num_threads = num_threads
        self.sampler = Sampler(eos_token_ids, self.device, grammars)

    def on_thread_start(self) -> None:
        """Torch intra-op threads for the machine (all cores unless ``num_threads`` is set)."""
        if self.device.type == "cpu":
            torch.set_num_threads(self.num_threads or os.cpu_count() or 1)

    def set_kv_connector(self, connector) -> None:
        """Registers this runner's per-layer K and V tensors with ``connector``."""
        self.kv_connector = connector
        connector.register_kv_caches(self.attn.k_cache, self.attn.v_cache)

    def prepare(self, request) -> Future[None] | None:
        """Compiles a constrained request's grammar in the compiler's thread (cached)."""
        spec = request.params.structured
        if spec is None:
            return None
        if self.sampler.grammars is None:
            raise InvalidRequestError(
                "structured output needs the model's tokenizer in this engine",
                param="response_format",
            )
        return self.sampler.grammars.prepare(spec)

    def release(self, request_ids: Iterable[str]) -> None:
        self.sampler.release(request_ids)

    def shutdown(self) -> None:
        self.kv_connector.shutdown()
        self.attn.free()
        if self.sampler.grammars is not None:
            self.sampler.grammars.shutdown()

    def execute(self, scheduler_output) -> ExecutorOutput:
        self.release(scheduler_output.finished_request_ids)
        seqs = step_seqs(scheduler_output)
        if not seqs:
            return ExecutorOutput()
        try:
            return self.run(seqs)
        except Exception:
            if len(seqs) == 1:
                raise
            log.exception("batch forward failed; re-running its %d sequences alone", len(seqs))
            return self._run_isolated(seqs)

    def run(self, seqs: list[StepSeq]) -> ExecutorOutput:
        """One forward + sampling over ``seqs``; raises if the forward raises."""
        logits = self.forward_logits(seqs)  # [N, V]
        rows = [
            SamplingRow(s.request_id, s.params, s.prompt_token_ids, s.output_token_ids)
            for s in seqs
            if s.sample
        ]
        if not rows:
            return ExecutorOutput()
        return self.sampler.sample(logits, rows)

    def forward_logits(self, seqs: list[StepSeq]) -> torch.Tensor:
        """Runs the model over ``seqs``; fp32 logits [N, V] for the sequences that sample."""
        ids, pos, last_rows, row = [], [], [], 0
        for s in seqs:
            ids.extend(s.token_ids)
            pos.extend(range(s.num_computed, s.num_computed + len(s.token_ids)))
            row += len(s.token_ids)
            if s.sample:
                last_rows.append(row - 1)
        self.attn.prepare([(s.num_computed, len(s.token_ids), list(s.block_table)) for s in seqs])
        with torch.inference_mode():
            input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)  # [T]
            positions = torch.tensor(pos, dtype=torch.long, device=self.device)  # [T]
            hidden = self.model.forward(input_ids, positions, self.attn)  # [T, H]
            if not last_rows:
                return hidden.new_empty((0, 0), dtype=torch.float32)
            picked = hidden[torch.tensor(last_rows, device=self.device)]  # [N, H]
            return self.model.compute_logits(picked).float()  # [N, V]

    def _run_isolated(self, seqs: list[StepSeq]) -> ExecutorOutput:
        out = ExecutorOutput()
        for s in seqs:
            try:
                one = self.run([s])
            except Exception as e:  # noqa: BLE001 - isolate this request's failure
                log.warning("request %s failed: %r", s.request_id, e)
                out.errors[s.request_id] = f"executor error: {type(e).__name__}: {e}"
                continue
            out.sampled.update(one.sampled)
            out.logprobs.update(one.logprobs)
            out.errors.update(one.errors)
        return out


def step_seqs(scheduler_output) -> list[StepSeq]:
    """Adapts the scheduler's output to ``StepSeq``s (the only place that reads its shape)."""
    return [
        StepSeq(
            request_id=s.request_id,
            token_ids=s.token_ids,
            num_computed=s.position,
            block_table=s.block_ids,
            sample=s.samples,
            params=s.request.params,
            prompt_token_ids=s.request.prompt_token_ids,
            output_token_ids=s.request.output_token_ids,
        )
        for s in scheduler_output.scheduled
    ]
