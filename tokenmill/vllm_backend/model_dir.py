"""The Hugging Face model directory vLLM loads.

vLLM on CPU loads safetensors directories; tokenmill's default model ships as a GGUF file, so
``resolve_model_dir(None)`` dequantizes it once to fp32 safetensors (with its tokenizer,
chat template and EOS ids) under ``TOKENMILL_VLLM_CACHE`` (default
``~/.cache/tokenmill/vllm``) and reuses that directory afterwards. A directory is used as
is; a GGUF file given explicitly is refused with the way out (vLLM's GGUF support is not
what this backend tests).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokenmill.core.errors import ModelLoadError

CACHE_ENV = "TOKENMILL_VLLM_CACHE"


def resolve_model_dir(model: str | None) -> Path:
    if model is not None:
        path = Path(model).expanduser()
        if not path.is_dir():
            raise ModelLoadError(
                f"{path}: the vLLM engine needs a Hugging Face model directory (omit --model "
                "for the default model, converted once from its GGUF)"
            )
        return path
    from tokenmill.engine.default_model import DEFAULT_MODEL_NAME

    cache = Path(os.environ.get(CACHE_ENV, "~/.cache/tokenmill/vllm")).expanduser()
    return export_default_model(cache / f"{DEFAULT_MODEL_NAME}-hf")


def export_default_model(out: Path) -> Path:
    """The default GGUF as an fp32 HF directory at ``out`` (idempotent; written atomically:
    a partial export is never read as a model)."""
    if (out / "model.safetensors").is_file():
        return out
    from safetensors.torch import save_file

    from tokenmill.engine.default_model import default_model_path
    from tokenmill.engine.models.gguf_loader import read_gguf
    from tokenmill.engine.tokenizer import Tokenizer

    config, weights, meta = read_gguf(default_model_path())
    tokenizer = Tokenizer.from_gguf(meta)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    weights = {k: v.contiguous() for k, v in weights.items() if k != "lm_head.weight"}
    save_file(weights, str(tmp / "model.safetensors"))
    (tmp / "config.json").write_text(json.dumps(_hf_config(config), indent=1))
    tokenizer._backend.save(str(tmp / "tokenizer.json"))
    special = dict(tokenizer.special_tokens, chat_template=tokenizer.chat_template)
    (tmp / "tokenizer_config.json").write_text(json.dumps(special, indent=1))
    gen = {"eos_token_id": list(tokenizer.eos_token_ids), "bos_token_id": config.bos_token_id}
    (tmp / "generation_config.json").write_text(json.dumps(gen))
    try:
        tmp.rename(out)
    except OSError:  # another process exported it meanwhile
        if not (out / "model.safetensors").is_file():
            raise
    return out


def _hf_config(c: object) -> dict[str, object]:
    g = c.__getattribute__
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": g("vocab_size"),
        "hidden_size": g("hidden_size"),
        "intermediate_size": g("intermediate_size"),
        "num_hidden_layers": g("num_layers"),
        "num_attention_heads": g("num_heads"),
        "num_key_value_heads": g("num_kv_heads"),
        "head_dim": g("head_dim"),
        "max_position_embeddings": g("max_position_embeddings"),
        "rms_norm_eps": g("rms_norm_eps"),
        "rope_theta": g("rope_theta"),
        "tie_word_embeddings": g("tie_word_embeddings"),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": g("bos_token_id"),
        "eos_token_id": list(g("eos_token_ids")) or None,
        "torch_dtype": "float32",
    }
