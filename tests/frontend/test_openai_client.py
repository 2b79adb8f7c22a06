"""The official ``openai`` client against `tokenmill serve` processes: the echo engine for exact
text (the answer is the prompt echoed back) and the real engine over a tiny llama with an
API key."""

from __future__ import annotations

import httpx
import openai
import pytest

from tokenmill.engine.tokenizer import Tokenizer

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "developer", "content": [{"type": "text", "text": "Answer in English."}]},
    {
        "role": "user",
        "content": [{"type": "text", "text": "hello"}, {"type": "text", "text": "world"}],
    },
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir) -> Tokenizer:
    return Tokenizer.from_hf_dir(tiny_model_dir)


@pytest.fixture(scope="module")
def client(echo_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=echo_server.url, api_key="unused", max_retries=0)


def echo_text(tok: Tokenizer, prompt_ids: list[int], num_tokens: int) -> str:
    """What the echo engine answers: the prompt's ids (EOS skipped), cycled, decoded."""
    ids = [t for t in prompt_ids if t not in tok.eos_token_ids]
    return tok.decode([ids[i % len(ids)] for i in range(num_tokens)])


def chat_prompt_ids(tok: Tokenizer, messages) -> list[int]:
    flat = [
        {
            "role": "system" if m["role"] == "developer" else m["role"],
            "content": m["content"]
            if isinstance(m["content"], str)
            else "\n".join(p["text"] for p in m["content"]),
        }
        for m in messages
    ]
    return tok.encode(tok.apply_chat_template(flat), add_special_tokens=False)


def test_chat_non_streaming_shape_and_text(client, tokenizer):
    resp = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6)
    prompt = chat_prompt_ids(tokenizer, MESSAGES)
    assert resp.id.startswith("chatcmpl-") and resp.object == "chat.completion"
    assert resp.model == "tiny" and len(resp.choices) == 1
    choice = resp.choices[0]
    assert (choice.index, choice.finish_reason, choice.message.role) == (0, "length", "assistant")
    assert choice.message.content == echo_text(tokenizer, prompt, 6)
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (len(prompt), 6)
    assert resp.usage.total_tokens == len(prompt) + 6


def test_chat_streaming_matches_non_streaming(client, tokenizer):
    stream = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    prompt = chat_prompt_ids(tokenizer, MESSAGES)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == echo_text(tokenizer, prompt, 6)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert chunks[-1].usage.prompt_tokens == len(prompt)


def test_completions_multiple_prompts_and_n(client, tokenizer):
    prompts = ["alpha beta gamma", "delta epsilon"]
    resp = client.completions.create(model="tiny", prompt=prompts, n=2, max_tokens=5)
    assert resp.object == "text_completion" and resp.id.startswith("cmpl-")
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    for c in resp.choices:
        ids = tokenizer.encode(prompts[c.index // 2], add_special_tokens=True)
        assert c.text == echo_text(tokenizer, ids, 5) and c.finish_reason == "length"
    num_prompt = sum(len(tokenizer.encode(p, add_special_tokens=True)) for p in prompts)
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (num_prompt, 20)


def test_chat_n_streaming_has_every_choice(client):
    stream = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=4, n=3, stream=True
    )
    finished = {
        c.choices[0].index: c.choices[0].finish_reason
        for c in stream
        if c.choices and c.choices[0].finish_reason
    }
    assert finished == {0: "length", 1: "length", 2: "length"}


def test_token_id_prompt(client, tokenizer):
    ids = tokenizer.encode("one two three")
    resp = client.completions.create(model="tiny", prompt=ids, max_tokens=3)
    assert resp.choices[0].text == echo_text(tokenizer, ids, 3)


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_ends_text_before_it(client, stream):
    kwargs = dict(model="tiny", prompt="hello world, hello moon", max_tokens=40, stop=[", h"])
    if stream:
        chunks = list(client.completions.create(stream=True, **kwargs))
        text = "".join(c.choices[0].text for c in chunks)
        finish = chunks[-1].choices[0].finish_reason
    else:
        resp = client.completions.create(**kwargs)
        text, finish = resp.choices[0].text, resp.choices[0].finish_reason
    assert (text, finish) == ("hello world", "stop")


def test_logprobs_shapes(client):
    resp = client.completions.create(model="tiny", prompt="a b c d", max_tokens=3, logprobs=2)
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == 3 and len(lp.token_logprobs) == 3
    assert [len(t) for t in lp.top_logprobs] == [2, 2, 2]
    assert "".join(lp.tokens) == resp.choices[0].text
    chat = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=3, logprobs=True, top_logprobs=2
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.bytes == list(c.token.encode()) for c in content)


def test_repeated_prompt_reports_cached_tokens(client, tokenizer):
    prompt = "the quick brown fox jumps over the lazy dog " * 4
    first = client.completions.create(model="tiny", prompt=prompt, max_tokens=2)
    second = client.completions.create(model="tiny", prompt=prompt, max_tokens=2)
    num_prompt = len(tokenizer.encode(prompt, add_special_tokens=True))
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens == (num_prompt // 16) * 16 > 0
    salted = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=2, extra_body={"cache_salt": "tenant-b"}
    )
    assert salted.usage.prompt_tokens_details.cached_tokens == 0  # tenants do not share


