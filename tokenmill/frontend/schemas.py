"""OpenAI request bodies as msgspec structs (decoded straight from the request bytes).

Unknown fields are ignored (official clients send extras; ``unknown_fields`` lists them for a
debug log). Wrong types raise ``InvalidRequestError`` naming the field; so does JSON nested
deeper than the decoder's recursion limit (~1000 levels, in any field, even an unknown one).
Tool calling (``tools``, ``tool_choice``, ``role: "tool"`` messages, assistant messages with
``tool_calls``), ``response_format`` and vLLM's structured-output extensions (``guided_json``,
``guided_regex``, ``guided_choice``, ``guided_grammar``) decode into the structs below; the
preprocessor checks their values. ``ResponsesRequest`` is the body of ``POST /v1/responses``.
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


class FunctionCall(msgspec.Struct, kw_only=True):
    name: str
    arguments: str = "{}"  # JSON text, as OpenAI sends it


class ToolCall(msgspec.Struct, kw_only=True):
    id: str | None = None
    type: str = "function"
    function: FunctionCall


class ChatMessage(msgspec.Struct, kw_only=True):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's calls
    tool_call_id: str | None = None  # a tool message: the call it answers


class FunctionDefinition(msgspec.Struct, kw_only=True):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema (None: no arguments)
    strict: bool | None = None


class Tool(msgspec.Struct, kw_only=True):
    type: str
    function: FunctionDefinition | None = None


class NamedFunction(msgspec.Struct, kw_only=True):
    name: str


class NamedToolChoice(msgspec.Struct, kw_only=True):
    type: str
    function: NamedFunction | None = None
    name: str | None = None  # the Responses API's shape: {"type": "function", "name": ...}


class JsonSchemaFormat(msgspec.Struct, kw_only=True):
    name: str | None = None
    description: str | None = None
    schema: dict[str, Any] | None = None
    strict: bool | None = None


class ResponseFormat(msgspec.Struct, kw_only=True):
    type: str
    json_schema: JsonSchemaFormat | None = None


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
    response_format: ResponseFormat | None = None
    # vLLM's structured-output extensions (at most one, and not with response_format)
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None


class ChatCompletionRequest(_CommonRequest, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    # true: special-token text in message content becomes special tokens (default: text)
    parse_special_tokens: bool | None = False
    tools: list[Tool] | None = None
    tool_choice: str | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None


class CompletionRequest(_CommonRequest, kw_only=True):
    # kept as raw JSON: the preprocessor decodes token-id prompts straight into checked ids
    # (``preprocess._checked_ids``), any other shape into Python values
    prompt: msgspec.Raw
    logprobs: int | None = None
    echo: bool | None = False
    suffix: str | None = None


class ResponsesTextFormat(msgspec.Struct, kw_only=True):
    type: str = "text"
    name: str | None = None
    schema: dict[str, Any] | None = None
    strict: bool | None = None
    description: str | None = None


class ResponsesText(msgspec.Struct, kw_only=True):
    format: ResponsesTextFormat | None = None


class ResponsesRequest(msgspec.Struct, kw_only=True):
    """``POST /v1/responses``: the text-generation subset. ``input`` is a string or a list
    of message items (``{"role", "content"}``, content a string or ``input_text`` /
    ``output_text`` parts); the fields it does not serve are decoded to be refused by name."""

    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool | None = False
    text: ResponsesText | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    previous_response_id: str | None = None
    conversation: Any = None
    store: bool | None = None
    background: bool | None = None
    reasoning: dict[str, Any] | None = None
    include: list[str] | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    seed: int | None = None
    truncation: str | None = None
    top_logprobs: int | None = None
    # a stored prompt (refused); not ``prompt``: that name means a completion's prompt
    stored_prompt: Any = msgspec.field(default=None, name="prompt")
    service_tier: str | None = None
    max_tool_calls: int | None = None


_TOO_DEEP = "malformed JSON body: nested too deeply"
_PATH = re.compile(r"at `\$\.?([A-Za-z_][^`]*)`")  # the whole path: messages[0].role


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
