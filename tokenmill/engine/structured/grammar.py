"""Grammars for constrained decoding, built with llguidance.

- ``grammar_text(spec)``: the llguidance grammar of a ``StructuredOutput`` (JSON schema, any
  JSON object, regex, Lark grammar or a choice of strings); ``check(spec)`` validates it
  without a tokenizer (the frontend's 400, naming ``param``).
- ``GrammarCompiler``: per engine. ``prepare(spec)`` compiles in its own thread (never the
  engine thread) and caches the compiled matcher by ``spec.key`` (LRU); ``matcher(spec,
  replay)`` hands each request its own copy (microseconds on a hit; a miss compiles inline,
  which only the offline ``LLM`` path, that never calls ``prepare``, pays).
- ``RequestGrammar``: one request's matcher and how many of its output tokens it consumed;
  ``sync`` catches up with tokens appended since (jump-forward, speculative, replayed), so
  the grammar state is always that of the request's tokens.

JSON is generated compact but readable (``", "`` and ``": "``, no other whitespace): a
model cannot run away in whitespace. Masks are one bit per tokenizer id (``mask_words``
int32 words); ids past the tokenizer's vocabulary (a padded embedding) are never allowed.
"""

from __future__ import annotations

import collections
import json
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, cast

import llguidance
import numpy as np

from tokenmill.core.errors import InvalidRequestError
from tokenmill.core.sampling import StructuredOutput

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

DEFAULT_CACHE_SIZE = 256
_JSON_OPTIONS: dict[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}


def grammar_text(spec: StructuredOutput) -> str:
    """The llguidance grammar (JSON text) of ``spec``; ``InvalidRequestError`` when a JSON
    schema is not JSON."""
    if spec.json_schema is not None or spec.json_object:
        schema = spec.json_schema if spec.json_schema is not None else '{"type": "object"}'
        options = cast("JsonCompileOptions", {**_JSON_OPTIONS, "lenient": spec.lenient})
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=options)
        except ValueError as e:
            raise InvalidRequestError(f"invalid JSON schema: {e}", param=_param(spec)) from None
    if spec.regex is not None:
        return llguidance.LLMatcher.grammar_from_regex(spec.regex)
    if spec.grammar is not None:
        return llguidance.LLMatcher.grammar_from_lark(spec.grammar)
    assert spec.choice is not None
    alternatives = " | ".join(json.dumps(c) for c in spec.choice)  # Lark string literals
    return llguidance.LLMatcher.grammar_from_lark(f"start: {alternatives}")


def check(spec: StructuredOutput, param: str | None = None) -> str:
    """The grammar of ``spec`` after llguidance validated it; ``InvalidRequestError`` with
    its message (``param``: the request field to name) otherwise."""
    text = grammar_text(spec)
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(text)
    if is_error:
        raise InvalidRequestError(
            f"invalid {_kind(spec)}: {messages[0] if messages else 'rejected'}",
            param=param or _param(spec),
        )
    return text


def _kind(spec: StructuredOutput) -> str:
    return {"json_schema_lenient": "json_schema"}.get(spec.key[0], spec.key[0])


def _param(spec: StructuredOutput) -> str:
    return f"structured_output.{_kind(spec)}"


