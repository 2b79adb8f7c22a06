"""The dtype-dependent compute paths of the Llama model and the paged decode fast path.

- ``llama.linear``: fp32 is exactly ``F.linear``; CPU bf16 below ``BF16_UPCAST_MIN_TOKENS``
  rows is exactly the bf16 GEMM, at or above it exactly fp32 math rounded to bf16.
- bf16 engine (prefill through the fp32 upcast, decode through bf16 GEMVs) against the fp32
  engine on a tiny model: logits within ``BF16_ATOL`` = 0.25, greedy tokens equal for the
  first 4 steps. The tiny model's logits reach |4.4|, where one bf16 rounding alone is up to
  0.016; the largest difference measured over 4 prompts x 4 steps was 0.14.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers.tiny_models import TEST_DEVICE

from tokenmill.core.sampling import SamplingParams
from tokenmill.engine.executor.model_runner import ModelRunner, StepSeq
from tokenmill.engine.executor.paged_attention import PagedAttention
from tokenmill.engine.loader import load_model
from tokenmill.engine.models import llama

BF16_ATOL = 0.25
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def _operands(num_tokens: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(num_tokens)
    x = torch.randn(num_tokens, 48, generator=g).to(dtype)  # [T, in]
    w = torch.randn(40, 48, generator=g).to(dtype)  # [out, in]
    b = torch.randn(40, generator=g).to(dtype)  # [out]
    return x, w, b


@pytest.mark.parametrize("num_tokens", [1, llama.BF16_UPCAST_MIN_TOKENS, 64])
def test_fp32_linear_is_f_linear(num_tokens):
    x, w, b = _operands(num_tokens, torch.float32)
    assert torch.equal(llama.linear(x, w, b), F.linear(x, w, b))


def test_bf16_linear_below_threshold_is_bf16_gemm():
    x, w, b = _operands(llama.BF16_UPCAST_MIN_TOKENS - 1, torch.bfloat16)
    out = llama.linear(x, w, b)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, F.linear(x, w, b))


@pytest.mark.parametrize("num_tokens", [llama.BF16_UPCAST_MIN_TOKENS, 64])
def test_bf16_linear_at_threshold_is_fp32_math_rounded(num_tokens):
    x, w, b = _operands(num_tokens, torch.bfloat16)
    out = llama.linear(x, w, b)
    assert out.dtype == torch.bfloat16
    expected = F.linear(x.float(), w.float(), b.float()).to(torch.bfloat16)
    assert torch.equal(out, expected)
    assert torch.equal(llama.linear(x, w), F.linear(x.float(), w.float()).to(torch.bfloat16))


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    path = tiny_model_dir("smollm2")
    return {d: load_model(path, dtype=d, device=TEST_DEVICE) for d in ("fp32", "bf16")}


def _greedy_with_logits(loaded, prompt: list[int], steps: int):
    """Prefill ``prompt`` in one forward, then ``steps - 1`` decode forwards (greedy)."""
    runner = ModelRunner(loaded.model, loaded.config, 16, 4, loaded.dtype, loaded.device)
    table, ids, logits, tokens = list(range(16)), list(prompt), [], []
    new, computed = list(prompt), 0
    for _ in range(steps):
        seq = StepSeq("s", new, computed, table, True, GREEDY, prompt, tokens)
        row = runner.forward_logits([seq])[0]  # [V]
        logits.append(row)
        tokens.append(int(row.argmax()))
        computed, new = len(ids), [tokens[-1]]
        ids.append(tokens[-1])
    return tokens, logits


def test_bf16_prefill_and_decode_close_to_fp32(models):
    prompt = torch.randint(4, 300, (21,), generator=torch.Generator().manual_seed(3)).tolist()
    assert len(prompt) >= llama.BF16_UPCAST_MIN_TOKENS  # the prefill takes the upcast path
    tokens32, logits32 = _greedy_with_logits(models["fp32"], prompt, 4)
    tokens16, logits16 = _greedy_with_logits(models["bf16"], prompt, 4)
    assert tokens16 == tokens32
    for a, b in zip(logits16, logits32, strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=BF16_ATOL, rtol=0)


def test_bf16_prefill_upcast_agrees_with_bf16_gemm(models, monkeypatch):
    """Both paths accumulate in fp32 and round each matmul once to bf16; only summation
    order may differ, so the prefill logits agree within one bf16 rounding at |logit| < 4
    (measured bit-identical on this tiny model)."""
    prompt = torch.randint(4, 300, (33,), generator=torch.Generator().manual_seed(4)).tolist()
    upcast = _greedy_with_logits(models["bf16"], prompt, 1)[1][0]
    monkeypatch.setattr(llama, "BF16_UPCAST_MIN_TOKENS", 1 << 30)
    gemm = _greedy_with_logits(models["bf16"], prompt, 1)[1][0]
    torch.testing.assert_close(upcast, gemm, atol=0.016, rtol=0)


def test_pure_decode_flag_and_free():
    attn = PagedAttention(2, 8, 4, 1, 8, torch.float32, decode_group_size=2)
    attn.prepare([(5, 1, [0, 1]), (2, 1, [2])])
    assert attn._layout.pure_decode
    attn.prepare([(5, 1, [0, 1]), (0, 3, [2])])  # a prefill row: general path
    assert not attn._layout.pure_decode
    attn.prepare([(5, 1, [0, 1]), (2, 1, [2]), (1, 1, [3])])  # two decode groups
    assert not attn._layout.pure_decode
    attn.free()
    assert attn.k_cache == [] and attn.v_cache == []