def test_models_and_unknown_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=MESSAGES)
    assert e.value.body["code"] == "model_not_found"


def test_models_retrieve(client):
    model = client.models.retrieve("tiny")
    assert (model.id, model.object, model.owned_by) == ("tiny", "model", "tokenmill")
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("nope")
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"


def test_logprob_bytes_are_the_tokens_raw_bytes(client, tokenizer):
    messages = [{"role": "user", "content": "東京タワー"}]
    prompt = chat_prompt_ids(tokenizer, messages)
    resp = client.chat.completions.create(
        model="tiny", messages=messages, logprobs=True, top_logprobs=1, max_tokens=len(prompt)
    )
    content = resp.choices[0].logprobs.content
    halves = [t for t in content if t.token == "\ufffd"]  # a token that is part of a character
    assert halves and all(t.bytes != list("\ufffd".encode()) for t in halves)
    assert all(t.bytes == t.top_logprobs[0].bytes for t in content)  # echo: top-1 is the token
    raw = b"".join(bytes(t.bytes) for t in content)
    ids = [t for t in prompt if t not in tokenizer.eos_token_ids]  # echoed, cycled
    assert raw == b"".join(tokenizer.token_bytes(ids[i % len(ids)]) for i in range(len(content)))
    assert "東京タワー".encode() in raw


def test_metrics_move_after_traffic(echo_server, client):
    def sample(name: str) -> float:
        text = httpx.get(echo_server.base + "/metrics").text
        line = next(
            (
                ln
                for ln in text.splitlines()
                if ln.startswith(name + " ") or ln.startswith(name + "{")
            ),
            None,
        )
        return float(line.rsplit(" ", 1)[1]) if line else 0.0

    names = [
        'tokenmill_requests_total{endpoint="completions",model="tiny",status="200"}',
        'tokenmill_generation_tokens_total{model="tiny"}',
        'tokenmill_request_finish_total{finish_reason="length",model="tiny"}',
        'tokenmill_request_prompt_tokens_count{model="tiny"}',
        'tokenmill_request_generation_tokens_sum{model="tiny"}',
        'tokenmill_request_generation_tokens_bucket{model="tiny",le="10.0"}',
    ]
    before = [sample(name) for name in names]
    client.completions.create(model="tiny", prompt="metrics", max_tokens=7, n=2)
    after = [sample(name) for name in names]
    assert [y - x for x, y in zip(before, after, strict=True)] == [1, 14, 2, 1, 14, 0]
    assert sample('tokenmill_time_to_first_token_seconds_count{model="tiny"}') > 0
    assert sample("tokenmill_router_decisions_total") > 0


# ---- the real engine, with an API key ---------------------------------------------------


def test_api_key_required(real_server):
    bad = openai.OpenAI(base_url=real_server.url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    r = httpx.post(real_server.url + "/completions", json={"prompt": "x"})
    assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(real_server.base + "/health").status_code == 200  # no key needed


def test_real_engine_greedy_stream_equals_whole_and_caches(real_server):
    client = openai.OpenAI(base_url=real_server.url, api_key="sekret", max_retries=0)
    kwargs = dict(model="llama3", messages=MESSAGES, max_tokens=8, temperature=0)
    whole = client.chat.completions.create(**kwargs)
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(stream=True, **kwargs)
        if c.choices
    )
    assert streamed == whole.choices[0].message.content
    assert whole.usage.completion_tokens == 8
    again = client.chat.completions.create(**kwargs)
    assert again.choices[0].message.content == whole.choices[0].message.content
    assert again.usage.prompt_tokens_details.cached_tokens >= 16
    comp = client.completions.create(model="llama3", prompt="hello", max_tokens=4, n=2, logprobs=1)
    assert len(comp.choices) == 2 and all(len(c.logprobs.tokens) == 4 for c in comp.choices)


def test_real_engine_rejects_a_seed_its_generator_cannot_take(real_server):
    client = openai.OpenAI(base_url=real_server.url, api_key="sekret", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(
            model="llama3", prompt="hi", max_tokens=2, seed=1208925819614629174706176
        )
    assert e.value.body["param"] == "seed"
    ok = client.completions.create(model="llama3", prompt="hi", max_tokens=2, seed=2**64 - 1)
    assert ok.choices[0].finish_reason == "length"


def test_bearer_scheme_is_case_insensitive(real_server):
    for scheme in ("bearer", "BEARER", "Bearer"):
        r = httpx.get(real_server.url + "/models", headers={"authorization": f"{scheme} sekret"})
        assert r.status_code == 200, scheme
    r = httpx.get(real_server.url + "/models", headers={"authorization": "Basic sekret"})
    assert r.status_code == 401
