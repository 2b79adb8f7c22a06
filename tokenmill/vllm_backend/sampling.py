"""Our ``SamplingParams`` as vLLM's: every field has exactly one fate, listed here.

- ``MAPPED``: passed to vLLM's ``SamplingParams`` (same meaning; ``seed`` as the unsigned
  64-bit value torch reads a negative seed as, because vLLM treats ``-1`` as "no seed").
- ``ABOVE_ENGINE``: handled by our frontend on the token stream, as it does for our own
  engine (``decode=False``): ``stop`` strings (held back and cut by
  ``core/detokenize.py``), ``skip_special_tokens`` (detokenization), ``n`` (expanded into
  ``n`` requests before the engine; a request reaching the engine with ``n > 1`` is an
  error).

- ``REFUSED``: not mapped yet, refused with ``InvalidRequestError`` when set: ``structured``
  (our llguidance grammar; vLLM's own structured outputs could take it in a later change).

A field in none of the sets (a new one added to ``SamplingParams``) raises
``InvalidRequestError`` naming it when a request sets it to anything but its default: never
silently dropped. Pure: no vLLM import; ``builder`` builds vLLM's struct from the kwargs.
"""

from __future__ import annotations

from typing import Any

from tokenmill.core.errors import InvalidRequestError
from tokenmill.core.sampling import SamplingParams

MAPPED = frozenset(
    {
        "max_tokens",
        "min_tokens",
        "temperature",
        "top_k",
        "top_p",
        "min_p",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "stop_token_ids",
        "ignore_eos",
        "logprobs",
        "logit_bias",
    }
)
ABOVE_ENGINE = frozenset({"stop", "skip_special_tokens", "n"})
REFUSED = frozenset({"structured"})
_DEFAULTS = SamplingParams()
_U64 = 2**64


def vllm_sampling_kwargs(params: SamplingParams, max_tokens: int) -> dict[str, Any]:
    """The keyword arguments of vLLM's ``SamplingParams`` for ``params``; ``max_tokens``
    replaces ``params.max_tokens`` (the caller resolves None to the rest of the context).
    Raises ``InvalidRequestError`` for ``n > 1`` and for a set field without a mapping."""
    if params.n != 1:
        raise InvalidRequestError(
            "the vLLM worker takes one choice per request (the frontend expands n)", param="n"
        )
    for name in params.__struct_fields__:
        if name in MAPPED or name in ABOVE_ENGINE:
            continue
        if getattr(params, name) != getattr(_DEFAULTS, name):
            raise InvalidRequestError(
                f"{name} is not supported by the vLLM engine backend", param=name
            )
    kwargs = {name: getattr(params, name) for name in MAPPED}
    kwargs["max_tokens"] = max_tokens
    kwargs["stop_token_ids"] = list(params.stop_token_ids)
    if params.seed is not None:
        kwargs["seed"] = params.seed % _U64  # torch's reading of a negative seed
    if params.logit_bias is not None:
        kwargs["logit_bias"] = dict(params.logit_bias)
    return kwargs
