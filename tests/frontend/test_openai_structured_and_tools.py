"""Structured output and tool calling through `tokenmill serve` with the official ``openai``
client: the real engine over a tiny random llama (a random model's constrained output must
still parse and validate: a test of the mask), and the echo engine for the tool-call parser
(its answer is the prompt, so a tool call written in the prompt comes back as model text)."""

from __future__ import annotations

import concurrent.futures
import json

import jsonschema
import openai
import pytest
from helpers.procs import running_server
from helpers.tiny_models import make_tiny_hf_model

SCHEMAS = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 6},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "admin": {"type": "boolean"},
        },
        "required": ["name", "age", "admin"],
        "additionalProperties": False,
    },
    {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 4},
    {
        "type": "object",
        "properties": {
            "point": {
                "type": "object",
                "properties": {
                    "x": {"type": "integer", "minimum": -9, "maximum": 9},
                    "y": {"type": "integer", "minimum": -9, "maximum": 9},
                },
                "required": ["x", "y"],
                "additionalProperties": False,
            },
            "label": {"anyOf": [{"type": "null"}, {"type": "string", "pattern": "^[a-z]{1,4}$"}]},
        },
        "required": ["point", "label"],
        "additionalProperties": False,
    },
]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "enum": ["Paris", "Rome", "Tokyo"]},
                "unit": {"enum": ["c", "f"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 12}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
ASK = [{"role": "user", "content": "weather?"}]


@pytest.fixture(scope="module")
def long_model_dir(tmp_path_factory):
    """The tiny llama with a 2048-token context (tool prompts are long in its tiny vocab)."""
    return make_tiny_hf_model(
        tmp_path_factory.mktemp("long"), "llama3", max_position_embeddings=2048
    )


@pytest.fixture(scope="module")
def client(long_model_dir):
    with running_server(
        "--model",
        str(long_model_dir),
        "--served-model-name",
        "m",
        "--engine",
        "real",
        "--dtype",
        "fp32",
        "--device",
        "cpu",
    ) as server:
        yield openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def echo(long_model_dir):
    """The echo engine over the long-context tiny model (it answers with the prompt)."""
    with running_server(
        "--model", str(long_model_dir), "--engine", "echo", "--served-model-name", "tiny"
    ) as server:
        yield openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)


def _json_schema(schema, name="out"):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def test_json_schema_outputs_validate_under_batching_with_free_text(client):
    """Constrained rows (three schemas, sampled) share batches with unconstrained ones."""

    def constrained(i):
        schema = SCHEMAS[i % len(SCHEMAS)]
        r = client.chat.completions.create(
            model="m", messages=ASK, max_tokens=200, seed=i, response_format=_json_schema(schema)
        )
        return schema, r.choices[0]

    def free(i):
        return client.chat.completions.create(model="m", messages=ASK, max_tokens=24, seed=i)

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        frees = [pool.submit(free, i) for i in range(6)]
        results = list(pool.map(constrained, range(12)))
    for schema, choice in results:
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), schema)
    assert all(f.result().choices[0].finish_reason == "length" for f in frees)


def test_json_object_regex_choice_and_grammar(client):
    r = client.chat.completions.create(
        model="m", messages=ASK, max_tokens=200, seed=1, response_format={"type": "json_object"}
    )
    # any object; the random model may write long strings, so only a finished one must parse
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:
        assert r.choices[0].message.content.startswith("{")
    r = client.completions.create(
        model="m", prompt="a", max_tokens=30, extra_body={"guided_regex": "[0-9]{3}-[a-c]{2}"}
    )
    assert r.choices[0].finish_reason == "stop"
    import re

    assert re.fullmatch("[0-9]{3}-[a-c]{2}", r.choices[0].text)
    r = client.chat.completions.create(
        model="m", messages=ASK, max_tokens=10, extra_body={"guided_choice": ["yes", "no"]}
    )
    assert r.choices[0].message.content in ("yes", "no")
    grammar = 'start: "x" num\nnum: /[1-9]/'
    r = client.chat.completions.create(
        model="m", messages=ASK, max_tokens=10, extra_body={"guided_grammar": grammar}
    )
    assert r.choices[0].message.content[0] == "x" and r.choices[0].message.content[1].isdigit()


def test_streamed_structured_output_matches_the_schema(client):
    stream = client.chat.completions.create(
        model="m",
        messages=ASK,
        max_tokens=200,
        seed=3,
        stream=True,
        response_format=_json_schema(SCHEMAS[0]),
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), SCHEMAS[0])


