"""Architecture name -> model class, and the one way to turn (config, weights) into a model.

Loaders (HF directory, GGUF) produce a ModelConfig whose ``architecture`` is a key here and a
dict of Hugging Face-named tensors; ``build_model`` does the rest. A new architecture is one
``register_model`` call; its class must accept ``(config, *, dtype, device)`` and provide
``load_weights``, ``forward(input_ids, positions, attn)`` and ``compute_logits``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from tokenmill.core.errors import ModelLoadError
from tokenmill.engine.models.config import ModelConfig
from tokenmill.engine.models.llama import LlamaForCausalLM

_MODELS: dict[str, type[nn.Module]] = {}


def register_model(architecture: str, model_class: type[nn.Module]) -> None:
    """Map ``architecture`` (a ModelConfig.architecture value) to ``model_class``."""
    _MODELS[architecture] = model_class


def supported_architectures() -> tuple[str, ...]:
    return tuple(sorted(_MODELS))


def get_model_class(architecture: str) -> type[nn.Module]:
    """The class registered for ``architecture``; ModelLoadError naming the supported ones."""
    try:
        return _MODELS[architecture]
    except KeyError:
        supported = ", ".join(supported_architectures())
        raise ModelLoadError(
            f"unsupported model architecture {architecture!r} (supported: {supported})"
        ) from None


def build_model(
    config: ModelConfig,
    weights: Mapping[str, Tensor],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """Construct the model for ``config`` on ``device`` in ``dtype``, load ``weights`` (cast
    on copy), and return it in eval mode with every parameter frozen. ``weights`` is not
    modified and may be dropped afterwards. Raises ModelLoadError on any name/shape mismatch."""
    model_class = get_model_class(config.architecture)
    model = model_class(config, dtype=dtype, device=torch.device(device))
    model.load_weights(weights)
    model.eval()
    model.requires_grad_(False)
    return model


for _name in ("llama", "mistral", "qwen2", "qwen3"):
    register_model(_name, LlamaForCausalLM)
