"""Tool-call parsers (Hermes/Qwen, Llama 3, Mistral, constrained required/named): the same
calls and content whether the text arrives whole or in any split."""

from __future__ import annotations

import json

import pytest

from tokenmill.frontend.tool_calls import (
    ToolCallStream,
    ToolMode,
    detect_parser,
    merge_deltas,
    required_schema,
)

CASES = [
    (
        ToolMode("parse", "hermes"),
        'Let me check.<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>\n'
        '<tool_call>{"name": "g", "arguments": {}}</tool_call>',
        "Let me check.\n",
        [("f", {"x": 1}), ("g", {})],
    ),
    (ToolMode("parse", "hermes"), "a <tool_ca b", "a <tool_ca b", []),
    (
        ToolMode("parse", "hermes"),
        "x<tool_call>{not json}</tool_call>",
        "x<tool_call>{not json}</tool_call>",
        [],
    ),
    (
        ToolMode("parse", "hermes"),
        '<tool_call>{"name": "f", "arguments": {"y": "z"}}',
        "",
        [("f", {"y": "z"})],
    ),
    (
        ToolMode("parse", "llama3"),
        '<|python_tag|>{"name": "f", "parameters": {"a": "b"}}; {"name": "g", "parameters": {}}',
        "",
        [("f", {"a": "b"}), ("g", {})],
    ),
    (ToolMode("parse", "llama3"), " Hello {there}", " Hello {there}", []),
    (ToolMode("parse", "llama3"), "{broken", "{broken", []),
    (
        ToolMode("parse", "mistral"),
        '[TOOL_CALLS][{"name": "f", "arguments": {"q": [1, 2]}}]',
        "",
        [("f", {"q": [1, 2]})],
    ),
    (ToolMode("parse", "mistral"), '[{"name": "f", "arguments": {}}]', "", [("f", {})]),
    (ToolMode("parse", "mistral"), "Sure.", "Sure.", []),
    (ToolMode("required"), '[{"name": "f", "arguments": {"k": true}}]', "", [("f", {"k": True})]),
    (ToolMode("named", name="f"), '{"k": 3}', "", [("f", {"k": 3})]),
]


def _run(mode, pieces):
    stream, content, deltas = ToolCallStream(mode), [], []
    for piece in pieces:
        c, d = stream.push(piece)
        content.append(c)
        deltas += d
    c, d = stream.finish()
    content.append(c)
    calls = merge_deltas(deltas + d)
    return (
        "".join(content),
        [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls],
        calls,
    )


@pytest.mark.parametrize("mode,text,content,calls", CASES)
def test_whole_and_every_split_agree(mode, text, content, calls):
    assert _run(mode, [text])[:2] == (content, calls)
    for cut in range(1, len(text)):
        assert _run(mode, [text[:cut], text[cut:]])[:2] == (content, calls), cut
    assert _run(mode, list(text))[:2] == (content, calls)  # one character at a time


def test_call_ids_and_indices():
    _, _, calls = _run(CASES[0][0], [CASES[0][1]])
    assert [c["id"][:5] for c in calls] == ["call_", "call_"] and calls[0]["id"] != calls[1]["id"]
    stream = ToolCallStream(ToolMode("named", name="f"))
    first = stream.push('{"a"')[1][0]
    assert first["index"] == 0 and first["function"] == {"name": "f", "arguments": '{"a"'}
    assert stream.push(": 1}")[1] == [{"index": 0, "function": {"arguments": ": 1}"}}]


def test_detect_parser_and_required_schema():
    assert detect_parser("{{ '[TOOL_CALLS]' }}") == "mistral"
    assert detect_parser("<|python_tag|>") == "llama3"
    assert detect_parser("<tool_call>") == detect_parser(None) == "hermes"
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    schema = required_schema([tool], parallel=False)
    assert schema["maxItems"] == 1 and schema["minItems"] == 1
    assert schema["items"]["anyOf"][0]["properties"]["name"] == {"const": "f"}
