"""Every way an HF model directory can be wrong gives a ModelLoadError naming file and problem."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers.tiny_models import make_tiny_hf_model

from tokenmill.core.errors import ModelLoadError
from tokenmill.engine.models.hf_loader import load_hf_model, read_hf_config, read_hf_weights
from tokenmill.engine.models.registry import build_model, get_model_class


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("base")
    return {
        "single": make_tiny_hf_model(root, "llama2"),
        "sharded": make_tiny_hf_model(root, "llama2", max_shard_size="40KB"),
    }


@pytest.fixture
def model_dir(base_dirs, tmp_path) -> Path:
    return Path(shutil.copytree(base_dirs["single"], tmp_path / "model"))


@pytest.fixture
def sharded_dir(base_dirs, tmp_path) -> Path:
    return Path(shutil.copytree(base_dirs["sharded"], tmp_path / "sharded"))


def _edit_config(model_dir: Path, **changes) -> Path:
    path = model_dir / "config.json"
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))
    return path


def _raises(match: str):
    return pytest.raises(ModelLoadError, match=re.escape(match))


def test_missing_directory(tmp_path):
    with _raises(f"model path not found: {tmp_path / 'nope'}"):
        read_hf_config(tmp_path / "nope")
    with _raises(f"model path not found: {tmp_path / 'nope'}"):
        read_hf_weights(tmp_path / "nope")


def test_path_is_a_file(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    with _raises(f"{tmp_path / 'model.gguf'}: not a directory"):
        read_hf_config(tmp_path / "model.gguf")


def test_missing_or_invalid_config_json(model_dir):
    (model_dir / "config.json").write_text("{not json")
    with _raises(f"{model_dir / 'config.json'}: not valid JSON"):
        read_hf_config(model_dir)
    (model_dir / "config.json").unlink()
    with _raises(f"{model_dir / 'config.json'}: file not found"):
        read_hf_config(model_dir)


def test_missing_required_field(model_dir):
    raw = json.loads((model_dir / "config.json").read_text())
    del raw["intermediate_size"]
    (model_dir / "config.json").write_text(json.dumps(raw))
    with _raises(f"{model_dir / 'config.json'}: required field 'intermediate_size' is missing"):
        read_hf_config(model_dir)


def test_unsupported_architecture(model_dir):
    path = _edit_config(model_dir, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    expected = (
        f"{path}: unsupported architecture GPT2LMHeadModel (supported: LlamaForCausalLM, "
        f"MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM)"
    )
    with _raises(expected):
        read_hf_config(model_dir)
    with _raises("unsupported model architecture 'gpt2' (supported: llama, mistral, qwen2, qwen3)"):
        get_model_class("gpt2")


def test_model_type_fallback_without_architectures(model_dir):
    _edit_config(model_dir, architectures=None, model_type="mistral")
    assert read_hf_config(model_dir).architecture == "mistral"


@pytest.mark.parametrize(
    "changes",
    [
        dict(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=32),
        dict(
            architectures=["Qwen2ForCausalLM"],
            model_type="qwen2",
            sliding_window=32,
            use_sliding_window=True,
            layer_types=["full_attention", "sliding_attention"],
        ),
    ],
)
def test_sliding_window_in_effect_is_refused(model_dir, changes):
    path = _edit_config(model_dir, **changes)
    with _raises(
        f"{path}: sliding window attention is not supported yet (sliding_window=32 < "
        f"max_position_embeddings=256)"
    ):
        read_hf_config(model_dir)


@pytest.mark.parametrize(
    "changes",
    [
        dict(architectures=["MistralForCausalLM"], sliding_window=4096),  # window >= context
        dict(architectures=["MistralForCausalLM"], sliding_window=None),
        dict(architectures=["Qwen2ForCausalLM"], sliding_window=32, use_sliding_window=False),
        dict(
            architectures=["Qwen3ForCausalLM"],
            sliding_window=32,
            use_sliding_window=True,
            layer_types=["full_attention", "full_attention"],
        ),
    ],
)
def test_sliding_window_not_in_effect_is_accepted(model_dir, changes):
    _edit_config(model_dir, **changes)
    assert read_hf_config(model_dir).num_layers == 2


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            dict(rope_scaling={"type": "yarn", "factor": 4.0}),
            "rope scaling type 'yarn' is not supported (supported: default, llama3)",
        ),
        (
            dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}),
            "llama3 rope scaling is missing low_freq_factor, high_freq_factor, "
            "original_max_position_embeddings",
        ),
        (dict(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
        (dict(mlp_bias=True), "mlp_bias=true is not supported"),
        (dict(attention_bias=True), "attention_bias=true"),
        (
            dict(num_key_value_heads=3),
            "num_attention_heads 4 is not a multiple of num_key_value_heads 3",
        ),
    ],
)
def test_unsupported_config_features(model_dir, changes, message):
    path = _edit_config(model_dir, **changes)
    with _raises(f"{path}: {message}"):
        read_hf_config(model_dir)


def test_no_safetensors(model_dir):
    (model_dir / "model.safetensors").unlink()
    with _raises(f"{model_dir}: no model.safetensors or model.safetensors.index.json"):
        read_hf_weights(model_dir)


def test_truncated_safetensors(model_dir):
    path = model_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with _raises(f"{path}: cannot read safetensors file, truncated or corrupt"):
        read_hf_weights(model_dir)
    path.write_bytes(data[:6])
    with _raises(f"{path}: cannot read safetensors file, truncated or corrupt"):
        read_hf_weights(model_dir)


def test_index_with_missing_shard(sharded_dir):
    index = sharded_dir / "model.safetensors.index.json"
    shard = sorted(set(json.loads(index.read_text())["weight_map"].values()))[-1]
    (sharded_dir / shard).unlink()
    with _raises(f"{index}: shard {shard} listed in the index is missing"):
        read_hf_weights(sharded_dir)


def test_corrupt_index(sharded_dir):
    index = sharded_dir / "model.safetensors.index.json"
    raw = json.loads(index.read_text())
    raw["weight_map"]["model.layers.9.mlp.up_proj.weight"] = next(iter(raw["weight_map"].values()))
    index.write_text(json.dumps(raw))
    with _raises(
        "tensor model.layers.9.mlp.up_proj.weight listed in model.safetensors.index.json "
        "is not in the file"
    ):
        read_hf_weights(sharded_dir)
    index.write_text('{"weight_map": ')
    with _raises(f"{index}: not valid JSON"):
        read_hf_weights(sharded_dir)
    index.write_text('{"metadata": {}}')
    with _raises(f"{index}: no 'weight_map' object"):
        read_hf_weights(sharded_dir)


def test_config_weights_shape_mismatch(model_dir):
    _edit_config(model_dir, intermediate_size=96)
    with _raises(
        f"{model_dir}: tensor model.layers.0.mlp.gate_proj.weight has shape [128, 64] "
        f"but the config expects [96, 64]"
    ):
        load_hf_model(model_dir)


def test_missing_and_unexpected_tensors(model_dir):
    config, weights = read_hf_config(model_dir), read_hf_weights(model_dir)
    missing = dict(weights)
    del missing["model.layers.1.self_attn.k_proj.weight"]
    with _raises("missing tensor(s) in checkpoint: model.layers.1.self_attn.k_proj.weight"):
        build_model(config, missing)
    extra = {**weights, "model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}
    with _raises(
        "unexpected tensor(s) in checkpoint (not used by this architecture/config): "
        "model.layers.0.self_attn.q_proj.bias"
    ):
        build_model(config, extra)
    del weights["lm_head.weight"]  # an untied config needs its output embedding
    with _raises("missing tensor(s) in checkpoint: lm_head.weight"):
        build_model(config, weights)


def test_tied_model_ignores_redundant_lm_head_and_rotary_buffers(model_dir):
    config, weights = read_hf_config(model_dir), read_hf_weights(model_dir)
    tied = replace(config, tie_word_embeddings=True)
    weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    model = build_model(tied, weights)
    assert model.lm_head is None
    assert torch.equal(model.embed_tokens, weights["model.embed_tokens.weight"])
