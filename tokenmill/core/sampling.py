"""Sampling parameters: one frozen, validated wire struct shared by the offline API, the
engine and the frontend. Invalid values raise ``InvalidRequestError`` naming the parameter."""

from __future__ import annotations

import msgspec

from tokenmill.core.errors import InvalidRequestError

MAX_LOGPROBS = 20
# the seeds ``torch.Generator.manual_seed`` takes (a negative one is read as its two's
# complement); one outside overflows in the sampler
MIN_SEED, MAX_SEED = -(2**63), 2**64 - 1
MAX_GRAMMAR_CHARS = 256 * 1024  # a schema, regex or grammar text longer than this is refused
MAX_CHOICES = 1024


class StructuredOutput(msgspec.Struct, frozen=True, kw_only=True):
    """A constraint on a request's output, enforced by a grammar-guided logits mask.

    Exactly one of: ``json_schema`` (the schema's JSON text, property order kept: it is the
    order generated), ``json_object`` (any JSON object), ``regex``, ``grammar`` (a Lark
    grammar as llguidance reads it) or ``choice`` (one of these strings). ``key`` (the kind
    and its text) is what compiled grammars are cached by.

    ``num_resumed_tokens``: the last that many prompt tokens are output this grammar already
    produced (a request continued on another worker, ``frontend.migration``); the engine
    replays them into the grammar before it samples, so the state is that of the
    uninterrupted run. ``lenient``: unsupported JSON-schema keywords are ignored instead of
    refused (a non-strict ``json_schema``).
    """

    json_schema: str | None = None
    json_object: bool = False
    regex: str | None = None
    grammar: str | None = None
    choice: tuple[str, ...] | None = None
    lenient: bool = False
    num_resumed_tokens: int = 0

    def __post_init__(self) -> None:
        kinds = [self.json_schema, self.regex, self.grammar, self.choice]
        num_set = sum(k is not None for k in kinds) + int(self.json_object)
        _check(num_set == 1, "structured_output", "needs exactly one kind of constraint")
        texts = [t for t in (self.json_schema, self.regex, self.grammar) if t is not None]
        texts += list(self.choice or ())
        _check(
            sum(map(len, texts)) <= MAX_GRAMMAR_CHARS,
            "structured_output",
            f"is longer than {MAX_GRAMMAR_CHARS} characters",
        )
        if self.choice is not None:
            _check(
                0 < len(self.choice) <= MAX_CHOICES and all(self.choice),
                "structured_output.choice",
                f"must hold 1 to {MAX_CHOICES} non-empty strings",
            )
        _check(self.num_resumed_tokens >= 0, "structured_output", "resumed tokens must be >= 0")

    @property
    def key(self) -> tuple[str, str]:
        """(kind, text): equal keys compile to the same grammar."""
        if self.json_schema is not None:
            return ("json_schema_lenient" if self.lenient else "json_schema", self.json_schema)
        if self.regex is not None:
            return ("regex", self.regex)
        if self.grammar is not None:
            return ("grammar", self.grammar)
        if self.choice is not None:
            return ("choice", "\x00".join(self.choice))
        return ("json_object", "")


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True):
    """How to sample one request's output.

    ``temperature == 0`` is greedy. ``top_k <= 0`` and ``top_p == 1`` disable those filters.
    ``max_tokens=None`` means "up to the context length". ``stop`` strings never appear in
    the output text; ``stop_token_ids`` end the request like EOS but are kept in token ids.
    ``logprobs=k`` returns the sampled token's logprob plus the top ``k`` alternatives.
    ``seed`` gives the request its own generator: same seed, same text, whatever the batch;
    it must be in ``[MIN_SEED, MAX_SEED]`` (the frontend seeds choice ``j`` of ``n`` with
    ``seed + j``, so ``seed + n - 1`` must be too). ``structured`` constrains the output to
    a JSON schema, regex, grammar or choice (``StructuredOutput``).
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
    structured: StructuredOutput | None = None  # constrained decoding (None: free text)

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