class GrammarCompiler:
    """Compiles and caches grammars for one tokenizer. Thread-safe. The llguidance
    tokenizer (a fraction of a second for a 50k vocabulary) is built on first use, in the
    compile thread. ``tokenizer_json``: the ``tokenizers`` JSON of the model's tokenizer;
    ``eos_token_ids``: the ids a finished grammar allows (the first is llguidance's EOS)."""

    def __init__(
        self,
        tokenizer_json: str,
        vocab_size: int,
        eos_token_ids: Sequence[int],
        cache_size: int = DEFAULT_CACHE_SIZE,
        num_threads: int = 1,
    ):
        self._json, self.vocab_size = tokenizer_json, vocab_size
        self._eos = list(eos_token_ids)
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._cache: collections.OrderedDict[tuple[str, str], llguidance.LLMatcher] = (
            collections.OrderedDict()
        )
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(num_threads, thread_name_prefix="grammar")
        self.executor = llguidance.LLExecutor(num_threads=2)  # masks of a batch, in parallel

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, **kwargs: Any) -> GrammarCompiler:
        """From an ``engine.tokenizer.Tokenizer``."""
        return cls(tokenizer.to_json(), tokenizer.vocab_size, tokenizer.eos_token_ids, **kwargs)

    @property
    def mask_words(self) -> int:
        """int32 words per mask row (one bit per tokenizer id)."""
        return (self.vocab_size + 31) // 32

    def prepare(self, spec: StructuredOutput) -> Future[None]:
        """Compiles ``spec`` into the cache in the compile thread; the future fails with
        ``InvalidRequestError`` when the grammar does not compile. Done at once on a hit."""
        with self._lock:
            if spec.key in self._cache:
                self._cache.move_to_end(spec.key)
                done: Future[None] = Future()
                done.set_result(None)
                return done
        return self._pool.submit(self._compiled, spec)  # type: ignore[arg-type]

    def matcher(self, spec: StructuredOutput) -> llguidance.LLMatcher:
        """A fresh matcher for one request (a copy of the cached one; compiled now on a miss)."""
        return self._compiled(spec).deep_copy()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _compiled(self, spec: StructuredOutput) -> llguidance.LLMatcher:
        with self._lock:
            hit = self._cache.get(spec.key)
            if hit is not None:
                self._cache.move_to_end(spec.key)
                return hit
        matcher = llguidance.LLMatcher(self._llg_tokenizer(), check(spec), log_level=0)
        if matcher.is_error():
            raise InvalidRequestError(
                f"invalid {_kind(spec)}: {matcher.get_error()}", param=_param(spec)
            )
        with self._lock:
            self._cache[spec.key] = matcher
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return matcher

    def _llg_tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = llguidance.LLTokenizer(
                    self._json, n_vocab=self.vocab_size, eos_token=self._eos
                )
            return self._tokenizer


class RequestGrammar:
    """One constrained request's matcher. ``sync(output_ids)`` consumes the output tokens it
    has not seen; ``fill_mask`` / ``consume`` / ``jump_forward`` are the per-step protocol.
    ``error`` is set (and stays) once a token the grammar refuses was consumed."""

    def __init__(self, matcher: llguidance.LLMatcher, replayed: Sequence[int] = ()):
        self.matcher = matcher
        self.num_consumed = 0  # output tokens consumed (replayed prompt tokens not counted)
        self.error: str | None = None
        if replayed:
            self._consume(list(replayed))

    def sync(self, output_token_ids: Sequence[int]) -> None:
        if len(output_token_ids) > self.num_consumed:
            self.consume(list(output_token_ids[self.num_consumed :]))

    def consume(self, token_ids: list[int]) -> None:
        """Output tokens sampled (or forced) for this request, in order."""
        self.num_consumed += len(token_ids)
        self._consume(token_ids)

    def _consume(self, token_ids: list[int]) -> None:
        if self.error is None and not self.matcher.consume_tokens(token_ids):
            self.error = f"grammar refused a token: {self.matcher.get_error()}"

    def jump_forward(self) -> list[int]:
        """Tokens the grammar forces next (consumed already; may be empty)."""
        if self.error is not None or self.matcher.is_stopped():
            return []
        forced = self.matcher.compute_ff_tokens()
        if forced:
            self.consume(forced)
        return forced


def fill_masks(
    compiler: GrammarCompiler, grammars: Sequence[RequestGrammar], out: np.ndarray
) -> None:
    """Row ``i`` of ``out`` ([len(grammars), mask_words] int32, C-contiguous) becomes
    ``grammars[i]``'s allowed ids, computed in parallel (the GIL released)."""
    assert out.dtype == np.int32 and out.flags.c_contiguous
    pairs = [(g.matcher, i) for i, g in enumerate(grammars)]
    compiler.executor.unsafe_compute_mask_ptr(
        pairs, out.ctypes.data, out.shape[1] * 4, out.shape[0]
    )
