"""OpenAI response shapes for chat and text completions, streaming chunks and whole
responses, built from ``ChoiceEvent``s. Plain dicts encoded with msgspec (exact key order as
OpenAI's, ``null`` where OpenAI sends null). A chat request with tools (``ToolMode``) has
its text read by a ``ToolCallStream``: content and ``tool_calls`` (deltas when streaming),
finish reason ``tool_calls`` when the model called one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from tokenmill.core.request import TokenLogprob
from tokenmill.frontend.serving import ChoiceEvent
from tokenmill.frontend.tool_calls import ToolCallStream, ToolMode, merge_deltas

TokenText = Callable[[int], str]
# a token's raw bytes (``Tokenizer.token_bytes``): a token may be half of a UTF-8 character,
# whose text alone is U+FFFD; None: the UTF-8 of its text
TokenBytes = Callable[[int], bytes] | None

_encode = msgspec.json.Encoder().encode


def sse(obj: Any) -> bytes:
    return b"data: " + _encode(obj) + b"\n\n"


@dataclass
class Usage:
    """Token counts of one HTTP request. The prompt counts once per prompt (not per choice);
    cached tokens are those of each prompt's first choice."""

    n: int
    num_prompt_tokens: int
    num_completion_tokens: int = 0
    num_cached_tokens: int = 0
    num_finished: int = 0  # choices that ended (their event with a finish reason was added)

    def add(self, event: ChoiceEvent) -> None:
        if event.finish_reason is None:
            return
        self.num_finished += 1
        self.num_completion_tokens += event.num_output_tokens
        if event.index % self.n == 0:
            self.num_cached_tokens += event.num_cached_tokens

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.num_prompt_tokens,
            "completion_tokens": self.num_completion_tokens,
            "total_tokens": self.num_prompt_tokens + self.num_completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.num_cached_tokens},
        }


@dataclass
class ResponseMeta:
    id: str
    model: str
    chat: bool
    created: int = field(default_factory=lambda: int(time.time()))


def chat_logprobs(
    items: list[TokenLogprob], token_text: TokenText, token_bytes: TokenBytes = None
) -> dict[str, Any]:
    return {"content": [_chat_logprob(t, token_text, token_bytes) for t in items]}


def _chat_logprob(item: TokenLogprob, token_text: TokenText, token_bytes: TokenBytes):
    entry = _top_entry(item.token_id, item.logprob, token_text, token_bytes)
    entry["top_logprobs"] = [_top_entry(tid, lp, token_text, token_bytes) for tid, lp in item.top]
    return entry


def _top_entry(
    token_id: int, logprob: float, token_text: TokenText, token_bytes: TokenBytes
) -> dict[str, Any]:
    text = token_text(token_id)
    raw = text.encode() if token_bytes is None else token_bytes(token_id)
    return {"token": text, "logprob": logprob, "bytes": list(raw)}


def completion_logprobs(
    items: list[TokenLogprob], token_text: TokenText, offset: int = 0
) -> dict[str, Any]:
    tokens = [token_text(t.token_id) for t in items]
    offsets = []
    for tok in tokens:
        offsets.append(offset)
        offset += len(tok)
    return {
        "tokens": tokens,
        "token_logprobs": [t.logprob for t in items],
        "top_logprobs": [{token_text(tid): lp for tid, lp in t.top} for t in items],
        "text_offset": offsets,
    }


class StreamFormatter:
    """SSE chunks for one streaming request: one ``data:`` frame per event, byte for byte what
    encoding the OpenAI chunk object would give (the envelope is encoded once per request)."""

    def __init__(
        self,
        meta: ResponseMeta,
        token_text: TokenText,
        include_usage: bool,
        token_bytes: TokenBytes = None,
        tools: ToolMode | None = None,
    ):
        self.meta, self.token_text, self.include_usage = meta, token_text, include_usage
        self.token_bytes, self.tools = token_bytes, tools
        self._tool_streams: dict[int, ToolCallStream] = {}
        self._started: set[int] = set()
        self._object = "chat.completion.chunk" if meta.chat else "text_completion"
        # b'{"id":...,"choices":[]}' (or ...[],"usage":null}) cut after the '['
        envelope = _encode(self._envelope([], None))
        cut = envelope.index(b'"choices":[]') + len(b'"choices":[')
        self._head, self._tail = b"data: " + envelope[:cut], envelope[cut:] + b"\n\n"

    def chunks(self, events: list[ChoiceEvent]) -> bytes:
        """The frames of ``events``, concatenated."""
        head, tail = self._head, self._tail
        if self.tools is not None:
            frames = (self._tool_choice(e) for e in events)
            return b"".join([head + f + tail for f in frames if f])
        return b"".join([head + self._choice(e) + tail for e in events])

    def usage_chunk(self, usage: Usage) -> bytes:
        return sse(self._envelope([], usage.to_json()))

    def _choice(self, event: ChoiceEvent) -> bytes:
        text = _encode(event.text)
        rest = (
            b',"finish_reason":null}'
            if event.finish_reason is None
            else (b',"finish_reason":' + _encode(event.finish_reason) + b"}")
        )
        if event.logprobs:
            rest = b',"logprobs":' + _encode(self._logprobs(event)) + rest
        else:
            rest = b',"logprobs":null' + rest
        index = b'{"index":%d,' % event.index
        if not self.meta.chat:
            return index + b'"text":' + text + rest
        if event.index in self._started:
            return index + b'"delta":{"content":' + text + b"}" + rest
        self._started.add(event.index)
        return index + b'"delta":{"role":"assistant","content":' + text + b"}" + rest

    def _tool_choice(self, event: ChoiceEvent) -> bytes:
        """The choice of a chat chunk with tools: content and tool-call deltas (b"" when
        this event brought neither: its text is held back)."""
        assert self.tools is not None
        stream = self._tool_streams.get(event.index)
        if stream is None:
            stream = self._tool_streams[event.index] = ToolCallStream(self.tools)
        content, calls = stream.push(event.text)
        if event.finish_reason is not None:
            more, rest = stream.finish()
            content, calls = content + more, calls + rest
        finish = event.finish_reason
        if finish == "stop" and stream.num_calls:
            finish = "tool_calls"
        if not content and not calls and finish is None and not event.logprobs:
            return b""
        delta: dict[str, Any] = {}
        if event.index not in self._started:
            self._started.add(event.index)
            delta["role"] = "assistant"
        if content or not calls:
            delta["content"] = content
        if calls:
            delta["tool_calls"] = calls
        lp = self._logprobs(event) if event.logprobs else None
        return _encode(
            {"index": event.index, "delta": delta, "logprobs": lp, "finish_reason": finish}
        )

    def _logprobs(self, event: ChoiceEvent) -> dict[str, Any]:
        assert event.logprobs
        if self.meta.chat:
            return chat_logprobs(event.logprobs, self.token_text, self.token_bytes)
        return completion_logprobs(event.logprobs, self.token_text)

    def _envelope(self, choices: list[Any], usage: Any) -> dict[str, Any]:
        body = {
            "id": self.meta.id,
            "object": self._object,
            "created": self.meta.created,
            "model": self.meta.model,
            "choices": choices,
        }
        if self.include_usage:
            body["usage"] = usage
        return body


class Collector:
    """Accumulates events of a non-streaming request into the whole response."""

    def __init__(
        self,
        meta: ResponseMeta,
        token_text: TokenText,
        num_choices: int,
        usage: Usage,
        token_bytes: TokenBytes = None,
        tools: ToolMode | None = None,
    ):
        self.meta, self.token_text, self.usage = meta, token_text, usage
        self.token_bytes, self.tools = token_bytes, tools
        self._texts: list[list[str]] = [[] for _ in range(num_choices)]
        self._logprobs: list[list[TokenLogprob] | None] = [None] * num_choices
        self._finish: list[str | None] = [None] * num_choices

    def add(self, event: ChoiceEvent) -> None:
        i = event.index
        self._texts[i].append(event.text)
        if event.logprobs:
            self._logprobs[i] = (self._logprobs[i] or []) + list(event.logprobs)
        if event.finish_reason is not None:
            self._finish[i] = event.finish_reason
        self.usage.add(event)

    def response(self) -> dict[str, Any]:
        choices = [self._choice(i) for i in range(len(self._texts))]
        obj = "chat.completion" if self.meta.chat else "text_completion"
        return {
            "id": self.meta.id,
            "object": obj,
            "created": self.meta.created,
            "model": self.meta.model,
            "choices": choices,
            "usage": self.usage.to_json(),
        }

    def _choice(self, i: int) -> dict[str, Any]:
        text, items = "".join(self._texts[i]), self._logprobs[i]
        if self.meta.chat:
            lp = None if items is None else chat_logprobs(items, self.token_text, self.token_bytes)
            message: dict[str, Any] = {"role": "assistant", "content": text}
            finish = self._finish[i]
            if self.tools is not None:
                message, finish = self._tool_message(text, finish)
            return {"index": i, "message": message, "logprobs": lp, "finish_reason": finish}
        lp = completion_logprobs(items, self.token_text) if items is not None else None
        return {"index": i, "text": text, "logprobs": lp, "finish_reason": self._finish[i]}

    def _tool_message(self, text: str, finish: str | None) -> tuple[dict[str, Any], str | None]:
        assert self.tools is not None
        stream = ToolCallStream(self.tools)
        content, deltas = stream.push(text)
        more, rest = stream.finish()
        content, calls = content + more, merge_deltas(deltas + rest)
        if not calls:
            return {"role": "assistant", "content": content}, finish
        text = content if content.strip() else None  # None: only the newlines around calls
        message = {"role": "assistant", "content": text, "tool_calls": calls}
        return message, "tool_calls" if finish == "stop" else finish
