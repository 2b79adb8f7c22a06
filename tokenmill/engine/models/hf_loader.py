"""Load a Hugging Face model directory: config.json (+ generation_config.json) and safetensors.

Reads exactly what the Llama-family model needs and refuses, with a ModelLoadError naming the
file and the problem, anything it would silently get wrong: unknown architectures, sliding
window attention actually in effect, rope scaling types other than llama3, biases on the
output or MLP projections, activations other than SiLU. Tokenizer files are read elsewhere.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from tokenmill.core.errors import ModelLoadError
from tokenmill.engine.models.config import ModelConfig, RopeScaling
from tokenmill.engine.models.registry import build_model

# HF ``architectures`` entry -> registry key; ``model_type`` is the fallback.
HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3"}
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def load_hf_model(
    model_dir: Path | str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> tuple[ModelConfig, nn.Module]:
    """read_hf_config + read_hf_weights + build_model; errors are prefixed with the directory."""
    config = read_hf_config(Path(model_dir))
    weights = read_hf_weights(Path(model_dir))
    try:
        return config, build_model(config, weights, dtype, device)
    except ModelLoadError as err:
        raise ModelLoadError(f"{model_dir}: {err}") from None


def read_hf_config(model_dir: Path) -> ModelConfig:
    """ModelConfig from ``config.json`` (eos/bos also from ``generation_config.json``)."""
    model_dir = _check_dir(Path(model_dir))
    path = model_dir / "config.json"
    raw = _read_json(path)
    generation_path = model_dir / "generation_config.json"
    generation = _read_json(generation_path) if generation_path.is_file() else {}
    architecture = _architecture(raw, path)
    _reject_unsupported(raw, architecture, path)
    return _model_config(raw, generation, architecture, path)


def _model_config(raw: dict, generation: dict, architecture: str, path: Path) -> ModelConfig:
    num_heads = _require(raw, "num_attention_heads", path)
    hidden_size = _require(raw, "hidden_size", path)
    num_kv_heads = raw.get("num_key_value_heads") or num_heads
    if num_heads % num_kv_heads:
        raise ModelLoadError(
            f"{path}: num_attention_heads {num_heads} is not a multiple of "
            f"num_key_value_heads {num_kv_heads}"
        )
    rope_theta, rope_scaling = _rope(raw, path)
    return ModelConfig(
        architecture=architecture,
        vocab_size=_require(raw, "vocab_size", path),
        hidden_size=hidden_size,
        intermediate_size=_require(raw, "intermediate_size", path),
        num_layers=_require(raw, "num_hidden_layers", path),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=raw.get("head_dim") or hidden_size // num_heads,
        max_position_embeddings=_require(raw, "max_position_embeddings", path),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=architecture == "qwen2",  # transformers' Qwen2 hard-codes q/k/v bias
        qk_norm=architecture == "qwen3",
        bos_token_id=_first_id(raw.get("bos_token_id"), generation.get("bos_token_id")),
        eos_token_ids=_token_ids(raw.get("eos_token_id"), generation.get("eos_token_id")),
    )


def _check_dir(model_dir: Path) -> Path:
    if not model_dir.exists():
        raise ModelLoadError(f"model path not found: {model_dir}")
    if not model_dir.is_dir():
        raise ModelLoadError(
            f"{model_dir}: not a directory (expected a Hugging Face model "
            f"directory with config.json and *.safetensors)"
        )
    return model_dir


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ModelLoadError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _require(raw: dict, key: str, path: Path) -> Any:
    if raw.get(key) is None:
        raise ModelLoadError(f"{path}: required field {key!r} is missing")
    return raw[key]


def _architecture(raw: dict, path: Path) -> str:
    names = raw.get("architectures") or []
    for name in names:
        if name in HF_ARCHITECTURES:
            return HF_ARCHITECTURES[name]
    if not names and raw.get("model_type") in _MODEL_TYPES:
        return raw["model_type"]
    found = ", ".join(names) or f"model_type {raw.get('model_type')!r}"
    raise ModelLoadError(
        f"{path}: unsupported architecture {found} (supported: {', '.join(HF_ARCHITECTURES)})"
    )


def _reject_unsupported(raw: dict, architecture: str, path: Path) -> None:
    if _sliding_window_in_effect(raw):
        raise ModelLoadError(
            f"{path}: sliding window attention is not supported yet (sliding_window="
            f"{raw['sliding_window']} < max_position_embeddings={raw.get('max_position_embeddings')})"
        )
    if raw.get("hidden_act", "silu") != "silu":
        raise ModelLoadError(
            f"{path}: hidden_act {raw['hidden_act']!r} is not supported (silu only)"
        )
    if raw.get("mlp_bias"):
        raise ModelLoadError(f"{path}: mlp_bias=true is not supported")
    if architecture != "qwen2" and raw.get("attention_bias"):
        raise ModelLoadError(
            f"{path}: attention_bias=true (bias on q/k/v/o projections) is not "
            f"supported for {architecture}"
        )


def _sliding_window_in_effect(raw: dict) -> bool:
    """A window set, smaller than the context, and not switched off (Qwen's flag/layer types)."""
    window, max_positions = raw.get("sliding_window"), raw.get("max_position_embeddings")
    if window is None or (max_positions is not None and window >= max_positions):
        return False
    if raw.get("use_sliding_window") is False:
        return False
    layer_types = raw.get("layer_types")
    return layer_types is None or "sliding_attention" in layer_types


def _rope(raw: dict, path: Path) -> tuple[float, RopeScaling]:
    """rope_theta and scaling from ``rope_parameters`` (transformers >= 5) or the legacy
    top-level ``rope_theta`` + ``rope_scaling``."""
    params = {**(raw.get("rope_scaling") or {}), **(raw.get("rope_parameters") or {})}
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ModelLoadError(f"{path}: partial_rotary_factor != 1 is not supported")
    if rope_type == "default":
        return theta, RopeScaling()
    if rope_type != "llama3":
        raise ModelLoadError(
            f"{path}: rope scaling type {rope_type!r} is not supported (supported: default, llama3)"
        )
    missing = [key for key in _LLAMA3_KEYS if params.get(key) is None]
    if missing:
        raise ModelLoadError(f"{path}: llama3 rope scaling is missing {', '.join(missing)}")
    values = {key: params[key] for key in _LLAMA3_KEYS}
    return theta, RopeScaling(rope_type="llama3", **values)


def _token_ids(*values: int | list[int] | None) -> tuple[int, ...]:
    """Union of int-or-list token id fields, in order of first appearance."""
    ids: list[int] = []
    for value in values:
        for token_id in [value] if isinstance(value, int) else (value or []):
            if token_id not in ids:
                ids.append(token_id)
    return tuple(ids)


def _first_id(*values: int | list[int] | None) -> int | None:
    ids = _token_ids(*values)
    return ids[0] if ids else None


def read_hf_weights(model_dir: Path) -> dict[str, Tensor]:
    """All tensors of ``model.safetensors``, or of the shards listed by
    ``model.safetensors.index.json`` (the index wins when both exist), on the CPU."""
    model_dir = _check_dir(Path(model_dir))
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return _read_sharded(model_dir, index)
    single = model_dir / "model.safetensors"
    if single.is_file():
        return _read_safetensors(single)
    raise ModelLoadError(
        f"{model_dir}: no model.safetensors or model.safetensors.index.json "
        f"(only safetensors checkpoints are supported)"
    )


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelLoadError(
            f"{path}: cannot read safetensors file, truncated or corrupt ({err})"
        ) from None


def _read_sharded(model_dir: Path, index: Path) -> dict[str, Tensor]:
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelLoadError(f"{index}: no 'weight_map' object")
    weights: dict[str, Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        path = model_dir / shard
        if not path.is_file():
            raise ModelLoadError(f"{index}: shard {shard} listed in the index is missing ({path})")
        tensors = _read_safetensors(path)
        listed = [name for name, file in weight_map.items() if file == shard]
        absent = [name for name in listed if name not in tensors]
        if absent:
            raise ModelLoadError(
                f"{path}: tensor {absent[0]} listed in {index.name} is not in the file"
            )
        weights.update((name, tensors[name]) for name in listed)
    return weights
