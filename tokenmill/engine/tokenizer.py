"""The engine's tokenizer: a ``tokenizers.Tokenizer`` plus the special tokens and chat template
that come with a model, loaded from a Hugging Face directory or rebuilt from GGUF metadata.

No torch here (the frontend tokenizes too). GGUF metadata arrives as a plain mapping of
llama.cpp keys (``tokenizer.ggml.tokens``, ...) or any object with such a ``fields`` mapping.

GGUF tokenizers, rebuilt the way llama.cpp reads them (and as transformers' GGUF converter does):

| ``tokenizer.ggml.model`` / ``.pre`` | model | pre-tokenizer |
|---|---|---|
| gpt2 / gpt2 (or no pre) | byte-level BPE | GPT-2 regex |
| gpt2 / smollm | byte-level BPE | digits split singly, then GPT-2 regex |
| gpt2 / llama-bpe | byte-level BPE, ignore_merges | Llama 3 regex |
| gpt2 / qwen2 | byte-level BPE | Qwen2 regex |
| llama | SentencePiece BPE (byte fallback; merges from scores if absent) | Metaspace |

Any other model or pre type raises ModelLoadError naming it.

Chat prompts (``encode_chat``): the template's own markers are special tokens; text inside
the messages is tokenized as text, so a message that spells ``<|im_end|>`` cannot close its
turn (unless the caller opts in with ``parse_special=True``). A message without special-token
text gives exactly the ids of ``encode(apply_chat_template(...))``.

Long texts: ``encode`` releases the GIL for texts over ``GIL_FREE_CHARS`` (``tokenizers``'
``encode`` holds it, ``encode_batch`` does not), and ``max_num_tokens`` rejects, before
tokenizing, a text that provably has more tokens (``min_num_tokens``: its length over the
longest token's, exact for the BPE pipelines that never drop or merge away input).
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

from tokenmill.core.chat_template import Message, compile_template, render_chat_template
from tokenmill.core.errors import ModelLoadError, PromptTooLongError

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4
_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
# texts longer than this are encoded through ``encode_batch``, which releases the GIL (a 4 MB
# text holds it ~2 s in ``encode``, stalling every stream); shorter ones cost less inline
GIL_FREE_CHARS = 4096
# pipeline steps that never drop input characters nor turn several into one (so a token of
# k characters covers at most k input characters): what ``min_num_tokens`` is exact for
_LENGTH_SAFE_PRE_TOKENIZERS = {
    "ByteLevel",
    "Digits",
    "Metaspace",
    "Split",
    "Punctuation",
    "Sequence",
}
_LENGTH_SAFE_NORMALIZERS = {"Prepend", "Sequence"}


class Tokenizer:
    """Text <-> token ids, special tokens and the chat template of one model. Immutable after
    construction and safe to share between threads; long texts are tokenized with the GIL
    released (``GIL_FREE_CHARS``)."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        special_tokens: Mapping[str, str] | None = None,
        eos_token_ids: Sequence[int] = (),
        chat_template: str | None = None,
    ):
        self._backend = backend
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v}
        self.chat_template = chat_template
        eos = [backend.token_to_id(self.special_tokens.get("eos_token", "")), *eos_token_ids]
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(i for i in eos if i is not None))
        bos = self.special_tokens.get("bos_token")
        self.bos_token_id: int | None = backend.token_to_id(bos) if bos else None
        added = backend.get_added_tokens_decoder()
        self.all_special_ids: tuple[int, ...] = tuple(
            sorted(i for i, t in added.items() if t.special)
        )
        self._added_ids = frozenset(added)  # spelled as plain text, not in a byte alphabet
        self._byte_level = isinstance(backend.decoder, decoders.ByteLevel)
        if chat_template:
            compile_template(chat_template)  # a broken template fails at load, not per request
        pipeline = backend.to_str()
        # the same pipeline with special-token text split like any text (message contents)
        self._text_backend = tokenizers.Tokenizer.from_str(pipeline)
        self._text_backend.encode_special_tokens = True
        specials = sorted((t.content for t in added.values() if t.special), key=len, reverse=True)
        alternatives = "|".join(map(re.escape, specials))  # longest first, as tokenizers matches
        self._special_re = re.compile(f"({alternatives})") if specials else None
        self.max_token_chars: int | None = _max_token_chars(backend, json.loads(pipeline))

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the model's embedding may be larger)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def to_json(self) -> str:
        """The ``tokenizers`` JSON of the pipeline (vocabulary, merges, added tokens): what
        the grammar library builds its token trie from (``engine/structured``)."""
        return self._backend.to_str()

    def encode(
        self,
        text: str,
        add_special_tokens: bool = False,
        parse_special: bool = True,
        max_num_tokens: int | None = None,
    ) -> list[int]:
        """Ids of ``text``; special-token text (``<|im_start|>``) maps to its single id, or
        with ``parse_special=False`` is tokenized as text. ``add_special_tokens`` adds what
        the tokenizer's post-processor adds (e.g. BOS). Raises ``PromptTooLongError``, without
        tokenizing, when ``text`` provably has more than ``max_num_tokens`` tokens."""
        self._check_length(text, max_num_tokens)
        backend = self._backend if parse_special else self._text_backend
        if len(text) <= GIL_FREE_CHARS:
            return backend.encode(text, add_special_tokens=add_special_tokens).ids
        return backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def min_num_tokens(self, text: str) -> int:
        """A lower bound on the number of tokens of ``text`` from its length alone: no token
        covers more than ``max_token_chars`` characters (0 when the pipeline allows no bound:
        a normalizer or pre-tokenizer that may drop characters, an unknown token that fuses)."""
        return 0 if self.max_token_chars is None else -(-len(text) // self.max_token_chars)

    def _check_length(self, text: str, max_num_tokens: int | None) -> None:
        if max_num_tokens is not None and (at_least := self.min_num_tokens(text)) > max_num_tokens:
            raise PromptTooLongError(at_least, max_num_tokens)

    def encode_chat(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = True,
        parse_special: bool = False,
        max_num_tokens: int | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[int]:
        """The prompt ids of ``messages`` (dicts with ``role`` and ``content``). Special-token
        text inside a ``content`` is tokenized as text, unless ``parse_special``; only the
        template's own markers are special tokens. A prompt without such text gives the ids
        of ``encode(apply_chat_template(...))``. ``max_num_tokens`` as in ``encode``;
        ``tools`` (OpenAI tool dicts) are given to the template as its ``tools``.

        How: contents' special-token text is swapped for sentinels, the template rendered,
        the text split at the (template's) special tokens left, and each piece between them
        tokenized as text with its sentinels restored: the pieces are those ``tokenizers``
        itself would tokenize apart, so text around a restored marker merges as usual."""
        extra = {} if tools is None else {"tools": tools}
        text = self.apply_chat_template(messages, add_generation_prompt, **extra)
        self._check_length(text, max_num_tokens)
        marked = None if parse_special else self._mark_special_text(messages)
        if marked is None:
            return self.encode(text)
        sentinel, originals, marked_messages = marked
        assert self._special_re is not None  # marked only when there are special tokens
        pieces = self._special_re.split(
            self.apply_chat_template(marked_messages, add_generation_prompt, **extra)
        )
        ids: list[int] = []
        for i, piece in enumerate(pieces):  # split keeps the specials at odd indices
            if i % 2:
                ids.append(self._backend.token_to_id(piece))
            elif piece:
                restored = sentinel.sub(lambda m: originals[int(m[1])], piece)
                ids += self.encode(restored, parse_special=False)
        return ids

    def _mark_special_text(
        self, messages: Sequence[Message]
    ) -> tuple[re.Pattern[str], list[str], list[dict[str, Any]]] | None:
        """(sentinel pattern, the special texts it stands for, messages with them swapped),
        or None when no content spells a special token."""
        special = self._special_re
        if special is None or not any(
            isinstance(m.get("content"), str) and special.search(m["content"]) for m in messages
        ):
            return None
        nonce = secrets.token_hex(8)  # a client cannot forge a sentinel it does not know
        originals: list[str] = []

        def swap(match: re.Match[str]) -> str:
            originals.append(match[0])
            return f"\ue000{nonce}:{len(originals) - 1}\ue001"

        marked = [
            {**m, "content": special.sub(swap, m["content"])}
            if isinstance(m.get("content"), str)
            else dict(m)
            for m in messages
        ]
        return re.compile(f"\ue000{nonce}:(\\d+)\ue001"), originals, marked

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes ``token_id`` stands for. A byte-level BPE token may be half of a
        UTF-8 character (decoded alone it is U+FFFD): its spelling maps back through the byte
        alphabet. A SentencePiece byte-fallback token ``<0xE2>`` is that byte, and its other
        pieces spell a space ``▁``. Added tokens and anything else: the UTF-8 of the
        token decoded alone. Unknown ids: ``b""``."""
        token = self._backend.id_to_token(token_id)
        if token is None:
            return b""
        if token_id not in self._added_ids:
            if self._byte_level:
                spelled = _unicode_to_bytes()
                if all(c in spelled for c in token):
                    return bytes(spelled[c] for c in token)
            elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                with contextlib.suppress(ValueError):
                    return bytes([int(token[3:5], 16)])
            elif "▁" in token:  # decoded alone, a leading space would be stripped
                return token.replace("▁", " ").encode()
        return self.decode([token_id], skip_special_tokens=False).encode()

    def apply_chat_template(
        self, messages: Sequence[Message], add_generation_prompt: bool = True, **extra: Any
    ) -> str:
        """The prompt text (not ids: encode it with ``add_special_tokens=False``)."""
        return render_chat_template(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            special_tokens=self.special_tokens,
            **extra,
        )

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        """From ``tokenizer.json``, ``tokenizer_config.json`` (special tokens, chat template;
        or ``chat_template.jinja``) and ``generation_config.json`` (extra EOS ids)."""
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise ModelLoadError(f"{file}: no tokenizer.json in the model directory")
        try:
            backend = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:
            raise ModelLoadError(f"{file}: cannot read the tokenizer: {e}") from None
        config = _read_json(path / "tokenizer_config.json")
        special = {name: _token_text(config.get(name)) for name in _SPECIAL_NAMES}
        eos_ids = _as_ids(_read_json(path / "generation_config.json").get("eos_token_id"))
        template = _hf_chat_template(path, config)
        return cls(backend, special, eos_ids, template)

    @classmethod
    def from_gguf(cls, meta: Any) -> Tokenizer:
        """From GGUF metadata (a mapping of llama.cpp keys, or an object with ``fields``)."""
        fields: Mapping[str, Any] = getattr(meta, "fields", meta)
        source = getattr(meta, "path", "GGUF file")
        tokens = fields.get("tokenizer.ggml.tokens")
        if not tokens:
            raise ModelLoadError(f"{source}: no tokenizer.ggml.tokens in the GGUF metadata")
        backend = _build_gguf_backend(fields, str(source))
        special = {
            name: tokens[i] if i is not None and 0 <= i < len(tokens) else None
            for name, i in _gguf_special_ids(fields).items()
        }
        # llama.cpp ends generation on EOT/EOM too (Llama 3's <|eot_id|>, <|eom_id|>)
        end_ids = [fields.get(f"tokenizer.ggml.{k}_token_id") for k in ("eot", "eom")]
        end_ids = [int(i) for i in end_ids if i is not None]
        return cls(backend, special, end_ids, fields.get("tokenizer.chat_template"))


def _max_token_chars(backend: tokenizers.Tokenizer, config: Mapping[str, Any]) -> int | None:
    """The most input characters one token can cover (its own length: a byte-level token has
    one character per byte, a SentencePiece one per character with ``▁`` for a space), or
    None when the pipeline (``config``: its JSON) may drop or fuse input (see
    ``Tokenizer.min_num_tokens``)."""
    model = config.get("model") or {}
    fuses_unknown = model.get("unk_token") is not None and model.get("fuse_unk")
    if model.get("type") != "BPE" or fuses_unknown and not model.get("byte_fallback"):
        return None
    if not (
        _length_safe(config.get("normalizer"), _LENGTH_SAFE_NORMALIZERS, "normalizers")
        and _length_safe(config.get("pre_tokenizer"), _LENGTH_SAFE_PRE_TOKENIZERS, "pretokenizers")
    ):
        return None
    return max((len(token) for token in backend.get_vocab(with_added_tokens=True)), default=1)


def _length_safe(step: Mapping[str, Any] | None, safe: set[str], children: str) -> bool:
    if step is None:
        return True
    if step.get("type") not in safe or step.get("behavior") == "Removed":
        return False
    return all(_length_safe(child, safe, children) for child in step.get(children) or ())


def _read_json(file: Path) -> dict[str, Any]:
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{file}: not valid JSON: {e}") from None


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json spells a special token as a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _as_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return (int(value),) if isinstance(value, int) else tuple(int(v) for v in value)


def _hf_chat_template(path: Path, config: Mapping[str, Any]) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default")
    jinja_file = path / "chat_template.jinja"
    if template is None and jinja_file.is_file():
        template = jinja_file.read_text(encoding="utf-8")
    return template


def _gguf_special_ids(fields: Mapping[str, Any]) -> dict[str, int | None]:
    keys = {"bos_token": "bos", "eos_token": "eos", "unk_token": "unknown", "pad_token": "padding"}
    return {name: fields.get(f"tokenizer.ggml.{key}_token_id") for name, key in keys.items()}


def _build_gguf_backend(fields: Mapping[str, Any], source: str) -> tokenizers.Tokenizer:
    model_type = fields.get("tokenizer.ggml.model")
    if model_type == "gpt2":
        backend = _byte_level_backend(fields, source)
        add_bos_default = False
    elif model_type == "llama":
        backend = _sentencepiece_backend(fields)
        add_bos_default = True  # llama.cpp adds BOS to SentencePiece vocabularies by default
    else:
        raise ModelLoadError(
            f"{source}: unsupported GGUF tokenizer model {model_type!r} "
            "(supported: 'gpt2' byte-level BPE, 'llama' SentencePiece)"
        )
    _add_gguf_special_tokens(backend, fields, byte_level=model_type == "gpt2")
    if fields.get("tokenizer.ggml.add_bos_token", add_bos_default):
        _add_bos_post_processor(backend, fields)
    return backend


def _byte_level_pre_tokenizer(pre: str) -> tuple[pre_tokenizers.PreTokenizer, bool] | None:
    """(pre-tokenizer, ignore_merges) for a byte-level ``tokenizer.ggml.pre`` type, or None."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), False
    if pre == "smollm":
        digits = pre_tokenizers.Digits(individual_digits=True)
        gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        return pre_tokenizers.Sequence([digits, gpt2]), False
    splits = {"llama-bpe": (_LLAMA3_SPLIT, True), "qwen2": (_QWEN2_SPLIT, False)}
    if pre not in splits:
        return None
    regex, ignore_merges = splits[pre]
    split = pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False)
    return pre_tokenizers.Sequence([split, byte_level]), ignore_merges


def _byte_level_backend(fields: Mapping[str, Any], source: str) -> tokenizers.Tokenizer:
    pre = fields.get("tokenizer.ggml.pre") or "gpt2"
    chosen = _byte_level_pre_tokenizer(pre)
    if chosen is None:
        raise ModelLoadError(
            f"{source}: unsupported GGUF pre-tokenizer type {pre!r} "
            "(supported: 'gpt2', 'smollm', 'llama-bpe', 'qwen2', and SentencePiece 'llama')"
        )
    pre_tokenizer, ignore_merges = chosen
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {}
    for index, token in enumerate(fields["tokenizer.ggml.tokens"]):
        if not set(token) <= alphabet:  # stored as raw text: respell in the byte alphabet
            token = "".join(spelling[b] for b in token.encode("utf-8"))
        vocab.setdefault(token, index)
    merges = [tuple(m.split(" ", 1)) for m in fields.get("tokenizer.ggml.merges") or ()]
    model = models.BPE(vocab, merges, ignore_merges=ignore_merges)
    backend = tokenizers.Tokenizer(model)
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_backend(fields: Mapping[str, Any]) -> tokenizers.Tokenizer:
    tokens = fields["tokenizer.ggml.tokens"]
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)
    merges = fields.get("tokenizer.ggml.merges")
    if merges:
        merge_pairs = [tuple(m.split(" ", 1)) for m in merges]
    else:
        merge_pairs = _merges_from_scores(vocab, tokens, fields.get("tokenizer.ggml.scores"))
    unk_id = fields.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    backend = tokenizers.Tokenizer(
        models.BPE(vocab, merge_pairs, unk_token=unk, fuse_unk=True, byte_fallback=True)
    )
    add_prefix = bool(fields.get("tokenizer.ggml.add_space_prefix", True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first" if add_prefix else "never", split=False
    )
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _merges_from_scores(
    vocab: Mapping[str, int], tokens: Sequence[str], scores: Sequence[float] | None
) -> list[tuple[str, str]]:
    """SentencePiece BPE merges implied by the vocabulary: a token splits into two known pieces;
    a merge ranks by the score of the token it makes (highest first), as SentencePiece does."""
    if scores is None:
        scores = [-float(i) for i in range(len(tokens))]
    ranked = []
    for token, score in zip(tokens, scores, strict=False):
        local = [
            (token[:i], token[i:], score)
            for i in range(1, len(token))
            if token[:i] in vocab and token[i:] in vocab
        ]
        ranked.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    ranked.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in ranked]


