"""The reference oracle against itself: padding, incremental decoding, eos, bf16, limits
(model on ``TEST_DEVICE``)."""

from __future__ import annotations

import pytest
import torch
from helpers.tiny_models import TEST_DEVICE, tiny_tokenizer

from tokenmill.engine.models.hf_loader import load_hf_model
from tokenmill.engine.reference import ContiguousKVCache, greedy_generate, reference_logits

TEXTS = ["Hi", "The quick brown fox", "Once upon a time, a small model learned to count: 1, 2, 3"]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("qwen3")


@pytest.fixture(scope="module")
def model(model_dir):
    return load_hf_model(model_dir, device=TEST_DEVICE)[1]


@pytest.fixture(scope="module")
def prompts():
    return [tiny_tokenizer().encode(text).ids for text in TEXTS]


def test_padded_batch_equals_each_sequence_alone(model, prompts):
    batched = reference_logits(model, prompts)
    for prompt, logits in zip(prompts, batched, strict=True):
        alone = reference_logits(model, [prompt])[0]
        assert logits.shape == alone.shape == (len(prompt), model.config.vocab_size)
        assert torch.allclose(logits, alone, atol=1e-5, rtol=0)
        assert torch.isfinite(logits).all()


def test_incremental_decoding_equals_full_recompute(model, prompts):
    """Each generated token is the argmax of a fresh full forward over prompt + tokens so far."""
    generated = greedy_generate(model, prompts, 12, eos_token_ids=())
    full = reference_logits(model, [p + g for p, g in zip(prompts, generated, strict=True)])
    for prompt, new, logits in zip(prompts, generated, full, strict=True):
        assert len(new) == 12
        assert logits[len(prompt) - 1 : -1].argmax(dim=-1).tolist() == new


def test_eos_ends_a_sequence_and_is_included(model, prompts):
    free = greedy_generate(model, prompts, 10, eos_token_ids=())
    eos = free[1][4]
    stopped = greedy_generate(model, prompts, 10, eos_token_ids={eos, 10_000})
    for free_run, run in zip(free, stopped, strict=True):
        cut = free_run.index(eos) + 1 if eos in free_run else len(free_run)
        assert run == free_run[:cut]
    assert stopped[1][-1] == eos and len(stopped[1]) <= 5


def test_zero_new_tokens_and_invalid_inputs(model, prompts):
    assert greedy_generate(model, prompts, 0, eos_token_ids=()) == [[], [], []]
    assert greedy_generate(model, prompts[:1], 1, eos_token_ids=()) == [
        [reference_logits(model, prompts[:1])[0][-1].argmax().item()]
    ]
    with pytest.raises(ValueError, match="at least one token"):
        reference_logits(model, [[1, 2], []])
    with pytest.raises(ValueError, match="at least one token"):
        greedy_generate(model, [], 3, eos_token_ids=())
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_generate(model, prompts, -1, eos_token_ids=())


def test_cache_refuses_a_forward_that_does_not_fit(model):
    cache = ContiguousKVCache(model.config, 2, 4, torch.float32, TEST_DEVICE)
    cache.begin_forward(torch.ones(2, 3, dtype=torch.bool, device=TEST_DEVICE))
    assert cache.num_slots == 3
    with pytest.raises(ValueError, match="does not fit"):
        cache.begin_forward(torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="does not fit"):
        cache.begin_forward(torch.ones(3, 1, dtype=torch.bool))


def test_bf16_load_runs_and_agrees_with_fp32_at_first(model_dir, model, prompts):
    _, bf16 = load_hf_model(model_dir, dtype=torch.bfloat16, device=TEST_DEVICE)
    assert bf16.embed_tokens.dtype == torch.bfloat16
    assert bf16.inv_freq.dtype == torch.float32  # rotary stays fp32 (ARCHITECTURE.md)
    logits = reference_logits(bf16, prompts)
    assert all(x.dtype == torch.float32 and torch.isfinite(x).all() for x in logits)
    first_bf16 = [g[:3] for g in greedy_generate(bf16, prompts, 3, eos_token_ids=())]
    first_fp32 = [g[:3] for g in greedy_generate(model, prompts, 3, eos_token_ids=())]
    assert first_bf16 == first_fp32
