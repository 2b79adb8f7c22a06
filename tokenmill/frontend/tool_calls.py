"""Tool calls in a model's output: how a request's text becomes OpenAI ``tool_calls``.

A request with tools runs in one ``ToolMode``:

- ``parse`` (``tool_choice: "auto"``): the model writes its family's format and a parser
  finds the calls; text outside them is the message content.
  ``hermes`` (Hermes, Qwen 2/2.5/3, and any ChatML template that does not render tools
  itself: the tools are then described in a Hermes-style system prompt):
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, any number of them;
  ``llama3``: the whole output is ``{"name": ..., "parameters": {...}}`` (optionally after
  ``<|python_tag|>``, several separated by ``;``); ``mistral``: ``[TOOL_CALLS]`` then a JSON
  array of ``{"name", "arguments"}`` (the marker is a special token, so the array may
  arrive without it).
- ``required`` / ``named``: the output is constrained by a JSON schema (structured output,
  so it always parses): a non-empty array of ``{"name", "arguments"}`` of the given tools,
  or the named function's arguments object.

``ToolCallStream`` turns text deltas into content deltas and OpenAI tool-call deltas
(``{"index", "id", "type", "function": {"name", "arguments"}}``); the whole response is the
same stream read at once. Text that might start a tool call is held back until it is known.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

PARSERS = ("hermes", "llama3", "mistral")
_HERMES_OPEN, _HERMES_CLOSE = "<tool_call>", "</tool_call>"
_PYTHON_TAG, _MISTRAL_TAG = "<|python_tag|>", "[TOOL_CALLS]"


@dataclass(frozen=True)
class ToolMode:
    """How one request's output becomes tool calls; ``name``: the named function."""

    kind: str  # "parse", "required" or "named"
    parser: str = "hermes"
    name: str | None = None


def detect_parser(template: str | None) -> str:
    """The tool-call format a chat template teaches its model (hermes when it names none)."""
    text = template or ""
    if _MISTRAL_TAG in text:
        return "mistral"
    if _PYTHON_TAG in text or "ipython" in text:
        return "llama3"
    return "hermes"


def renders_tools(template: str | None) -> bool:
    """Whether the template itself renders ``tools`` (else a system prompt describes them)."""
    return bool(template) and "tools" in (template or "")


def system_prompt(tools: list[dict[str, Any]]) -> str:
    """The Hermes function-calling system prompt for ``tools`` (OpenAI tool dicts)."""
    listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return (
        "You are a function calling AI model. You may call one or more functions to assist "
        "with the user query. Don't make assumptions about what values to plug into "
        f"functions. Here are the available tools: <tools>\n{listed}\n</tools>\n"
        "For each function call, return a json object with the function name and arguments "
        "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
    )


