"""The dtype-dependent compute paths of the Llama model and the paged decode fast path.

- ``llama.linear``: fp32 is exactly ``F.linear``; CPU bf16 below ``BF16_UPCAST_MIN_TOKENS``
  rows is exactly the bf16 GEMM, at or above it exactly fp32 math rounded to bf16; with
  oneDNN-packed weights exactly the bf16 GEMM (the same values as ``F.linear``).
- the machine's plan (``tuning``): the upcast threshold rule, and models built with every
  plan giving the same bf16 logits within one rounding.
- bf16 engine (prefill through the fp32 upcast, decode through bf16 GEMVs) against the fp32
  engine on a tiny model: logits within ``BF16_ATOL`` = 0.25, greedy tokens equal for the
  first 4 steps. The tiny model's logits reach |4.4|, where one bf16 rounding alone is up to
  0.016; the largest difference measured over 4 prompts x 4 steps was 0.14.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from helpers.tiny_models import TEST_DEVICE

from tokenmill.core.sampling import SamplingParams
from tokenmill.engine.executor.model_runner import ModelRunner, StepSeq
from tokenmill.engine.executor.paged_attention import PagedAttention
from tokenmill.engine.loader import load_model
from tokenmill.engine.models import llama, tuning
from tokenmill.engine.models.hf_loader import read_hf_config, read_hf_weights
from tokenmill.engine.models.llama import LlamaForCausalLM
from tokenmill.engine.models.tuning import LinearPlan

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


def _model_with_plan(path, plan: LinearPlan) -> LlamaForCausalLM:
    model = LlamaForCausalLM(read_hf_config(path), dtype=torch.bfloat16, plan=plan)
    model.load_weights(read_hf_weights(path))
    return model.eval()


@pytest.mark.skipif(TEST_DEVICE != "cpu", reason="CPU bf16 plans")
def test_bf16_plans_agree(models, tiny_model_dir):
    """Every plan accumulates in fp32 and rounds each matmul once to bf16; only summation
    order may differ, so the prefill logits agree within one bf16 rounding at |logit| < 4
    (measured bit-identical on this tiny model)."""
    path = tiny_model_dir("smollm2")
    prompt = torch.randint(4, 300, (33,), generator=torch.Generator().manual_seed(4)).tolist()
    base = models["bf16"]
    logits = []
    for plan in (LinearPlan(False, 8), LinearPlan(False, None), LinearPlan(True, None)):
        if plan.packed and tuning._try_pack(torch.ones(4, 4, dtype=torch.bfloat16)) is None:
            continue  # no oneDNN bf16 linear in this torch build
        loaded = dataclasses.replace(base, model=_model_with_plan(path, plan))
        logits.append(_greedy_with_logits(loaded, prompt, 1)[1][0])
    for other in logits[1:]:
        torch.testing.assert_close(other, logits[0], atol=0.016, rtol=0)


@pytest.mark.parametrize("num_tokens", [1, 7, 64])
def test_packed_linear_is_bf16_gemm(num_tokens):
    x, w, b = _operands(num_tokens, torch.bfloat16)
    packed = tuning._try_pack(w)
    if packed is None:
        pytest.skip("no oneDNN bf16 linear in this torch build")
    assert torch.equal(llama.linear(x, w, b, None, packed), F.linear(x, w, b))
    # the packed path also serves T below the upcast threshold
    assert torch.equal(llama.linear(x, w, None, 1 << 30, packed), F.linear(x, w))


def test_upcast_threshold_rule():
    # probes (1, 8, 64, 256): the upcast must win clearly at a probe and every larger one
    assert tuning._upcast_threshold([1, 1, 1, 1], [2, 2, 2, 2]) is None
    assert tuning._upcast_threshold([1, 2, 4, 9], [2, 1, 2, 5]) == 8
    assert tuning._upcast_threshold([1, 2, 4, 9], [2, 1, 5, 5]) == 256
    assert tuning._upcast_threshold([4, 2, 4, 9], [2, 1, 2, 5]) == 1
    assert tuning._upcast_threshold([3, 2, 4, 9], [2.5, 1.5, 3, 7]) is None  # noise, not a win


def test_packing_rule():
    assert tuning._packing_wins([1, 2, 4, 10], [2, 3, 4, 9])  # faster overall, within slack
    assert not tuning._packing_wins([1, 2, 4, 20], [2, 3, 4, 9])  # one probe much slower
    assert not tuning._packing_wins([2, 3, 4, 9], [2, 3, 4, 9])  # no gain


def test_plan_is_default_outside_cpu_bf16(models):
    config = models["fp32"].config
    assert tuning.bf16_linear_plan(config, torch.float32, torch.device("cpu")) == LinearPlan()
    assert tuning.bf16_linear_plan(config, torch.bfloat16, torch.device("cuda")) == LinearPlan()


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
