"""Test helpers: tiny GGUF files and GGUF tokenizer metadata, written the way llama.cpp's
``convert_hf_to_gguf.py`` writes them (names, Q/K permutation, tokenizer keys)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import tokenizers
from safetensors.numpy import load_file

_HF_TO_GGUF = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_tensor_name(hf_name: str) -> str:
    stem, _, kind = hf_name.rpartition(".")
    if stem.startswith("model.layers."):
        _, _, layer, rest = stem.split(".", 3)
        return f"blk.{layer}.{_HF_TO_GGUF[rest]}.{kind}"
    return f"{_HF_TO_GGUF[stem]}.{kind}"


def llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """Verbatim logic of llama.cpp's ``LlamaModel.permute`` (convert_hf_to_gguf.py)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def llama3_rope_freqs(theta: float, head_dim: int, rope: dict[str, Any]) -> np.ndarray:
    """llama.cpp's ``rope_freqs`` tensor for Llama 3.1 scaling (convert_hf_to_gguf.py)."""
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_ctx = rope["original_max_position_embeddings"]
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def byte_level_fields(
    tokenizer: tokenizers.Tokenizer, pre: str, special: list[str], add_bos: bool = False
) -> dict[str, Any]:
    """GGUF tokenizer metadata (llama.cpp keys) for a byte-level BPE ``tokenizers`` model."""
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    tokens = [""] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3 if t in special else 1 for t in tokens],
        "tokenizer.ggml.merges": [m if isinstance(m, str) else " ".join(m) for m in merges],
        "tokenizer.ggml.add_bos_token": add_bos,
    }


def sentencepiece_fields(corpus: list[str], with_merges: bool) -> dict[str, Any]:
    """GGUF metadata of a SentencePiece-style BPE vocabulary (``tokenizer.ggml.model`` llama):
    <unk> <s> </s>, 256 byte tokens, then pieces in merge order with decreasing scores."""
    trained = tokenizers.SentencePieceBPETokenizer(add_prefix_space=True)
    trained.train_from_iterator(corpus, vocab_size=300, show_progress=False)
    inner = json.loads(trained._tokenizer.to_str())["model"]
    pieces = sorted(inner["vocab"], key=inner["vocab"].get)
    head = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens = head + [p for p in pieces if p not in head]
    fields = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [0.0] * len(head)
        + [-float(i) for i in range(len(tokens) - len(head))],
        "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * (len(tokens) - len(head)),
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
    }
    if with_merges:
        merges = inner["merges"]
        fields["tokenizer.ggml.merges"] = [m if isinstance(m, str) else " ".join(m) for m in merges]
    return fields


def transformers_tokenizer_dict(fields: dict[str, Any]) -> dict[str, Any]:
    """The same metadata under the names transformers' GGUF converter expects."""
    renames = {
        "model": "tokenizer_type",
        "pre": "pre_tokenizer_type",
        "tokens": "tokens",
        "scores": "scores",
        "token_type": "token_type",
        "merges": "merges",
        "bos_token_id": "bos_token_id",
        "eos_token_id": "eos_token_id",
        "unknown_token_id": "unk_token_id",
    }
    return {
        new: fields[f"tokenizer.ggml.{old}"]
        for old, new in renames.items()
        if f"tokenizer.ggml.{old}" in fields
    }


def write_gguf(
    path: Path,
    model_dir: Path,
    arch: str,
    token_fields: dict[str, Any],
    quantized: tuple[str, ...] = (),
    qtype: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.Q8_0,
) -> dict[str, np.ndarray]:
    """Convert the HF checkpoint in ``model_dir`` to a GGUF at ``path``; HF tensors whose name
    contains one of ``quantized`` are stored as ``qtype``. Returns the HF tensors as written
    (after quantization round-trip, unpermuted), for exact comparisons."""
    config = json.loads((model_dir / "config.json").read_text())
    tensors = load_file(model_dir / "model.safetensors")
    writer = gguf.GGUFWriter(str(path), arch)
    _write_config(writer, arch, config)
    _write_tokenizer(writer, token_fields)
    rope = config.get("rope_parameters") or {}
    if rope.get("rope_type") == "llama3":
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        writer.add_tensor(
            "rope_freqs.weight", llama3_rope_freqs(rope["rope_theta"], head_dim, rope)
        )
    written = {}
    for name, value in tensors.items():
        value = value.astype(np.float32)
        data = _gguf_layout(name, value, arch, config)
        if any(q in name for q in quantized):
            packed = gguf.quants.quantize(data, qtype)
            writer.add_tensor(gguf_tensor_name(name), packed, raw_dtype=qtype)
            value = _hf_layout(name, gguf.quants.dequantize(packed, qtype), arch, config)
        else:
            writer.add_tensor(gguf_tensor_name(name), data)
        written[name] = value
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


def _write_config(writer: gguf.GGUFWriter, arch: str, config: dict[str, Any]) -> None:
    rope = config.get("rope_parameters") or {}
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_freq_base(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    if config.get("head_dim"):
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
    if rope.get("rope_type") == "llama3":
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])


def _write_tokenizer(writer: gguf.GGUFWriter, fields: dict[str, Any]) -> None:
    writer.add_tokenizer_model(fields["tokenizer.ggml.model"])
    if "tokenizer.ggml.pre" in fields:
        writer.add_tokenizer_pre(fields["tokenizer.ggml.pre"])
    writer.add_token_list(fields["tokenizer.ggml.tokens"])
    writer.add_token_types(fields["tokenizer.ggml.token_type"])
    if "tokenizer.ggml.merges" in fields:
        writer.add_token_merges(fields["tokenizer.ggml.merges"])
    for key in ("bos", "eos"):
        if f"tokenizer.ggml.{key}_token_id" in fields:
            getattr(writer, f"add_{key}_token_id")(fields[f"tokenizer.ggml.{key}_token_id"])
    writer.add_add_bos_token(fields.get("tokenizer.ggml.add_bos_token", False))
    if fields.get("tokenizer.chat_template"):
        writer.add_chat_template(fields["tokenizer.chat_template"])


def _gguf_layout(name: str, value: np.ndarray, arch: str, config: dict[str, Any]) -> np.ndarray:
    if arch != "llama":
        return value
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    if "q_proj" in name:
        return llama_cpp_permute(value, heads, heads)
    if "k_proj" in name:
        return llama_cpp_permute(value, heads, kv_heads)
    return value


def _hf_layout(name: str, value: np.ndarray, arch: str, config: dict[str, Any]) -> np.ndarray:
    """Inverse of _gguf_layout (reshape-swap twice is the identity on the permuted rows)."""
    if arch != "llama" or not ("q_proj" in name or "k_proj" in name):
        return value
    heads = config["num_attention_heads"] if "q_proj" in name else config["num_key_value_heads"]
    half = value.shape[0] // heads // 2
    return value.reshape(heads, half, 2, -1).swapaxes(1, 2).reshape(value.shape)
