"""``POST /v1/responses``: the Responses API's text-generation subset, on the chat path.

Served: ``input`` (a string, or message items whose content is a string or ``input_text`` /
``output_text`` parts), ``instructions`` (a system message first), ``max_output_tokens``,
``temperature``, ``top_p``, ``seed``, ``text.format`` (``text``, ``json_object``,
``json_schema``: structured output), ``stream`` (the typed events ``response.created`` ...
``response.output_text.delta`` ... ``response.completed``), usage. Nothing is stored
(``store`` is answered ``false``).

Refused with a 400 naming the field: ``previous_response_id`` and ``conversation`` (stored
conversations), ``background``, ``tools`` (built-in and function tools), ``prompt`` (stored
prompts), ``include``, ``top_logprobs``, ``reasoning``, ``truncation: "auto"``, input items
that are not messages (function calls and outputs, reasoning, item references) and content
parts that are not text.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import msgspec

from tokenmill.core.errors import InvalidRequestError
from tokenmill.frontend.preprocess import PreparedRequest, ServedModel, prepare_chat
from tokenmill.frontend.responses import ResponseMeta, Usage
from tokenmill.frontend.schemas import (
    ChatCompletionRequest,
    ChatMessage,
    JsonSchemaFormat,
    ResponseFormat,
    ResponsesRequest,
    StreamOptions,
)
from tokenmill.frontend.serving import ChoiceEvent

_encode = msgspec.json.Encoder().encode
_TEXT_PARTS = ("input_text", "output_text", "text")
# the chat request's field names, as the Responses API names them
_PARAMS = {
    "max_tokens": "max_output_tokens",
    "max_completion_tokens": "max_output_tokens",
    "response_format": "text.format",
    "response_format.type": "text.format.type",
    "response_format.json_schema.schema": "text.format.schema",
    "messages": "input",
}


def prepare_responses(
    model: ServedModel, req: ResponsesRequest, max_tokens_default: int | None = None
) -> PreparedRequest:
    """The request as a chat completion (one choice); refusals name Responses fields."""
    _refuse_unsupported(req)
    chat = ChatCompletionRequest(
        model=req.model,
        messages=_messages(req),
        max_completion_tokens=req.max_output_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        seed=req.seed,
        user=req.user,
        stream=req.stream,
        stream_options=StreamOptions(include_usage=True),
        response_format=_format(req),
    )
    try:
        prepared = prepare_chat(model, chat, max_tokens_default)
    except InvalidRequestError as e:
        e.param = _rename(e.param)
        raise
    return prepared


def _rename(param: str | None) -> str | None:
    if param is None:
        return None
    if param.startswith("messages["):
        return "input" + param[len("messages") :]
    return _PARAMS.get(param, param)


def _refuse_unsupported(req: ResponsesRequest) -> None:
    refused = {
        "previous_response_id": req.previous_response_id is not None,
        "conversation": req.conversation is not None,
        "background": bool(req.background),
        "tools": bool(req.tools),
        "prompt": req.stored_prompt is not None,
        "include": bool(req.include),
        "top_logprobs": bool(req.top_logprobs),
        "reasoning": bool(req.reasoning and any(v is not None for v in req.reasoning.values())),
        "truncation": req.truncation not in (None, "disabled"),
    }
    for name, bad in refused.items():
        if bad:
            raise InvalidRequestError(
                f"{name} is not supported by this server's /v1/responses (stateless text "
                "generation only)",
                param=name,
            )


def _messages(req: ResponsesRequest) -> list[ChatMessage]:
    messages = (
        [] if req.instructions is None else [ChatMessage(role="system", content=req.instructions)]
    )
    if isinstance(req.input, str):
        return [*messages, ChatMessage(role="user", content=req.input)]
    for i, item in enumerate(req.input):
        if item.get("type", "message") != "message" or "role" not in item:
            raise InvalidRequestError(
                f"input[{i}]: only message items are supported, got {item.get('type')!r}",
                param=f"input[{i}].type",
            )
        messages.append(ChatMessage(role=str(item["role"]), content=_text(item.get("content"), i)))
    return messages


def _text(content: Any, i: int) -> str | None:
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequestError(
            f"input[{i}].content must be a string or a list of parts", param=f"input[{i}].content"
        )
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in _TEXT_PARTS or not isinstance(part.get("text"), str):
            raise InvalidRequestError(
                f"input[{i}].content[{j}]: only text parts are supported, got {kind!r}",
                param=f"input[{i}].content[{j}].type",
            )
        texts.append(part["text"])
    return "\n".join(texts)


def _format(req: ResponsesRequest) -> ResponseFormat | None:
    fmt = req.text.format if req.text is not None else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_schema":
        schema = JsonSchemaFormat(name=fmt.name, schema=fmt.schema, strict=fmt.strict)
        return ResponseFormat(type="json_schema", json_schema=schema)
    return ResponseFormat(type=fmt.type)


def response_fields(req: ResponsesRequest) -> dict[str, Any]:
    """The request fields a response object repeats."""
    fmt = req.text.format if req.text is not None and req.text.format is not None else None
    return {
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "temperature": 1.0 if req.temperature is None else req.temperature,
        "top_p": 1.0 if req.top_p is None else req.top_p,
        "text": {"format": msgspec.to_builtins(fmt) if fmt is not None else {"type": "text"}},
        "metadata": req.metadata or {},
        "user": req.user,
    }


class _Response:
    """One response's state: its ids, text so far and final status."""

    def __init__(self, meta: ResponseMeta, fields: dict[str, Any]):
        self.meta, self.fields = meta, fields
        self.id = "resp_" + meta.id.split("-", 1)[-1]
        self.item_id = "msg_" + uuid.uuid4().hex
        self.created = int(time.time())
        self.texts: list[str] = []
        self.finish: str | None = None

    def item(self, status: str) -> dict[str, Any]:
        content = [] if status == "in_progress" else [self.part()]
        return {
            "id": self.item_id,
            "type": "message",
            "status": status,
            "role": "assistant",
            "content": content,
        }

    def part(self) -> dict[str, Any]:
        return {"type": "output_text", "text": "".join(self.texts), "annotations": []}

    @property
    def status(self) -> str:
        return "incomplete" if self.finish == "length" else "completed"

    def body(self, usage: Usage | None, done: bool) -> dict[str, Any]:
        status = self.status if done else "in_progress"
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "error": None,
            "incomplete_details": incomplete,
            "model": self.meta.model,
            "output": [self.item("completed" if status == "completed" else status)] if done else [],
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "store": False,
            "usage": None if usage is None else _usage(usage),
            **self.fields,
        }


