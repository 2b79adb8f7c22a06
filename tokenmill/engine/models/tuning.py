"""Choices about how the model computes that depend on the machine, measured when it is built.

For bf16 on a CPU, ``bf16_linear_plan`` picks how ``llama.linear`` runs, on random matrices
of the model's largest per-layer projection (gate/up fused), best of a few runs at a few
token counts (a few tens of milliseconds at SmolLM2's shape):

- ``packed``: the weights pre-packed once into oneDNN's blocked layout
  (``mkldnn._reorder_linear_weight``), so a matmul skips the per-call reorder. Measured on the
  2-core AMD EPYC box (AVX512-BF16, one layer's 4 matrices, 1 thread): 0.32 -> 0.17 ms at T=1,
  0.50 -> 0.33 ms at T=8, 1.24 -> 1.07 ms at T=32, about equal from T=128 on; the results are
  the same bf16 values (same kernel, same accumulation). Chosen when it is faster on the
  geometric mean of the probes and not clearly slower at any.
- ``upcast_min_tokens``: from how many tokens fp32 math over weights upcast on the fly beats
  the bf16 GEMM (CPUs without native bf16; on AVX512-BF16 or AMX it never does: None).

The answer is a property of the machine and the shape, cached per process.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokenmill.engine.models.config import ModelConfig

# Token counts probed, increasing: single-stream decode, decode batches, prefill chunks.
PROBE_TOKENS = (1, 8, 64, 256)
_REPEATS = 5
# The upcast must win clearly: where it matters (no native bf16) it won 5-8x from T=8 on,
# while one noisy probe on a shared machine once made it "win" on AVX512-BF16 (3x slower).
_UPCAST_MARGIN = 1.5
_PACK_SLACK = 1.25  # a probe this much slower with packing means packing is not for here


@dataclass(frozen=True)
class LinearPlan:
    packed: bool = False
    upcast_min_tokens: int | None = None


def bf16_linear_plan(config: ModelConfig, dtype: torch.dtype, device: torch.device) -> LinearPlan:
    """The measured plan for bf16 on a CPU; the default plan (plain ``F.linear``) otherwise."""
    if dtype != torch.bfloat16 or device.type != "cpu":
        return LinearPlan()
    return _measure_one_thread(2 * config.intermediate_size, config.hidden_size)


def _measure_one_thread(out_features: int, in_features: int) -> LinearPlan:
    """Measured on one thread: the choice is about kernels, not threading, and a thread
    descheduled by another process stalls every multi-threaded op until it runs again, which
    made 2-thread probes on the shared 2-core box flip the answer from run to run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _measure(out_features, in_features)
    finally:
        torch.set_num_threads(threads)


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] bf16 -> an opaque oneDNN tensor for ``packed_linear``."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, 1)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None):
    """[T, in] @ packed[out, in]^T (+ bias) -> [T, out], as ``F.linear`` computes it."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@functools.cache
def _measure(out_features: int, in_features: int) -> LinearPlan:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(out_features, in_features, generator=g).bfloat16()  # [out, in]
    packed = _try_pack(weight)
    plain, upcast, fast = [], [], []
    for num_tokens in PROBE_TOKENS:
        x = torch.randn(num_tokens, in_features, generator=g).bfloat16()  # [T, in]
        best = _best_seconds_interleaved(_candidates(x, weight, packed))
        plain.append(best[0])
        upcast.append(best[1])
        fast.append(best[-1])
    pack = packed is not None and _packing_wins(fast, plain)
    return LinearPlan(pack, _upcast_threshold(fast if pack else plain, upcast))


def _candidates(x, weight, packed) -> list:
    """plain bf16 GEMM, fp32 upcast, packed (if any): timed in turns, so that noise on a
    shared machine hits all alike."""
    fns = [lambda: F.linear(x, weight), lambda: F.linear(x.float(), weight.float()).bfloat16()]
    if packed is not None:
        fns.append(lambda: packed_linear(x, packed, None))
    return fns


def _packing_wins(packed: list[float], plain: list[float]) -> bool:
    """Faster on the geometric mean of the probes and not clearly slower at any one (a single
    noisy probe on a shared machine must not flip the choice)."""
    ratios = [a / b for a, b in zip(packed, plain, strict=True)]
    return math.prod(ratios) < 1.0 and max(ratios) <= _PACK_SLACK


def _upcast_threshold(native: list[float], upcast: list[float]) -> int | None:
    """The smallest probe from which the upcast wins (by ``_UPCAST_MARGIN``) at every larger
    probe, else None."""
    threshold = None
    for i in reversed(range(len(PROBE_TOKENS))):
        if upcast[i] * _UPCAST_MARGIN >= native[i]:
            break
        threshold = PROBE_TOKENS[i]
    return threshold


def _try_pack(weight: torch.Tensor) -> torch.Tensor | None:
    """None where this torch build has no oneDNN bf16 linear (or it disagrees with F.linear)."""
    try:
        packed = pack_weight(weight)
        x = torch.ones(3, weight.shape[1], dtype=weight.dtype)
        if not torch.equal(packed_linear(x, packed, None), F.linear(x, weight)):
            return None
        return packed
    except (RuntimeError, AttributeError):
        return None


def _best_seconds_interleaved(fns) -> list[float]:
    """Best of ``_REPEATS`` runs of each function, the functions taking turns."""
    best = [float("inf")] * len(fns)
    with torch.inference_mode():
        for fn in fns:
            fn()  # first call pays oneDNN's kernel selection
        for _ in range(_REPEATS):
            for i, fn in enumerate(fns):
                start = time.perf_counter()
                fn()
                best[i] = min(best[i], time.perf_counter() - start)
    return best
