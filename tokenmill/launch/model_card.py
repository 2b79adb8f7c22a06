"""Model cards: what a worker publishes so a frontend on another host can serve its model.

The card travels in the worker instance's discovery metadata (strings): served name, context
length, block size, KV capacity in blocks, and ``tokenizer``, the XXH3-128 hex digest of the
tokenizer blob. The blob itself (``tokenizer.json`` content, special tokens, EOS ids and the
chat template, msgpack) is stored in the NATS object store under that digest, so it crosses
the wire once per distinct tokenizer, not once per instance listing.
"""

from __future__ import annotations

from typing import Any

import msgspec
import xxhash

CARD_KEYS = ("model", "context_length", "block_size", "kv_blocks", "tokenizer")


class ModelCard(msgspec.Struct, frozen=True, kw_only=True):
    model: str
    context_length: int
    block_size: int
    kv_blocks: int
    tokenizer: str  # blob digest

    def metadata(self) -> dict[str, str]:
        return {key: str(getattr(self, key)) for key in CARD_KEYS}

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> ModelCard | None:
        """The card in an instance's metadata; None for an instance without one."""
        if not all(key in metadata for key in CARD_KEYS):
            return None
        return cls(
            model=metadata["model"],
            context_length=int(metadata["context_length"]),
            block_size=int(metadata["block_size"]),
            kv_blocks=int(metadata["kv_blocks"]),
            tokenizer=metadata["tokenizer"],
        )


class _TokenizerBlob(msgspec.Struct, frozen=True):
    tokenizer_json: str
    special_tokens: dict[str, str]
    eos_token_ids: list[int]
    chat_template: str | None


def tokenizer_blob(tokenizer: Any) -> tuple[str, bytes]:
    """(digest, blob) of an ``engine.tokenizer.Tokenizer``."""
    blob = msgspec.msgpack.encode(
        _TokenizerBlob(
            tokenizer._backend.to_str(),
            dict(tokenizer.special_tokens),
            list(tokenizer.eos_token_ids),
            tokenizer.chat_template,
        )
    )
    return xxhash.xxh3_128_hexdigest(blob), blob


def tokenizer_from_blob(blob: bytes) -> Any:
    """The ``Tokenizer`` a blob from ``tokenizer_blob`` describes."""
    import tokenizers

    from tokenmill.engine.tokenizer import Tokenizer

    data = msgspec.msgpack.decode(blob, type=_TokenizerBlob)
    backend = tokenizers.Tokenizer.from_str(data.tokenizer_json)
    return Tokenizer(backend, data.special_tokens, data.eos_token_ids, data.chat_template)
