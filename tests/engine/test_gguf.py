"""GGUF loading: a tiny GGUF written here (llama.cpp names, Q/K permutation, a quantized type)
loads to the same weights, config and logits as the safetensors checkpoint it came from.

Tolerances: f32 tensors exact; Q8_0 tensors within one quantization step (block max / 127)
of the original, and exact against the test's own dequantization; logits of the GGUF model
equal those of the safetensors model holding the same (round-tripped) weights to 1e-5.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from helpers.gguf_fixtures import byte_level_fields, write_gguf
from helpers.tiny_models import CHATML_TEMPLATE, SPECIAL_TOKENS, make_tiny_hf_model, tiny_tokenizer

from tokenmill.core.errors import ModelLoadError
from tokenmill.engine.loader import load_model
from tokenmill.engine.models import gguf_loader
from tokenmill.engine.models.gguf_loader import read_gguf, read_gguf_meta
from tokenmill.engine.models.hf_loader import read_hf_config, read_hf_weights
from tokenmill.engine.models.registry import build_model
from tokenmill.engine.reference import reference_logits
from tokenmill.engine.tokenizer import Tokenizer

LOGITS_ATOL = 1e-5
TEXTS = ["The capital of France is", "def add(a, b): return a + b  # 12345 café 🙂"]

# (family, GGUF architecture, HF tensor name parts stored quantized as Q8_0)
CASES = [
    ("smollm2", "llama", ("mlp.", "self_attn.q_proj", "embed_tokens")),
    ("llama2", "llama", ()),
    ("llama3", "llama", ("self_attn.k_proj",)),
    ("qwen2", "qwen2", ("mlp.up_proj",)),
    ("qwen3", "qwen3", ("self_attn.o_proj",)),
]


def token_fields() -> dict:
    fields = byte_level_fields(tiny_tokenizer(), "gpt2", SPECIAL_TOKENS)
    ids = {t: fields["tokenizer.ggml.tokens"].index(t) for t in SPECIAL_TOKENS}
    fields.update(
        {
            "tokenizer.ggml.bos_token_id": ids["<s>"],
            "tokenizer.ggml.eos_token_id": ids["<|im_end|>"],
            "tokenizer.chat_template": CHATML_TEMPLATE,
        }
    )
    return fields


def make_gguf(tmp_path: Path, family: str, arch: str, quantized=()) -> tuple[Path, Path, dict]:
    model_dir = make_tiny_hf_model(tmp_path, family)
    path = tmp_path / f"{family}.gguf"
    written = write_gguf(path, model_dir, arch, token_fields(), quantized)
    return model_dir, path, written


@pytest.mark.parametrize(("family", "arch", "quantized"), CASES)
def test_gguf_matches_safetensors(tmp_path, family, arch, quantized):
    model_dir, path, written = make_gguf(tmp_path, family, arch, quantized)
    config, weights, meta = read_gguf(path)
    hf_config, hf_weights = read_hf_config(model_dir), read_hf_weights(model_dir)

    expected_config = replace(
        hf_config,
        architecture=arch,
        eos_token_ids=config.eos_token_ids,
        max_position_embeddings=hf_config.max_position_embeddings,
    )
    assert config == expected_config
    assert meta.architecture == arch
    assert set(weights) == set(hf_weights)
    for name, original in hf_weights.items():
        ours = weights[name]
        assert ours.dtype == torch.float32 and ours.shape == original.shape, name
        if any(q in name for q in quantized):
            step = original.abs().max() / 127
            assert (ours - original).abs().max() <= step, name
            assert torch.equal(ours, torch.from_numpy(written[name])), name
        else:
            assert torch.equal(ours, original), name

    gguf_model = build_model(config, weights)
    round_tripped = {k: torch.from_numpy(v) for k, v in written.items()}
    hf_model = build_model(hf_config, round_tripped)
    prompts = [tiny_tokenizer().encode(t).ids for t in TEXTS]
    for ours, theirs in zip(
        reference_logits(gguf_model, prompts), reference_logits(hf_model, prompts), strict=True
    ):
        torch.testing.assert_close(ours, theirs, atol=LOGITS_ATOL, rtol=0)


def test_gguf_tokenizer_matches_hf_dir(tmp_path):
    model_dir, path, _ = make_gguf(tmp_path, "smollm2", "llama")
    ours = Tokenizer.from_gguf(read_gguf_meta(path))
    theirs = Tokenizer.from_hf_dir(model_dir)
    for text in [*TEXTS, "<|im_start|>user\nhi<|im_end|>", "  spaces\n\n\ttabs  "]:
        assert ours.encode(text) == theirs.encode(text)
    assert ours.eos_token_ids[0] == theirs.eos_token_ids[0]
    assert ours.bos_token_id == theirs.bos_token_id
    messages = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(messages) == theirs.apply_chat_template(messages)


def test_load_model_dispatches_gguf_by_magic(tmp_path):
    _, path, _ = make_gguf(tmp_path, "smollm2", "llama")
    renamed = path.rename(tmp_path / "model.bin")
    loaded = load_model(renamed, dtype="fp32", device="cpu")
    assert loaded.config.architecture == "llama" and loaded.config.tie_word_embeddings
    assert loaded.tokenizer.chat_template == CHATML_TEMPLATE


def test_truncated_gguf_is_a_clear_error(tmp_path):
    _, path, _ = make_gguf(tmp_path, "smollm2", "llama")
    data = path.read_bytes()
    for size in (len(data) - 100, 2000, 10):
        cut = tmp_path / f"cut{size}.gguf"
        cut.write_bytes(data[:size])
        with pytest.raises(ModelLoadError, match=f"{cut}.*(truncated|corrupt)"):
            read_gguf(cut)


def test_not_a_gguf_is_a_clear_error(tmp_path):
    path = tmp_path / "garbage.gguf"
    path.write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(ModelLoadError, match="garbage.gguf"):
        load_model(path)


def test_unsupported_architecture_is_named(tmp_path):
    path = tmp_path / "phi.gguf"
    writer = gguf.GGUFWriter(str(path), "phi2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match=r"phi\.gguf: unsupported GGUF architecture 'phi2'"):
        read_gguf(path)


def test_missing_path_is_named(tmp_path):
    missing = tmp_path / "nowhere" / "model.gguf"
    with pytest.raises(ModelLoadError, match=f"model path not found: {missing}"):
        load_model(missing)


def test_metadata_weights_mismatch_names_file_and_tensor(tmp_path):
    model_dir = make_tiny_hf_model(tmp_path, "smollm2")
    config_file = model_dir / "config.json"
    config = json.loads(config_file.read_text())
    config["intermediate_size"] = 100  # the metadata lies about the MLP width
    config_file.write_text(json.dumps(config))
    path = tmp_path / "liar.gguf"
    write_gguf(path, model_dir, "llama", token_fields())
    with pytest.raises(ModelLoadError, match=r"liar\.gguf: .*mlp\.(gate|up|down)_proj"):
        load_model(path)


def test_qk_rows_not_divisible_by_heads_is_named(tmp_path):
    _, path, _ = make_gguf(tmp_path, "smollm2", "llama")
    meta = read_gguf_meta(path)
    fields = {**meta.fields, "llama.attention.head_count": 5}  # 64 q rows cannot be 5 heads
    with pytest.raises(ModelLoadError, match=r"smollm2\.gguf: blk\.0\.attn_q\.weight has 64 rows"):
        gguf_loader._to_hf_layout(
            "blk.0.attn_q.weight",
            np.zeros((64, 64), np.float32),
            replace(read_gguf(path)[0], num_heads=5),
            replace(meta, fields=fields),
        )
