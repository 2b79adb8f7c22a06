"""Constrained decoding in the engine: llguidance masks in the sampler, only for the rows
that need them, the grammar following each sampled (and jump-forward) token, a migrated
request's grammar rebuilt by replay, grammars released with their requests."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from helpers.tiny_models import TEST_DEVICE

from tokenmill import LLM, SamplingParams
from tokenmill.core.errors import InvalidRequestError
from tokenmill.core.request import EngineRequest, FinishReason
from tokenmill.core.sampling import StructuredOutput
from tokenmill.engine.executor.sampler import Sampler, SamplingRow
from tokenmill.engine.structured.grammar import GrammarCompiler, check
from tokenmill.engine.tokenizer import Tokenizer
from tokenmill.frontend.migration import continuation

SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 999},
        "tags": {"type": "array", "items": {"enum": ["a", "bb"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["id", "tags", "ok"],
    "additionalProperties": False,
}
SPEC = StructuredOutput(json_schema=json.dumps(SCHEMA))


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    path = tiny_model_dir("llama3")
    return LLM(model=path, dtype="fp32", device=TEST_DEVICE, block_size=4, num_blocks=256)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir) -> Tokenizer:
    return Tokenizer.from_hf_dir(tiny_model_dir("llama3"))


def test_batch_of_constrained_and_free_rows(llm):
    """Sampled constrained rows all validate; the free rows in the same batches are exactly
    what they are alone (the mask touches only its rows)."""
    constrained = [SamplingParams(max_tokens=150, seed=i, structured=SPEC) for i in range(10)]
    free = [SamplingParams(max_tokens=12, seed=100 + i, ignore_eos=True) for i in range(4)]
    results = llm.generate(["x"] * 14, constrained + free)
    for r in results[:10]:
        assert r.finish_reason == FinishReason.STOP, r
        jsonschema.validate(json.loads(r.text), SCHEMA)
    alone = llm.generate(["x"] * 4, free)
    assert [r.token_ids for r in results[10:]] == [r.token_ids for r in alone]
    assert llm.core.executor.sampler.num_grammars == 0  # released with their requests
    llm.core.check_integrity()


def test_migrated_request_replays_its_grammar(llm):
    """A continuation (prompt + the first k tokens, ``num_resumed_tokens=k``) generates
    exactly the rest of the uninterrupted greedy run: the grammar state was rebuilt."""
    params = SamplingParams(max_tokens=150, temperature=0, structured=SPEC)
    prompt = llm.tokenizer.encode("y")
    (whole,) = llm.generate([prompt], params)
    assert whole.finish_reason == FinishReason.STOP
    for k in (1, 5, len(whole.token_ids) // 2):
        request = EngineRequest(request_id="r", prompt_token_ids=prompt, params=params)
        resumed = continuation(request, whole.token_ids[:k])
        assert resumed.params.structured.num_resumed_tokens == k
        (rest,) = llm.generate([resumed.prompt_token_ids], resumed.params)
        assert whole.token_ids[:k] + rest.token_ids == whole.token_ids


def test_jump_forward_appends_forced_tokens_and_logprobs_turn_it_off(tokenizer):
    compiler = GrammarCompiler.for_tokenizer(tokenizer)
    spec = StructuredOutput(regex="abc[0-9]")
    compiler.prepare(spec).result()
    sampler = Sampler(tokenizer.eos_token_ids, "cpu", compiler)
    vocab = tokenizer.vocab_size + 16  # a padded embedding: the extra ids are never allowed
    logits = torch.zeros((2, vocab))
    logits[:, tokenizer.vocab_size :] = 100.0
    rows = [
        SamplingRow("jf", SamplingParams(temperature=0, structured=spec), [1], []),
        SamplingRow("lp", SamplingParams(temperature=0, structured=spec, logprobs=0), [1], []),
    ]
    out = sampler.sample(logits, rows)
    assert out.errors == {}
    forced = tokenizer.decode(out.sampled["jf"])
    assert forced == "abc"  # the first token sampled, the rest forced
    assert len(out.sampled["lp"]) == 1 and len(out.logprobs["lp"]) == 1
    sampler.release(["jf", "lp"])
    assert sampler.num_grammars == 0


def test_mask_only_on_constrained_rows_and_failures_stay_alone(tokenizer):
    compiler = GrammarCompiler.for_tokenizer(tokenizer)
    digits = StructuredOutput(regex="[0-9]+")
    sampler = Sampler(tokenizer.eos_token_ids, "cpu", compiler)
    logits = torch.randn((3, tokenizer.vocab_size))
    rows = [
        SamplingRow("free", SamplingParams(temperature=0), [1], []),
        SamplingRow("digits", SamplingParams(temperature=0, structured=digits), [1], []),
        SamplingRow("bad", SamplingParams(temperature=0, structured=digits), [1], [5]),
    ]
    out = sampler.sample(logits, rows)
    assert out.sampled["free"] == [int(logits[0].argmax())]
    assert tokenizer.decode(out.sampled["digits"][:1]).isdigit()
    assert "bad" in out.errors and "bad" not in out.sampled  # its output broke the grammar
    none = Sampler(tokenizer.eos_token_ids, "cpu", None)
    out = none.sample(logits[:2], rows[:2])
    assert "digits" in out.errors and out.sampled["free"] == [int(logits[0].argmax())]


def test_compile_errors_and_the_cache(tokenizer):
    compiler = GrammarCompiler.for_tokenizer(tokenizer, cache_size=2)
    with pytest.raises(InvalidRequestError) as info:
        compiler.prepare(StructuredOutput(regex="(")).result()
    assert info.value.param == "structured_output.regex"
    specs = [StructuredOutput(choice=(w,)) for w in ("a", "b", "c")]
    for s in specs:
        compiler.prepare(s).result()
    assert list(compiler._cache) == [s.key for s in specs[1:]]  # LRU of 2
    assert compiler.prepare(specs[2]).done()  # a hit is done at once
    with pytest.raises(InvalidRequestError):
        check(StructuredOutput(json_schema='{"type": "object", "properties": 3}'))
    with pytest.raises(InvalidRequestError) as info:
        StructuredOutput(regex="a", grammar="b")
    assert info.value.param == "structured_output"


def _obj(**props):
    return {
        "type": "object",
        "properties": props,
        "required": list(props),
        "additionalProperties": False,
    }


SHORT = {"type": "string", "maxLength": 5}
SMALL = {"type": "integer", "minimum": -50, "maximum": 50}
TEN_SCHEMAS = [
    _obj(name=SHORT, age={"type": "integer", "minimum": 0, "maximum": 120}),
    _obj(tags={"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 4}),
    _obj(point=_obj(x=SMALL, y=SMALL)),
    _obj(flag={"type": "boolean"}, note={"anyOf": [{"type": "null"}, SHORT]}),
    {"type": "array", "items": SMALL, "minItems": 1, "maxItems": 5},
    _obj(kind={"const": "circle"}, r={"type": "integer", "minimum": 1, "maximum": 9}),
    _obj(date={"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}),
    _obj(choice={"enum": ["yes", "no", 3, None]}),
    _obj(items={"type": "array", "items": _obj(id=SMALL), "maxItems": 2}),
    {"anyOf": [_obj(a=SMALL), _obj(b={"type": "boolean"})]},
]


def test_200_objects_of_10_schemas_all_validate(llm):
    """The random model writes whatever the mask lets through: all 200 must validate."""
    specs = [StructuredOutput(json_schema=json.dumps(s)) for s in TEN_SCHEMAS]
    params = [SamplingParams(max_tokens=200, seed=i, structured=specs[i % 10]) for i in range(200)]
    results = llm.generate(["z"] * 200, params)
    for i, r in enumerate(results):
        assert r.finish_reason == FinishReason.STOP, (i, r.text)
        jsonschema.validate(json.loads(r.text), TEN_SCHEMAS[i % 10])
    llm.generate(["z"], SamplingParams(max_tokens=1))  # the next step releases the last ones
    assert llm.core.executor.sampler.num_grammars == 0