def _usage(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.num_prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.num_cached_tokens},
        "output_tokens": usage.num_completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.num_prompt_tokens + usage.num_completion_tokens,
    }


class ResponsesCollector:
    """The whole response object of a non-streaming request (``Collector``'s interface)."""

    def __init__(self, meta: ResponseMeta, fields: dict[str, Any], usage: Usage):
        self._r, self.usage = _Response(meta, fields), usage

    def add(self, event: ChoiceEvent) -> None:
        self._r.texts.append(event.text)
        if event.finish_reason is not None:
            self._r.finish = event.finish_reason
        self.usage.add(event)

    def response(self) -> dict[str, Any]:
        return self._r.body(self.usage, done=True)


class ResponsesStream:
    """The typed SSE events of a streaming response (``StreamFormatter``'s interface:
    ``chunks`` per batch, ``usage_chunk`` the closing events, ``done`` the terminator)."""

    include_usage = True  # the closing events carry the usage
    done = b""  # no [DONE]: the stream ends after response.completed

    def __init__(self, meta: ResponseMeta, fields: dict[str, Any]):
        self._r = _Response(meta, fields)
        self._seq = 0
        self._started = False

    def _event(self, kind: str, **data: Any) -> bytes:
        body = {"type": kind, "sequence_number": self._seq, **data}
        self._seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + _encode(body) + b"\n\n"

    def _ids(self) -> dict[str, Any]:
        return {"item_id": self._r.item_id, "output_index": 0, "content_index": 0}

    def chunks(self, events: list[ChoiceEvent]) -> bytes:
        out = [] if self._started else self._opening()
        for event in events:
            if event.finish_reason is not None:
                self._r.finish = event.finish_reason
            if event.text:
                self._r.texts.append(event.text)
                out.append(
                    self._event(
                        "response.output_text.delta", **self._ids(), delta=event.text, logprobs=[]
                    )
                )
        return b"".join(out)

    def _opening(self) -> list[bytes]:
        self._started = True
        body = self._r.body(None, done=False)
        return [
            self._event("response.created", response=body),
            self._event("response.in_progress", response=body),
            self._event(
                "response.output_item.added", output_index=0, item=self._r.item("in_progress")
            ),
            self._event(
                "response.content_part.added",
                **self._ids(),
                part={"type": "output_text", "text": "", "annotations": []},
            ),
        ]

    def usage_chunk(self, usage: Usage) -> bytes:
        out = [] if self._started else self._opening()
        text = "".join(self._r.texts)
        done = "response.incomplete" if self._r.status == "incomplete" else "response.completed"
        out += [
            self._event("response.output_text.done", **self._ids(), text=text, logprobs=[]),
            self._event("response.content_part.done", **self._ids(), part=self._r.part()),
            self._event(
                "response.output_item.done", output_index=0, item=self._r.item(self._r.status)
            ),
            self._event(done, response=self._r.body(usage, done=True)),
        ]
        return b"".join(out)