def test_bad_constraints_are_400s_naming_the_field(client):
    cases = [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format.json_schema.schema",
        ),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": _json_schema({"type": "nope"})}, "response_format.json_schema.schema"),
        ({"extra_body": {"guided_regex": "(("}}, "guided_regex"),
        ({"extra_body": {"guided_grammar": "start: nope"}}, "guided_grammar"),
        (
            {"response_format": {"type": "json_object"}, "extra_body": {"guided_regex": "a"}},
            "guided_regex",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice.function.name",
        ),
        ({"tools": [{"type": "code_interpreter"}]}, "tools[0].type"),
    ]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="m", messages=ASK, max_tokens=5, **kwargs)
        assert info.value.status_code == 400 and info.value.body["param"] == param, kwargs
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": None}], max_tokens=5
        )
    assert info.value.body["param"] == "messages[0].content"
    assert client.models.list().data  # still serving


def test_tool_choice_required_and_named_always_parse(client):
    r = client.chat.completions.create(
        model="m",
        messages=ASK,
        max_tokens=200,
        seed=5,
        tools=[WEATHER, TIME],
        tool_choice="required",
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:
        tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
        jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
        assert call.id.startswith("call_") and call.type == "function"
    stream = client.chat.completions.create(
        model="m",
        messages=ASK,
        max_tokens=200,
        seed=6,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        stream=True,
    )
    chunks = [c for c in stream if c.choices]
    deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].function.name == "get_weather" and deltas[0].id.startswith("call_")
    args = "".join(d.function.arguments or "" for d in deltas)
    jsonschema.validate(json.loads(args), WEATHER["function"]["parameters"])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_history_round_trip(client):
    """An assistant's tool call and the tool's result in the history (Hermes text for a
    template without tools), answered with a constrained call again."""
    messages = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "arguments": '{"city": "Paris", "unit": "c"}',
                    },
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C and sunny"},
    ]
    r = client.chat.completions.create(
        model="m", messages=messages, max_tokens=300, tools=[WEATHER], tool_choice="required"
    )
    assert r.choices[0].message.tool_calls[0].function.name == "get_weather", r
    bad = [*messages[:2], {"role": "tool", "content": "x"}]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="m", messages=bad, max_tokens=5, tools=[WEATHER])
    assert info.value.body["param"] == "messages[2].tool_call_id"


def test_auto_tool_calls_parsed_from_model_text_streaming_and_not(echo):
    """The echo engine answers with the prompt: a Hermes call in it is model text."""
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "unit": "f"}}\n</tool_call>'
    messages = [{"role": "user", "content": call}]
    once = echo.chat.completions.create(
        model="tiny", messages=messages, tools=[WEATHER], max_tokens=1
    )
    n = once.usage.prompt_tokens  # the echo of the whole prompt, once
    r = echo.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER], max_tokens=n)
    calls = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "length" and len(calls) == 1  # echo: max_tokens
    assert calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == {"city": "Rome", "unit": "f"}
    assert '"unit": "f"' not in r.choices[0].message.content  # the call left the content
    stream = echo.chat.completions.create(
        model="tiny", messages=messages, tools=[WEATHER], max_tokens=n, stream=True
    )
    chunks = [c for c in stream if c.choices]
    deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert [d.function.name for d in deltas] == ["get_weather"]
    assert json.loads(deltas[0].function.arguments) == {"city": "Rome", "unit": "f"}
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == (r.choices[0].message.content or "")
    assert chunks[-1].choices[0].finish_reason == "length"


def test_responses_api_text_stream_usage_and_format(client):
    r = client.responses.create(
        model="m", input="hello", instructions="be brief", max_output_tokens=8, temperature=0
    )
    assert r.object == "response" and r.id.startswith("resp_")
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output_text and r.usage.output_tokens == 8 and r.usage.input_tokens > 0
    r = client.responses.create(
        model="m",
        input=[{"role": "user", "content": [{"type": "input_text", "text": "json please"}]}],
        max_output_tokens=200,
        temperature=0,
        text={"format": {"type": "json_schema", "name": "p", "schema": SCHEMAS[0], "strict": True}},
    )
    assert r.status == "completed"
    jsonschema.validate(json.loads(r.output_text), SCHEMAS[0])
    events = list(
        client.responses.create(
            model="m", input="hi", max_output_tokens=6, temperature=0, stream=True
        )
    )
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-1] == "response.incomplete" and "response.output_text.done" in kinds
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == events[-1].response.output_text and events[-1].response.usage.output_tokens == 6
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_responses_api_refuses_what_it_does_not_serve_by_name(client):
    cases = [
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"tools": [{"type": "web_search"}]}, "tools"),
        ({"background": True}, "background"),
        (
            {"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]},
            "input[0].type",
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]},
            "input[0].content[0].type",
        ),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"input": [{"role": "user", "content": None}]}, "input[0].content"),
    ]
    for kwargs, param in cases:
        kwargs = {"input": "hi", **kwargs}
        with pytest.raises(openai.BadRequestError) as info:
            client.responses.create(model="m", **kwargs)
        assert info.value.body["param"] == param, kwargs


def test_responses_api_stored_prompt_is_refused_not_read_as_text(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model="m", input="hi", extra_body={"prompt": {"id": "pmpt_1"}})
    assert info.value.body["param"] == "prompt"
