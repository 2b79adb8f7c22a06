"""Oracle tests: the reference forward pass against transformers on tiny random checkpoints,
both on ``TEST_DEVICE``.

Tolerance: fp32 logits within 1e-4 absolute of transformers' (observed ~5e-6 on these
models, whose logits are O(1)); greedy tokens identical for 20 new tokens.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers.tiny_models import FAMILIES, TEST_DEVICE, make_tiny_hf_model, tiny_tokenizer

from tokenmill.engine.models.config import RopeScaling
from tokenmill.engine.models.hf_loader import load_hf_model, read_hf_config, read_hf_weights
from tokenmill.engine.models.registry import build_model
from tokenmill.engine.reference import greedy_generate, reference_logits

transformers = pytest.importorskip("transformers")

LOGITS_ATOL = 1e-4
NUM_NEW_TOKENS = 20
TEXTS = ["Hello", "The capital of France is", "def add(a, b): return a + b  # 12345 café 🙂"]
VARIANTS = [(family, None) for family in FAMILIES] + [("llama2", True), ("qwen3", True)]


def _prompts() -> list[list[int]]:
    return [tiny_tokenizer().encode(text).ids for text in TEXTS]


def _hf_model(model_dir: Path):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    )
    model.generation_config.eos_token_id = None  # generate exactly NUM_NEW_TOKENS
    return model.to(TEST_DEVICE).eval()


def _hf_greedy(hf_model, prompt: list[int]) -> list[int]:
    ids = torch.tensor([prompt], device=TEST_DEVICE)
    out = hf_model.generate(ids, max_new_tokens=NUM_NEW_TOKENS, do_sample=False, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize(("family", "tie"), VARIANTS)
def test_reference_matches_transformers(tmp_path, family, tie):
    model_dir = make_tiny_hf_model(tmp_path, family, tie=tie)
    config, model = load_hf_model(model_dir, device=TEST_DEVICE)
    hf_model = _hf_model(model_dir)
    assert config.tie_word_embeddings == hf_model.config.tie_word_embeddings
    prompts = _prompts()
    assert sorted({len(p) for p in prompts}) == [
        len(p) for p in prompts
    ]  # distinct lengths: padded
    ours = reference_logits(model, prompts)
    with torch.no_grad():
        expected = [hf_model(torch.tensor([p], device=TEST_DEVICE)).logits[0] for p in prompts]
    for prompt, got, want in zip(prompts, ours, expected, strict=True):
        assert got.dtype == torch.float32 and got.shape == (len(prompt), config.vocab_size)
        assert (got - want).abs().max().item() < LOGITS_ATOL
    generated = greedy_generate(model, prompts, NUM_NEW_TOKENS, eos_token_ids=())
    assert generated == [_hf_greedy(hf_model, p) for p in prompts]


def test_llama3_rope_scaling_is_exercised(tmp_path):
    """The llama3 variant's logits would fail the tolerance without the frequency scaling."""
    model_dir = make_tiny_hf_model(tmp_path, "llama3")
    config, model = load_hf_model(model_dir)
    assert config.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 64)
    plain = build_model(replace(config, rope_scaling=RopeScaling()), read_hf_weights(model_dir))
    prompt = [list(range(4, 60))]
    diff = (reference_logits(model, prompt)[0] - reference_logits(plain, prompt)[0]).abs().max()
    assert diff.item() > 100 * LOGITS_ATOL


def test_sharded_load_equals_unsharded(tmp_path):
    single = make_tiny_hf_model(tmp_path, "qwen2", tie=False)
    sharded = make_tiny_hf_model(tmp_path, "qwen2", tie=False, max_shard_size="40KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (sharded / "model.safetensors").exists()
    assert read_hf_config(sharded) == read_hf_config(single)
    a, b = read_hf_weights(single), read_hf_weights(sharded)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[name], b[name]) for name in a)
    prompts = _prompts()
    logits_a = reference_logits(load_hf_model(single)[1], prompts)
    logits_b = reference_logits(load_hf_model(sharded)[1], prompts)
    assert all(torch.equal(x, y) for x, y in zip(logits_a, logits_b, strict=True))


@pytest.mark.parametrize(
    ("family", "expected"),
    [
        ("llama2", dict(architecture="llama", head_dim=16, rope_theta=10000.0, num_kv_heads=2)),
        (
            "smollm2",
            dict(
                architecture="llama",
                rope_theta=100000.0,
                num_kv_heads=1,
                num_layers=3,
                tie_word_embeddings=True,
            ),
        ),
        ("mistral", dict(architecture="mistral", attention_bias=False, qk_norm=False)),
        ("qwen2", dict(architecture="qwen2", attention_bias=True, rope_theta=1000000.0)),
        ("qwen3", dict(architecture="qwen3", head_dim=32, qk_norm=True, attention_bias=False)),
    ],
)
def test_read_hf_config_fields(tmp_path, family, expected):
    config = read_hf_config(make_tiny_hf_model(tmp_path, family))
    assert {key: getattr(config, key) for key in expected} == expected
    # config.json eos (</s> = 3) and generation_config.json eos ([<|im_end|> = 1, </s> = 3]).
    assert config.eos_token_ids == (3, 1) and config.bos_token_id == 2
    assert (config.vocab_size, config.hidden_size, config.max_position_embeddings) == (336, 64, 256)
    assert config.rms_norm_eps == 1e-5


def test_legacy_llama3_rope_scaling_and_eos_list(tmp_path):
    """Pre-transformers-5 configs: top-level rope_theta and a ``rope_scaling`` dict."""
    model_dir = make_tiny_hf_model(tmp_path, "llama2")
    raw = json.loads((model_dir / "config.json").read_text())
    raw.update(
        rope_theta=500000.0,
        eos_token_id=[7, 3],
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    (model_dir / "config.json").write_text(json.dumps(raw))
    (model_dir / "generation_config.json").unlink()
    config = read_hf_config(model_dir)
    assert config.rope_theta == 500000.0
    assert config.rope_scaling == RopeScaling("llama3", 32.0, 1.0, 4.0, 8192)
    assert config.eos_token_ids == (7, 3)
