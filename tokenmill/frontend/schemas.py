"""OpenAI request bodies as msgspec structs (decoded straight from the request bytes).

Unknown fields are ignored (official clients send extras; ``unknown_fields`` lists them for a
debug log). Wrong types raise ``InvalidRequestError`` naming the field; so does JSON nested
deeper than the decoder's recursion limit (~1000 levels, in any field, even an unknown one).
``tools``, ``tool_choice`` and ``response_format`` are accepted by the decoder; the
preprocessor lets through only the no-op values SDKs send as defaults (``[]``, ``"none"``,
``{"type": "text"}``) and rejects any other with a 400 that names the field (not implemented).
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from tokenmill.core.errors import InvalidRequestError
from tokenmill.routing.options import RouterOptions


class ContentPart(msgspec.Struct, kw_only=True):
    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct, kw_only=True):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool | None = False


class _CommonRequest(msgspec.Struct, kw_only=True):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = False
    min_tokens: int | None = None
    skip_special_tokens: bool | None = True
    user: str | None = None
    cache_salt: str | None = None
    priority: int | None = None
    router: RouterOptions | None = None


class ChatCompletionRequest(_CommonRequest, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    # true: special-token text in message content becomes special tokens (default: text)
    parse_special_tokens: bool | None = False
    tools: Any = None
    tool_choice: Any = None
    response_format: Any = None


class CompletionRequest(_CommonRequest, kw_only=True):
    # kept as raw JSON: the preprocessor decodes token-id prompts straight into checked ids
    # (``preprocess._checked_ids``), any other shape into Python values
    prompt: msgspec.Raw
    logprobs: int | None = None
    echo: bool | None = False
    suffix: str | None = None


_TOO_DEEP = "malformed JSON body: nested too deeply"
_PATH = re.compile(r"at `\$\.?([A-Za-z_]+)")


def decode_request(body: bytes, kind: type[msgspec.Struct]) -> Any:
    """Decodes and type-checks ``body`` into ``kind``; ``InvalidRequestError`` otherwise (bad
    JSON, wrong types, nesting past the recursion limit)."""
    try:
        return msgspec.json.decode(body, type=kind)
    except RecursionError:  # msgspec's C decoder counts depth against Python's limit
        raise InvalidRequestError(_TOO_DEEP) from None
    except msgspec.ValidationError as e:
        match = _PATH.search(str(e))
        raise InvalidRequestError(str(e), param=match.group(1) if match else None) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as e:
        raise InvalidRequestError(f"malformed JSON body: {e}") from None


def unknown_fields(body: bytes, kind: type[msgspec.Struct]) -> list[str]:
    """Top-level keys of ``body`` that ``kind`` does not know (for a debug log only)."""
    try:
        keys = msgspec.json.decode(body)
    except (msgspec.DecodeError, RecursionError):
        return []
    return sorted(set(keys) - set(kind.__struct_fields__)) if isinstance(keys, dict) else []
