"""Whole KV blocks between the paged cache and flat bytes: the executor side of the tiers.

The cache is one K and one V tensor per layer, ``[num_blocks, B, Hkv, D]`` (paged_attention).
A stored block is every layer's K and V of that block, contiguous::

    block bytes = [L, 2, B * Hkv * D] of the cache dtype     (2: K then V)

``save`` gathers n blocks into an ``[n, block_bytes]`` uint8 CPU tensor with one
``index_select`` per layer and K/V straight into the strided staging rows; ``load`` scatters
such rows back with one ``index_copy_`` per layer and K/V; ``save_to`` / ``load_from`` do the
same against rows of a host arena. Every index op runs on the bytes viewed as int64 words
(the widest integer dividing a row): measured 2-10x faster on the CPU than on bf16 or uint8
elements, whose index kernels are slower per byte (docs/kv_tiers.md). On CUDA the gather runs on the device and one copy
brings the rows to the host (synchronous: the step's forward may overwrite the source blocks
next, and the host bytes must be complete before anyone reads them).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class BlockCopier:
    """Copies blocks of ``k_cache`` / ``v_cache`` (lists of per-layer tensors, same shape)."""

    def __init__(self, k_cache: Sequence[Tensor], v_cache: Sequence[Tensor]):
        if len(k_cache) != len(v_cache) or not k_cache:
            raise ValueError("need one K and one V tensor per layer")
        self.num_layers = len(k_cache)
        self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim = k_cache[0].shape
        self.dtype = k_cache[0].dtype
        self.device = k_cache[0].device
        row_bytes = self.block_size * self.num_kv_heads * self.head_dim * self.dtype.itemsize
        self.word = next(w for w in _WORDS if row_bytes % w.itemsize == 0)
        self.row = row_bytes // self.word.itemsize  # words per block of one K or V
        self._k = [_words(c, self.num_blocks, self.word) for c in k_cache]  # [num_blocks, row]
        self._v = [_words(c, self.num_blocks, self.word) for c in v_cache]
        self.block_bytes = self.num_layers * 2 * row_bytes

    @property
    def layout(self) -> tuple[int, ...]:
        """The per-block shape, for the layout fingerprint."""
        return (self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    def save(self, block_ids: Sequence[int], out: Tensor | None = None) -> Tensor:
        """The blocks' bytes as ``[n, block_bytes]`` uint8 on the CPU (into ``out`` if given:
        a CPU uint8 tensor of that shape, e.g. pinned staging memory)."""
        n = len(block_ids)
        ids = torch.tensor(block_ids, dtype=torch.long, device=self.device)  # [n]
        staging = torch.empty(
            (n, self.num_layers, 2, self.row), dtype=self.word, device=self.device
        )
        for layer in range(self.num_layers):
            torch.index_select(self._k[layer], 0, ids, out=staging[:, layer, 0])
            torch.index_select(self._v[layer], 0, ids, out=staging[:, layer, 1])
        data = staging.view(n, -1).view(torch.uint8)  # [n, block_bytes]
        if out is None:
            return data if self.device.type == "cpu" else data.cpu()
        out.copy_(data)
        return out

    def save_to(self, block_ids: Sequence[int], arena: Tensor, slots: Sequence[int]) -> None:
        """Copy the blocks into rows ``slots`` of ``arena`` (``[S, block_bytes]`` uint8, CPU)."""
        rows = self.save(block_ids).view(self.word)  # [n, block_words]
        arena.view(self.word).index_copy_(0, torch.tensor(slots, dtype=torch.long), rows)

    def load_from(self, block_ids: Sequence[int], arena: Tensor, slots: Sequence[int]) -> None:
        """Copy rows ``slots`` of ``arena`` into the blocks ``block_ids``."""
        rows = arena.view(self.word).index_select(0, torch.tensor(slots, dtype=torch.long))
        self.load(block_ids, rows.view(torch.uint8))

    def load(self, block_ids: Sequence[int], data: Tensor) -> None:
        """Write ``data`` (``[n, block_bytes]`` uint8, any device) into the blocks ``block_ids``."""
        n = len(block_ids)
        if tuple(data.shape) != (n, self.block_bytes) or data.dtype != torch.uint8:
            raise ValueError(f"expected [{n}, {self.block_bytes}] uint8, got {tuple(data.shape)}")
        ids = torch.tensor(block_ids, dtype=torch.long, device=self.device)  # [n]
        rows = data.to(self.device).view(self.word).view(n, self.num_layers, 2, self.row)
        for layer in range(self.num_layers):
            self._k[layer].index_copy_(0, ids, rows[:, layer, 0])
            self._v[layer].index_copy_(0, ids, rows[:, layer, 1])


_WORDS = (torch.int64, torch.int32, torch.int16, torch.uint8)


def _words(cache: Tensor, num_blocks: int, word: torch.dtype) -> Tensor:
    """``[num_blocks, ...]`` cache as ``[num_blocks, words]`` of ``word`` (a view, no copy)."""
    return cache.view(num_blocks, -1).view(torch.uint8).view(word)
