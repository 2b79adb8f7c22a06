"""The reference forward pass: a contiguous KV cache and greedy decoding. The oracle.

Everything here favours being obviously correct over being fast: B sequences are left-padded
to a common length and stored in one [B, Hkv, S, D] tensor per layer; every forward appends
the same number of slots L to every row; attention is torch SDPA with an explicit boolean
mask. The paged engine is tested against these functions, and ``tokenmill generate`` uses
them until the paged engine exists.

Slot layout of one row (sequence b, p_b = number of pad slots, here p_b = 2):

    slot      0    1    2    3    4    5  | 6 ...      (prompt slots, then one per decode step)
    token    pad  pad   t0   t1   t2   t3 | g0 ...
    position  0    0    0    1    2    3  | 4 ...
    key_valid F    F    T    T    T    T  | T ...

A query at slot i attends key slot j iff j <= i and (key_valid[b, j] or j == i). The
``j == i`` term only matters for pad queries: it keeps their softmax finite (a fully masked
row would give NaN, which would reach real rows through the pad slots' k/v in later layers);
their outputs are never read.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenmill.engine.models.config import ModelConfig


class ContiguousKVCache:
    """AttentionBackend over a contiguous, left-padded KV cache for ``batch_size`` sequences.

    Protocol: call ``begin_forward(valid)`` with a [B, L] mask of real (non-pad) tokens,
    then run the model on exactly B * L tokens laid out row-major (sequence 0's L tokens,
    then sequence 1's...). Every layer call writes slots [start, start + L) of each row.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_num_slots: int, dtype, device):
        shape = (batch_size, config.num_kv_heads, max_num_slots, config.head_dim)
        self.keys = [
            torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)
        ]
        self.values = [
            torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)
        ]
        self.key_valid = torch.zeros(batch_size, max_num_slots, dtype=torch.bool, device=device)
        self.batch_size = batch_size
        self.max_num_slots = max_num_slots
        self.num_slots = 0  # slots filled in every row, pads included
        self._start = 0
        self._mask = torch.empty(0, dtype=dtype, device=device)

    def begin_forward(self, valid: Tensor) -> None:
        """Reserve the next L slots of every row for a forward; valid: [B, L] bool."""
        num_new = valid.shape[1]
        if valid.shape[0] != self.batch_size or self.num_slots + num_new > self.max_num_slots:
            raise ValueError(
                f"forward of {tuple(valid.shape)} does not fit a cache of "
                f"{self.batch_size} rows with {self.max_num_slots - self.num_slots} free slots"
            )
        self._start, self.num_slots = self.num_slots, self.num_slots + num_new
        self.key_valid[:, self._start : self.num_slots] = valid
        self._mask = self._build_mask()

    def _build_mask(self) -> Tensor:
        device = self.key_valid.device
        query_slot = torch.arange(self._start, self.num_slots, device=device)[:, None]  # [L, 1]
        key_slot = torch.arange(self.num_slots, device=device)[None, :]  # [1, S]
        causal = key_slot <= query_slot  # [L, S]
        visible = self.key_valid[:, None, : self.num_slots] | (key_slot == query_slot)  # [B, L, S]
        allowed = (causal & visible)[:, None]  # [B, 1, L, S]
        # Additive float mask, built once per forward instead of once per layer by SDPA.
        zeros = torch.zeros(allowed.shape, dtype=self.keys[0].dtype, device=device)
        return zeros.masked_fill_(~allowed, float("-inf"))

    def __call__(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        batch, (num_tokens, num_heads, head_dim) = self.batch_size, q.shape
        num_new = num_tokens // batch
        start, end = self._start, self.num_slots
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys[:, :, start:end] = k.view(batch, num_new, -1, head_dim).transpose(1, 2)
        values[:, :, start:end] = v.view(batch, num_new, -1, head_dim).transpose(1, 2)
        qb = q.view(batch, num_new, num_heads, head_dim).transpose(1, 2)  # [B, Hq, L, D]
        out = F.scaled_dot_product_attention(
            qb, keys[:, :, :end], values[:, :, :end], attn_mask=self._mask, enable_gqa=True
        )  # [B, Hq, L, D]
        return out.transpose(1, 2).reshape(num_tokens, num_heads, head_dim)  # [T, Hq, D]


@dataclass(frozen=True)
class PaddedBatch:
    """Left-padded prompts: ids/positions/valid are [B, L]; num_pads[b] pad slots lead row b."""

    ids: Tensor
    positions: Tensor
    valid: Tensor
    num_pads: list[int]

    @staticmethod
    def from_token_ids(token_ids: Sequence[Sequence[int]], device) -> PaddedBatch:
        if not token_ids or any(len(ids) == 0 for ids in token_ids):
            raise ValueError("every sequence needs at least one token")
        width = max(len(ids) for ids in token_ids)
        num_pads = [width - len(ids) for ids in token_ids]
        ids = [[0] * pad + list(seq) for pad, seq in zip(num_pads, token_ids, strict=True)]
        positions = [[0] * pad + list(range(width - pad)) for pad in num_pads]
        valid = [[False] * pad + [True] * (width - pad) for pad in num_pads]
        return PaddedBatch(
            ids=torch.tensor(ids, dtype=torch.long, device=device),
            positions=torch.tensor(positions, dtype=torch.long, device=device),
            valid=torch.tensor(valid, dtype=torch.bool, device=device),
            num_pads=num_pads,
        )


def _new_cache(model: nn.Module, batch_size: int, max_num_slots: int) -> ContiguousKVCache:
    weight = next(model.parameters())
    return ContiguousKVCache(model.config, batch_size, max_num_slots, weight.dtype, weight.device)


def _forward(
    model: nn.Module, cache: ContiguousKVCache, ids: Tensor, positions: Tensor, valid: Tensor
) -> Tensor:
    """One forward of [B, L] tokens -> hidden states [B, L, hidden]."""
    cache.begin_forward(valid)
    hidden = model(ids.reshape(-1), positions.reshape(-1), cache)  # [B*L, hidden]
    return hidden.view(*ids.shape, -1)  # [B, L, hidden]


@torch.inference_mode()
def reference_logits(model: nn.Module, token_ids: Sequence[Sequence[int]]) -> list[Tensor]:
    """fp32 logits for every position of every sequence: one [len_i, vocab] tensor each,
    row j predicting the token after token_ids[i][j]. All sequences run as one padded batch."""
    device = next(model.parameters()).device
    batch = PaddedBatch.from_token_ids(token_ids, device)
    cache = _new_cache(model, len(token_ids), batch.ids.shape[1])
    hidden = _forward(model, cache, batch.ids, batch.positions, batch.valid)  # [B, L, hidden]
    return [model.compute_logits(hidden[b, pad:]) for b, pad in enumerate(batch.num_pads)]


@torch.inference_mode()
def greedy_generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_token_ids: Collection[int],
) -> list[list[int]]:
    """Greedy (argmax, lowest id on ties) continuation of each prompt, decoded incrementally
    through the contiguous KV cache as one batch.

    Returns only the new tokens of each prompt: at most ``max_new_tokens``, ending with the
    first token in ``eos_token_ids`` if one is generated (that token is included).
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    device = next(model.parameters()).device
    batch = PaddedBatch.from_token_ids(prompts, device)
    width = batch.ids.shape[1]
    cache = _new_cache(model, len(prompts), width + max_new_tokens)
    last = _forward(model, cache, batch.ids, batch.positions, batch.valid)[:, -1]  # [B, hidden]
    next_positions = torch.tensor([len(p) for p in prompts], device=device)  # [B]
    outputs: list[list[int]] = [[] for _ in prompts]
    finished = [False] * len(prompts)
    for step in range(max_new_tokens):
        next_ids = model.compute_logits(last).argmax(dim=-1)  # [B]
        _record(next_ids.tolist(), outputs, finished, set(eos_token_ids))
        if all(finished) or step == max_new_tokens - 1:
            break
        ones = torch.ones(len(prompts), 1, dtype=torch.bool, device=device)  # [B, 1]
        positions = (next_positions + step)[:, None]  # [B, 1]
        last = _forward(model, cache, next_ids[:, None], positions, ones)[:, -1]  # [B, hidden]
    return outputs


def _record(
    next_ids: list[int], outputs: list[list[int]], finished: list[bool], eos_token_ids: set[int]
) -> None:
    """Append each unfinished sequence's token; mark it finished on an eos token."""
    for b, token in enumerate(next_ids):
        if not finished[b]:
            outputs[b].append(token)
            finished[b] = token in eos_token_ids