def _add_gguf_special_tokens(
    backend: tokenizers.Tokenizer, fields: Mapping[str, Any], byte_level: bool
) -> None:
    """CONTROL tokens become special added tokens, USER_DEFINED ones plain added tokens, so
    they are matched whole in text (as llama.cpp does). A byte-level CONTROL token spelled
    outside the byte alphabet is a llama.cpp mislabel and is skipped."""
    alphabet = set(_bytes_to_unicode().values()) if byte_level else None
    tokens = fields["tokenizer.ggml.tokens"]
    types = fields.get("tokenizer.ggml.token_type") or ()
    control = [
        AddedToken(t, normalized=False, special=True)
        for t, kind in zip(tokens, types, strict=False)
        if kind == _TOKEN_TYPE_CONTROL and (alphabet is None or set(t) <= alphabet)
    ]
    user = [
        AddedToken(t, normalized=False, special=False)
        for t, kind in zip(tokens, types, strict=False)
        if kind == _TOKEN_TYPE_USER_DEFINED
    ]
    backend.add_special_tokens(control)
    backend.add_tokens(user)


def _add_bos_post_processor(backend: tokenizers.Tokenizer, fields: Mapping[str, Any]) -> None:
    bos_id = fields.get("tokenizer.ggml.bos_token_id")
    if bos_id is None:
        return
    bos = fields["tokenizer.ggml.tokens"][bos_id]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
    )


@lru_cache(maxsize=1)
def _unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in _bytes_to_unicode().items()}


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (the byte-level alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping
