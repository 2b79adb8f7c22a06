"""The attention backend contract between a model and whoever stores its KV cache.

The model computes q, k and v for the tokens of one forward pass (already RoPE-rotated and,
for Qwen3, normed) and hands them to the backend once per layer. The backend writes k and v
into its own storage (contiguous for the reference oracle, paged for the engine), attends
every query over the keys its sequence may see, and returns the attention output. The model
therefore never knows how KV is laid out or which tokens belong to which sequence: the
caller prepares the backend for each forward (batch layout, slots) before calling the model.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor


class AttentionBackend(Protocol):
    """Stores k/v for one forward's T tokens and returns their attention output.

    Contract:
    - ``q`` is [T, Hq, D], ``k`` and ``v`` are [T, Hkv, D] with Hq a multiple of Hkv (GQA);
      T is flattened over all sequences of the forward, in the order the caller set up.
    - called exactly once per layer per forward, with ``layer_idx`` 0, 1, ... in order;
      the k/v written for ``layer_idx`` are visible to later forwards of the same sequence.
    - returns [T, Hq, D] in q's dtype: softmax(q k^T / sqrt(D)) v over the causal prefix of
      each token's own sequence (cached tokens plus earlier tokens of this forward).
    """

    def __call__(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor: ...
