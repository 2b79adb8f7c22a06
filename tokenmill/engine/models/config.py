"""The model config every loader produces and every model consumes (no torch here).

Loaders (HF directory, GGUF) turn their metadata into one ``ModelConfig``; weights are handed
to the model as a dict keyed by Hugging Face tensor names (``model.layers.0.self_attn.q_proj.weight``),
so one model definition serves every source.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RopeScaling:
    """``rope_type`` "default" (none) or "llama3" (Llama 3.1 frequency-dependent scaling)."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # registry key: "llama", "mistral", "qwen2", "qwen3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V for one token over all layers, per byte of dtype (multiply by itemsize)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim
