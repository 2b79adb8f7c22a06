"""One decoder for the Llama family: Llama 2/3, SmolLM/SmolLM2, Mistral, Qwen2/2.5, Qwen3.

The variants differ only in config flags: ``rope_scaling`` (Llama 3.1 "llama3" frequencies),
``attention_bias`` (q/k/v bias, Qwen2), ``qk_norm`` (per-head RMSNorm on q and k before RoPE,
Qwen3) and ``tie_word_embeddings``. Sliding-window attention is rejected by the loaders.

The model is stateless about KV: each layer hands its rotated q/k/v to an
:class:`AttentionBackend`, which owns the cache and the batch layout. Inputs are flat: the T
tokens of one forward over all sequences, with their absolute positions.

Numerics follow transformers' implementation (RMSNorm in fp32, weight applied after casting
back), except that RoPE is always applied in fp32: casting the rotary tables to bf16 makes
greedy text drift after a dozen tokens (ARCHITECTURE.md). q/k/v and gate/up projections are
stored fused (one matmul each) so a decode step issues fewer, larger GEMMs.

bf16 on a CPU: whether a bf16 GEMM beats upcasting the weights to fp32 on the fly depends on
the CPU. Without native bf16 (AVX2) a bf16 GEMM cost about as much per token as a whole GEMV
(the 4 matrices of one SmolLM2 layer: 1.1 ms at T=1, 7.4 ms at T=8, 155 ms at T=128) while
the upcast cost ~1.4 ms per layer whatever T, so fp32 math won from 8 tokens on; with
AVX512-BF16 or AMX the native bf16 GEMM wins at every T (measured on the 2-core AMD EPYC box:
0.5 ms vs 1.7 ms at T=8, 5.2 ms vs 12.7 ms at T=128), and the per-call weight conversion was
22% of a batched step. So the rule is measured per machine when the model is built
(:func:`tokenmill.engine.models.tuning.bf16_upcast_min_tokens`): ``linear`` computes in fp32
and rounds back to bf16 from ``upcast_min_tokens`` tokens on (None: never). Both paths
accumulate in fp32 and round once per matmul, so in bf16 mode a row's values may depend on
how many tokens share its forward only through summation order (bit-identical on the tiny
test model); fp32 mode is unaffected.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenmill.core.errors import ModelLoadError
from tokenmill.engine.models.attention import AttentionBackend
from tokenmill.engine.models.config import ModelConfig, RopeScaling
from tokenmill.engine.models.tuning import LinearPlan, bf16_linear_plan, pack_weight, packed_linear

# The rule for CPUs without native bf16 (module doc), where the crossover measured between
# 4 and 8 tokens; the model's own rule is measured at build time.
BF16_UPCAST_MIN_TOKENS = 8

# Checkpoint tensors that carry nothing the model needs (old Llama 2 exports save the
# rotary inverse frequencies; we recompute them from the config).
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def _param(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | None) -> nn.Parameter:
    """Uninitialized frozen parameter: every value is overwritten by ``load_weights``."""
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


def linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    upcast_min_tokens: int | None = BF16_UPCAST_MIN_TOKENS,
    packed: Tensor | None = None,
) -> Tensor:
    """``F.linear`` [T, in] -> [T, out], except that a CPU bf16 forward of at least
    ``upcast_min_tokens`` rows (None: never) computes in fp32 and rounds back, and that
    ``packed`` (``weight`` pre-packed for oneDNN, same values) is used where given (module doc)."""
    upcast = (
        upcast_min_tokens is not None
        and x.shape[0] >= upcast_min_tokens
        and weight.dtype == torch.bfloat16
        and weight.device.type == "cpu"
    )
    if not upcast:  # packed weights exist only for CPU bf16 plans
        return F.linear(x, weight, bias) if packed is None else packed_linear(x, packed, bias)
    bias32 = None if bias is None else bias.float()
    return F.linear(x.float(), weight.float(), bias32).to(x.dtype)  # [T, out]


def rope_inv_freq(config: ModelConfig, device: torch.device | None = None) -> Tensor:
    """fp32 inverse frequencies [D/2], computed exactly as transformers does."""
    dim = config.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim  # [D/2]
    inv_freq = 1.0 / (config.rope_theta**exponents)  # [D/2]
    if config.rope_scaling.rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, config.rope_scaling)
    return inv_freq


def _llama3_inv_freq(inv_freq: Tensor, scaling: RopeScaling) -> Tensor:
    """Llama 3.1: long wavelengths divided by ``factor``, short ones kept, smooth in between."""
    old_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_len / scaling.low_freq_factor
    high_freq_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq  # [D/2]
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate halves of x [T, H, D] by cos/sin [T, 1, D/2] (fp32); result in x's dtype.

    Equals transformers' ``x * cos + rotate_half(x) * sin`` with its duplicated tables.
    """
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)  # [T, H, D/2] each
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)  # [T, H, D]
    return out.to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, computed in fp32 and scaled after casting back."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype, device: torch.device | None):
        super().__init__()
        self.weight = _param((dim,), dtype, device)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # torch's fused rms_norm (fp32 in, fp32 out) equals ``h * rsqrt(mean(h^2) + eps)``
        # bit for bit (checked on 600 random inputs, D 64..4096): one op instead of six
        shape = self.weight.shape
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, shape, self.weight, self.eps)
        if x.device.type == "cpu":
            # on the CPU the fused kernel computes a bf16 input in fp32 and rounds once:
            # bit-identical to the upcast below (checked on 15 shapes, D 64..4096), two ops
            # fewer per norm (120 per decode step of SmolLM2)
            return self.weight * F.rms_norm(x, shape, eps=self.eps)
        return self.weight * F.rms_norm(x.float(), shape, eps=self.eps).to(x.dtype)


class LlamaAttention(nn.Module):
    """Fused qkv projection, optional q/k norm, RoPE, backend attention, output projection."""

    def __init__(
        self, config: ModelConfig, layer_idx: int, dtype: torch.dtype, device, upcast_min_tokens
    ):
        super().__init__()
        self.layer_idx = layer_idx
        self.upcast_min_tokens = upcast_min_tokens
        self.packed: dict[str, Tensor] = {}  # filled by LlamaForCausalLM.pack_weights
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        qkv_rows = self.q_size + 2 * self.kv_size
        self.qkv_weight = _param((qkv_rows, config.hidden_size), dtype, device)
        self.qkv_bias = _param((qkv_rows,), dtype, device) if config.attention_bias else None
        self.o_weight = _param((config.hidden_size, self.q_size), dtype, device)
        self.q_norm = self.k_norm = None
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps, dtype, device)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps, dtype, device)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attn: AttentionBackend) -> Tensor:
        num_tokens = x.shape[0]
        packed = self.packed.get("qkv")
        qkv = linear(
            x, self.qkv_weight, self.qkv_bias, self.upcast_min_tokens, packed
        )  # [T, q+2kv]
        q, k = self._rotated_qk(qkv, cos, sin)  # [T, Hq, D], [T, Hkv, D]
        v = qkv[:, self.q_size + self.kv_size :].view(num_tokens, self.num_kv_heads, -1)
        out = attn(self.layer_idx, q, k, v)  # [T, Hq, D]
        out = out.reshape(num_tokens, self.q_size)  # [T, Hq * D]
        packed = self.packed.get("o")  # [T, hidden] below
        return linear(out, self.o_weight, None, self.upcast_min_tokens, packed)  # [T, hidden]

    def _rotated_qk(self, qkv: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """q and k rotated by one ``apply_rope`` over their adjacent columns (half the small
        ops of a decode step's RoPE; elementwise, so the same values as two calls)."""
        num_tokens, heads = qkv.shape[0], self.num_heads + self.num_kv_heads
        if self.q_norm is None:
            qk = qkv[:, : self.q_size + self.kv_size].view(num_tokens, heads, self.head_dim)
            return apply_rope(qk, cos, sin).split([self.num_heads, self.num_kv_heads], dim=1)
        q = qkv[:, : self.q_size].view(num_tokens, self.num_heads, self.head_dim)  # [T, Hq, D]
        k = qkv[:, self.q_size : self.q_size + self.kv_size]
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        return apply_rope(self.q_norm(q), cos, sin), apply_rope(self.k_norm(k), cos, sin)


class LlamaMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)) with gate and up fused into one matmul."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, device, upcast_min_tokens):
        super().__init__()
        self.upcast_min_tokens = upcast_min_tokens
        self.packed: dict[str, Tensor] = {}  # filled by LlamaForCausalLM.pack_weights
        self.gate_up_weight = _param(
            (2 * config.intermediate_size, config.hidden_size), dtype, device
        )
        self.down_weight = _param((config.hidden_size, config.intermediate_size), dtype, device)

    def forward(self, x: Tensor) -> Tensor:
        upcast, packed = self.upcast_min_tokens, self.packed
        gate_up = linear(x, self.gate_up_weight, None, upcast, packed.get("gate_up"))  # [T, 2I]
        gate, up = gate_up.chunk(2, dim=-1)  # [T, I] each
        return linear(F.silu(gate) * up, self.down_weight, None, upcast, packed.get("down"))


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self, config: ModelConfig, layer_idx: int, dtype: torch.dtype, device, upcast_min_tokens
    ):
        super().__init__()
        eps, hidden = config.rms_norm_eps, config.hidden_size
        self.input_layernorm = RMSNorm(hidden, eps, dtype, device)
        self.self_attn = LlamaAttention(config, layer_idx, dtype, device, upcast_min_tokens)
        self.post_attention_layernorm = RMSNorm(hidden, eps, dtype, device)
        self.mlp = LlamaMLP(config, dtype, device, upcast_min_tokens)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, attn: AttentionBackend) -> Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, attn)  # [T, hidden]
        return h + self.mlp(self.post_attention_layernorm(h))  # [T, hidden]


class LlamaForCausalLM(nn.Module):
    """A Llama-family decoder whose KV storage is owned by the caller's attention backend.

    Construct, then ``load_weights`` with Hugging Face tensor names (every parameter starts
    uninitialized). ``forward`` returns final-normed hidden states; ``compute_logits`` turns
    the rows the caller needs (usually one per sequence) into fp32 logits. Pick the dtype
    and device at construction: ``module.to(dtype)`` would also cast the fp32 rotary buffer.
    ``plan``: how CPU bf16 matmuls run (module doc); None measures it on this machine
    (only for bf16 on the CPU, where it matters). ``load_weights`` packs the weights if the
    plan says so.
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        plan: LinearPlan | None = None,
    ):
        super().__init__()
        self.config = config
        if plan is None:
            plan = bf16_linear_plan(config, dtype, torch.device(device or "cpu"))
        self.plan = plan
        self.upcast_min_tokens = plan.upcast_min_tokens
        self.packed: dict[str, Tensor] = {}  # the LM head's, filled by pack_weights
        self.embed_tokens = _param((config.vocab_size, config.hidden_size), dtype, device)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, dtype, device, self.upcast_min_tokens)
            for i in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        tied = config.tie_word_embeddings
        self.lm_head = (
            None if tied else _param((config.vocab_size, config.hidden_size), dtype, device)
        )
        # fp32 whatever the weights' dtype; not persistent: recomputed from the config.
        self.register_buffer("inv_freq", rope_inv_freq(config, device), persistent=False)

    def forward(self, input_ids: Tensor, positions: Tensor, attn: AttentionBackend) -> Tensor:
        """input_ids, positions: [T] -> final-normed hidden states [T, hidden].

        The backend must have been prepared by the caller for exactly these T tokens.
        """
        h = F.embedding(input_ids, self.embed_tokens)  # [T, hidden]
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, D/2] fp32
        cos, sin = freqs.cos()[:, None, :], freqs.sin()[:, None, :]  # [T, 1, D/2]
        for layer in self.layers:
            h = layer(h, cos, sin, attn)
        return self.norm(h)

    def compute_logits(self, hidden: Tensor) -> Tensor:
        """hidden [N, hidden] -> fp32 logits [N, vocab] (matmul in the weights' dtype)."""
        weight = self.embed_tokens if self.lm_head is None else self.lm_head
        packed = self.packed.get("lm_head")
        return linear(hidden, weight, None, self.upcast_min_tokens, packed).float()  # [N, V]

    def load_weights(self, weights: Mapping[str, Tensor]) -> None:
        """Copy Hugging Face-named tensors into the (fused) parameters.

        Every expected tensor must be present with its exact shape and no other tensor may
        be given (except ``lm_head.weight`` of a tied model, which transformers ignores too,
        and saved rotary buffers); otherwise ModelLoadError names the tensor(s) and shapes,
        and no parameter has been modified.
        """
        targets = self._weight_targets()
        _check_names(targets, weights, self.config.tie_word_embeddings)
        for name, dest in targets.items():
            _check_shape(name, tuple(dest.shape), tuple(weights[name].shape))
        with torch.no_grad():
            for name, dest in targets.items():
                dest.copy_(weights[name])
        if self.plan.packed:
            self.pack_weights()

    def pack_weights(self) -> None:
        """oneDNN-packed copies of every matmul weight (the parameters stay, for the
        embedding and for inspection); call again after changing a parameter."""
        head = self.embed_tokens if self.lm_head is None else self.lm_head
        self.packed = {"lm_head": pack_weight(head)}
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            attn.packed = {"qkv": pack_weight(attn.qkv_weight), "o": pack_weight(attn.o_weight)}
            mlp.packed = {
                "gate_up": pack_weight(mlp.gate_up_weight),
                "down": pack_weight(mlp.down_weight),
            }

    def _weight_targets(self) -> dict[str, Tensor]:
        """HF tensor name -> the parameter (or row slice of a fused parameter) it fills."""
        targets = {
            "model.embed_tokens.weight": self.embed_tokens,
            "model.norm.weight": self.norm.weight,
        }
        if self.lm_head is not None:
            targets["lm_head.weight"] = self.lm_head
        for i, layer in enumerate(self.layers):
            targets.update(_layer_targets(f"model.layers.{i}.", layer))
        return targets


def _layer_targets(prefix: str, layer: LlamaDecoderLayer) -> dict[str, Tensor]:
    attn, mlp = layer.self_attn, layer.mlp
    q, kv = attn.q_size, attn.kv_size
    rows = {"q_proj": slice(0, q), "k_proj": slice(q, q + kv), "v_proj": slice(q + kv, q + 2 * kv)}
    targets = {
        f"{prefix}input_layernorm.weight": layer.input_layernorm.weight,
        f"{prefix}post_attention_layernorm.weight": layer.post_attention_layernorm.weight,
        f"{prefix}self_attn.o_proj.weight": attn.o_weight,
        f"{prefix}mlp.gate_proj.weight": mlp.gate_up_weight[: mlp.down_weight.shape[1]],
        f"{prefix}mlp.up_proj.weight": mlp.gate_up_weight[mlp.down_weight.shape[1] :],
        f"{prefix}mlp.down_proj.weight": mlp.down_weight,
    }
    for proj, part in rows.items():
        targets[f"{prefix}self_attn.{proj}.weight"] = attn.qkv_weight[part]
        if attn.qkv_bias is not None:
            targets[f"{prefix}self_attn.{proj}.bias"] = attn.qkv_bias[part]
    if attn.q_norm is not None:
        targets[f"{prefix}self_attn.q_norm.weight"] = attn.q_norm.weight
        targets[f"{prefix}self_attn.k_norm.weight"] = attn.k_norm.weight
    return targets


def _check_names(targets: Mapping[str, Tensor], weights: Mapping[str, Tensor], tied: bool) -> None:
    ignored = {
        n for n in weights if n.endswith(_IGNORED_SUFFIXES) or (tied and n == "lm_head.weight")
    }
    missing = sorted(targets.keys() - weights.keys())
    unexpected = sorted(weights.keys() - targets.keys() - ignored)
    if missing:
        raise ModelLoadError(f"missing tensor(s) in checkpoint: {_name_list(missing)}")
    if unexpected:
        raise ModelLoadError(
            f"unexpected tensor(s) in checkpoint (not used by this architecture/config): "
            f"{_name_list(unexpected)}"
        )


def _check_shape(name: str, expected: tuple[int, ...], actual: tuple[int, ...]) -> None:
    if expected != actual:
        raise ModelLoadError(
            f"tensor {name} has shape {list(actual)} but the config expects {list(expected)}"
        )


def _name_list(names: list[str], limit: int = 5) -> str:
    more = f" (and {len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
