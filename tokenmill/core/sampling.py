"""Sampling parameters: one frozen, validated wire struct shared by the offline API, the
engine and the frontend. Invalid values raise ``InvalidRequestError`` naming the parameter."""

from __future__ import annotations

import msgspec

from tokenmill.core.errors import InvalidRequestError

MAX_LOGPROBS = 20
# the seeds ``torch.Generator.manual_seed`` takes (a negative one is read as its two's
# complement); one outside overflows in the sampler
MIN_SEED, MAX_SEED = -(2**63), 2**64 - 1


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True):
    """How to sample one request's output.

    ``temperature == 0`` is greedy. ``top_k <= 0`` and ``top_p == 1`` disable those filters.
    ``max_tokens=None`` means "up to the context length". ``stop`` strings never appear in
    the output text; ``stop_token_ids`` end the request like EOS but are kept in token ids.
    ``logprobs=k`` returns the sampled token's logprob plus the top ``k`` alternatives.
    ``seed`` gives the request its own generator: same seed, same text, whatever the batch;
    it must be in ``[MIN_SEED, MAX_SEED]`` (the frontend seeds choice ``j`` of ``n`` with
    ``seed + j``, so ``seed + n - 1`` must be too).
    """

    n: int = 1
    max_tokens: int | None = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        _check(self.n >= 1, "n", "must be at least 1")
        _check(self.max_tokens is None or self.max_tokens >= 1, "max_tokens", "must be at least 1")
        _check(self.min_tokens >= 0, "min_tokens", "must be non-negative")
        _check(
            self.max_tokens is None or self.min_tokens <= self.max_tokens,
            "min_tokens",
            "must not exceed max_tokens",
        )
        _check(0.0 <= self.temperature <= 100.0, "temperature", "must be in [0, 100]")
        _check(self.top_k >= -1, "top_k", "must be -1, 0 (disabled) or positive")
        _check(0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]")
        _check(0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]")
        _check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "must be in [-2, 2]")
        _check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "must be in [-2, 2]")
        _check(0.0 < self.repetition_penalty <= 10.0, "repetition_penalty", "must be in (0, 10]")
        _check(
            self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
            "logprobs",
            f"must be in [0, {MAX_LOGPROBS}]",
        )
        _check(
            self.seed is None or MIN_SEED <= self.seed <= MAX_SEED,
            "seed",
            "must be in [-2**63, 2**64 - 1] (with n choices, seed + n - 1 too)",
        )
        _check(all(s for s in self.stop), "stop", "must not contain empty strings")
        _check(all(t >= 0 for t in self.stop_token_ids), "stop_token_ids", "must be >= 0")
        if self.logit_bias:
            _check(
                all(-100.0 <= b <= 100.0 for b in self.logit_bias.values()),
                "logit_bias",
                "values must be in [-100, 100]",
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _check(ok: bool, param: str, why: str) -> None:
    if not ok:
        raise InvalidRequestError(f"invalid {param}: {why}", param=param)
