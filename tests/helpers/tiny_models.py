"""Tiny random Hugging Face model directories for tests (transformers is test-only).

``make_tiny_hf_model(tmp_path, "llama3")`` writes a directory like a real checkpoint:
config.json, model.safetensors (or shards + index), generation_config.json, tokenizer.json
(byte-level BPE trained here with ``tokenizers``), tokenizer_config.json with a ChatML chat
template. Everything is seeded, so a family/tie/overrides combination gives the same bytes.

Families and what each exercises:
  llama2   legacy config format (top-level rope_theta, no head_dim, no rope_parameters)
  llama3   rope_scaling type llama3 (original context 64 so the smoothing band is hit)
  smollm2  SmolLM2 shape ratios: tied, theta 100000, GQA ratio 4
  mistral  MistralForCausalLM without sliding window
  qwen2    q/k/v bias, sliding window configured but switched off (use_sliding_window false)
  qwen3    per-head q/k norm, explicit head_dim != hidden / heads

``TEST_DEVICE`` (env ``TOKENMILL_TEST_DEVICE``, default "cpu") is where the tests that
exercise device code paths put their models, caches and logits (e.g. "cuda" on a GPU box).
"""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>", "<s>", "</s>"]
TOKENIZER_VOCAB_SIZE = 320
MODEL_VOCAB_SIZE = 336  # padded beyond the tokenizer, as real checkpoints often are
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "def add(a, b):\n    return a + b  # numbers 0123456789",
    "Once upon a time, a small model learned to count: one, two, three, four.",
    "Unicode: café, naïve, Zürich, 東京, 🙂 and emoji 🚀.",
    "The quick brown fox jumps over the lazy dog again and again.",
]

_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    vocab_size=MODEL_VOCAB_SIZE,
    hidden_act="silu",
)
_FAMILIES: dict[str, tuple[str, bool, dict[str, Any]]] = {
    # family: (transformers config class, default tie, config overrides)
    "llama2": ("LlamaConfig", False, dict(rope_theta=10000.0)),
    "llama3": (
        "LlamaConfig",
        True,
        dict(
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            )
        ),
    ),
    "smollm2": (
        "LlamaConfig",
        True,
        dict(num_key_value_heads=1, num_hidden_layers=3, rope_theta=100000.0),
    ),
    "mistral": ("MistralConfig", False, dict(sliding_window=None, head_dim=16)),
    "qwen2": (
        "Qwen2Config",
        True,
        dict(rope_theta=1000000.0, sliding_window=32, use_sliding_window=False),
    ),
    "qwen3": ("Qwen3Config", False, dict(head_dim=32, rope_theta=1000000.0)),
}
FAMILIES = tuple(_FAMILIES)
TEST_DEVICE = os.environ.get("TOKENMILL_TEST_DEVICE", "cpu")


@cache
def tiny_tokenizer() -> Tokenizer:
    """Byte-level BPE with SPECIAL_TOKENS at ids 0..3 (trained once per process)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(_CORPUS, trainer)
    return tokenizer


def make_tiny_hf_model(
    tmp_path: Path,
    family: str,
    tie: bool | None = None,
    max_shard_size: str | None = None,
    seed: int = 0,
    **overrides: Any,
) -> Path:
    """Write a tiny random ``family`` checkpoint under ``tmp_path`` and return its directory.

    ``tie`` defaults to the family's usual choice; ``overrides`` go to the transformers
    config; ``max_shard_size`` (e.g. "40KB") writes sharded safetensors with an index.
    """
    import transformers

    class_name, default_tie, family_kwargs = _FAMILIES[family]
    tokenizer = tiny_tokenizer()
    special = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
    kwargs = {
        **_COMMON,
        **family_kwargs,
        "tie_word_embeddings": default_tie if tie is None else tie,
        "bos_token_id": special["<s>"],
        "eos_token_id": special["</s>"],
        **overrides,
    }
    config = getattr(transformers, class_name)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize(model, seed)
    model_dir = _fresh_dir(tmp_path, family)
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(model_dir, **save_kwargs)
    if family == "llama2":
        _to_legacy_config(model_dir / "config.json")
    write_tokenizer_files(model_dir)
    return model_dir


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Spread weights wider than transformers' init (std 0.02) so logits are far from ties,
    and make norm weights and biases non-trivial so a skipped one is caught."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name:
                param.copy_(1.0 + 0.2 * noise)
            else:
                param.copy_(0.15 * noise)


def _fresh_dir(tmp_path: Path, family: str) -> Path:
    for i in range(1000):
        path = Path(tmp_path) / (family if i == 0 else f"{family}-{i}")
        if not path.exists():
            return path
    raise RuntimeError(f"too many model directories under {tmp_path}")


def _to_legacy_config(path: Path) -> None:
    """Rewrite a transformers-5 config the way Llama 2 checkpoints were saved."""
    raw = json.loads(path.read_text())
    rope = raw.pop("rope_parameters")
    raw.pop("head_dim", None)
    raw.update(rope_theta=rope["rope_theta"], rope_scaling=None)
    path.write_text(json.dumps(raw, indent=2))


def write_tokenizer_files(model_dir: Path) -> None:
    """tokenizer.json (``tiny_tokenizer``), tokenizer_config.json with the ChatML template and
    generation_config.json (eos: <|im_end|>, </s>) into an existing ``model_dir``."""
    model_dir, tokenizer = Path(model_dir), tiny_tokenizer()
    special = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
    tokenizer.save(str(model_dir / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "<|im_end|>",
        "pad_token": "</s>",
        "unk_token": None,
        "add_bos_token": False,
        "model_max_length": _COMMON["max_position_embeddings"],
        "chat_template": CHATML_TEMPLATE,
    }
    (model_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    generation_config = {
        "bos_token_id": special["<s>"],
        "eos_token_id": [special["<|im_end|>"], special["</s>"]],
    }
    (model_dir / "generation_config.json").write_text(json.dumps(generation_config, indent=2))