def required_schema(tools: list[dict[str, Any]], parallel: bool) -> dict[str, Any]:
    """The JSON schema of ``tool_choice: "required"``: one call or more (one: not parallel)."""
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"const": t["function"]["name"]},
                "arguments": parameters_schema(t),
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def parameters_schema(tool: dict[str, Any]) -> dict[str, Any]:
    return tool["function"].get("parameters") or {"type": "object", "properties": {}}


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _call_delta(index: int, name: str, arguments: str) -> dict[str, Any]:
    return {
        "index": index,
        "id": new_call_id(),
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


class ToolCallStream:
    """One choice's text -> (content delta, tool-call deltas). ``push`` per text delta,
    ``finish`` once at the end; ``num_calls`` counts the calls emitted."""

    def __init__(self, mode: ToolMode):
        self.mode = mode
        self.num_calls = 0
        self._buf = ""  # text not yet emitted (held back or inside a call)
        self._named_started = False
        self._undecided = mode.kind == "parse" and mode.parser in ("llama3", "mistral")
        self._whole: bool = mode.kind == "required"  # buffer everything until the end

    def push(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        if self.mode.kind == "named":
            return "", self._named(text)
        self._buf += text
        if self._whole:
            return "", []
        if self._undecided:
            return self._decide()
        return self._hermes(final=False)

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        if self.mode.kind == "named":
            return "", self._named("")
        if self.mode.kind == "required":
            return self._json_calls(self._buf, "arguments")
        if self.mode.parser == "hermes":
            return self._hermes(final=True)
        if self._whole:
            return self._whole_output()
        content, self._buf = self._buf, ""
        return content, []

    # -- named: the output is the arguments ------------------------------------------------

    def _named(self, text: str) -> list[dict[str, Any]]:
        if self._named_started:
            return [{"index": 0, "function": {"arguments": text}}] if text else []
        self._named_started = True
        self.num_calls = 1
        return [_call_delta(0, self.mode.name or "", text)]

    # -- llama3 / mistral: the whole output is the calls, or it is content -----------------

    def _decide(self) -> tuple[str, list[dict[str, Any]]]:
        head = self._buf.lstrip()
        if not head:
            return "", []
        markers = (_PYTHON_TAG, "{") if self.mode.parser == "llama3" else (_MISTRAL_TAG, "[")
        if any(m.startswith(head) or head.startswith(m) for m in markers):
            if len(head) < max(map(len, markers)) and not head.startswith(markers[1]):
                return "", []  # still a possible marker prefix
            self._undecided, self._whole = False, True
            return "", []
        self._undecided = False
        content, self._buf = self._buf, ""
        return content, []

    def _whole_output(self) -> tuple[str, list[dict[str, Any]]]:
        text = self._buf.strip()
        if self.mode.parser == "llama3":
            return self._json_calls(text.removeprefix(_PYTHON_TAG), "parameters")
        return self._json_calls(text.removeprefix(_MISTRAL_TAG), "arguments")

    def _json_calls(self, text: str, key: str) -> tuple[str, list[dict[str, Any]]]:
        """The calls of ``text`` (JSON objects or arrays of them, ``;`` or space between);
        all of ``text`` as content when it is not that."""
        calls, decoder, pos = [], json.JSONDecoder(), 0
        try:
            while pos < len(text):
                if text[pos] in " \t\r\n;,":
                    pos += 1
                    continue
                obj, pos = decoder.raw_decode(text, pos)
                calls.extend(obj if isinstance(obj, list) else [obj])
            parsed = [_name_and_arguments(c, key) for c in calls]
        except (ValueError, TypeError, KeyError):
            self._buf = ""
            return text, []
        self._buf = ""
        if not parsed:
            return text, []
        return "", [self._emit(name, args) for name, args in parsed]

    def _emit(self, name: str, arguments: str) -> dict[str, Any]:
        delta = _call_delta(self.num_calls, name, arguments)
        self.num_calls += 1
        return delta

    # -- hermes: <tool_call>...</tool_call> anywhere ---------------------------------------

    def _hermes(self, final: bool) -> tuple[str, list[dict[str, Any]]]:
        content, deltas = [], []
        while True:
            start = self._buf.find(_HERMES_OPEN)
            if start < 0:
                keep = 0 if final else _held_back(self._buf, _HERMES_OPEN)
                content.append(self._buf[: len(self._buf) - keep])
                self._buf = self._buf[len(self._buf) - keep :]
                break
            end = self._buf.find(_HERMES_CLOSE, start)
            if end < 0 and not final:
                content.append(self._buf[:start])
                self._buf = self._buf[start:]
                break
            body_end = len(self._buf) if end < 0 else end
            body = self._buf[start + len(_HERMES_OPEN) : body_end]
            after = len(self._buf) if end < 0 else end + len(_HERMES_CLOSE)
            call = _parse_call(body, "arguments")
            if call is None:  # not a call after all: it is text
                content.append(self._buf[:after])
            else:
                content.append(self._buf[:start])
                deltas.append(self._emit(*call))
            self._buf = self._buf[after:]
        return "".join(content), deltas


def _held_back(text: str, marker: str) -> int:
    """The length of the longest suffix of ``text`` that starts ``marker``."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0


def _parse_call(body: str, key: str) -> tuple[str, str] | None:
    try:
        return _name_and_arguments(json.loads(body), key)
    except (ValueError, TypeError, KeyError):
        return None


def _name_and_arguments(call: Any, key: str) -> tuple[str, str]:
    """(name, arguments JSON) of ``{"name", key: {...}}`` (``arguments`` or ``parameters``,
    either accepted); raises for anything else."""
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        raise TypeError("not a call")
    args = call.get(key, call.get("arguments", call.get("parameters", {})))
    if isinstance(args, str):
        json.loads(args)  # a JSON string of the arguments: must be JSON
        return call["name"], args
    if not isinstance(args, dict):
        raise TypeError("arguments must be an object")
    return call["name"], json.dumps(args, ensure_ascii=False)


def merge_deltas(deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Whole tool calls (``{"id", "type", "function"}``) from a choice's deltas, by index."""
    calls: dict[int, dict[str, Any]] = {}
    for d in deltas:
        call = calls.get(d["index"])
        if call is None:
            calls[d["index"]] = {
                "id": d["id"],
                "type": "function",
                "function": dict(d["function"]),
            }
        else:
            call["function"]["arguments"] += d["function"].get("arguments", "")
    return [calls[i] for i in sorted(calls)]
