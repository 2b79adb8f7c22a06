"""The offline ``LLM`` API on a tiny model (and, marked slow, on the default model)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.tiny_models import TEST_DEVICE

from tokenmill import LLM, SamplingParams
from tokenmill.core.errors import InvalidRequestError
from tokenmill.core.request import FinishReason
from tokenmill.engine.reference import greedy_generate


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    torch.set_num_threads(1)
    path = tiny_model_dir("llama3")
    return LLM(model=path, dtype="fp32", device=TEST_DEVICE, block_size=4, num_blocks=64)


def test_generate_text_and_token_prompts_in_order(llm):
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompts = ["The capital of France", "Once upon a time", [10, 11, 12, 13]]
    results = llm.generate(prompts, params)
    ids = [llm.tokenizer.encode(p) for p in prompts[:2]] + [prompts[2]]
    assert [r.prompt_token_ids for r in results] == ids
    assert [r.token_ids for r in results] == greedy_generate(llm.loaded.model, ids, 6, ())
    for r in results:
        assert r.text == llm.tokenizer.decode(r.token_ids)
        assert r.finish_reason == FinishReason.LENGTH
    llm.core.check_integrity()


def test_single_string_prompt_and_cached_tokens_on_repeat(llm):
    params = SamplingParams(temperature=0, max_tokens=3)
    prompt = "The quick brown fox jumps over the lazy dog again and again."
    (first,) = llm.generate(prompt, params)
    (second,) = llm.generate(prompt, params)
    assert first.token_ids == second.token_ids
    assert first.num_cached_tokens == 0
    n = len(llm.tokenizer.encode(prompt))
    assert second.num_cached_tokens == (n - 1) // 4 * 4


def test_chat_and_logprobs(llm):
    params = SamplingParams(temperature=0, max_tokens=4, logprobs=2, ignore_eos=True)
    r = llm.chat([{"role": "user", "content": "hi"}], params)
    assert len(r.token_ids) == 4 and [lp.token_id for lp in r.logprobs] == r.token_ids


def test_invalid_prompt_raises_before_running(llm):
    with pytest.raises(InvalidRequestError) as e:
        llm.generate([[1, 2], [1, 10_000]], SamplingParams(max_tokens=2))
    assert e.value.param == "prompt"
    assert not llm.core.has_unfinished_requests()


@pytest.mark.slow
def test_default_model_answers():
    llm = LLM(dtype="fp32", device="cpu")
    r = llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(temperature=0, max_tokens=30),
    )
    assert "Paris" in r.text and r.finish_reason == FinishReason.STOP


@pytest.mark.slow
def test_bench_engine_quick_smoke(tmp_path):
    from tokenmill.launch.cli import main

    out = tmp_path / "engine.json"
    assert main(["bench", "engine", "--quick", "--threads", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    run = result["runs"]["fp32"]
    assert run["tokenmill"][0]["output_tokens"] == run["workload"]["output_tokens"]
    assert run["transformers"]["static_batch"]["output_tokens"] == run["workload"]["output_tokens"]
    assert run["single_stream"]["output_tokens"] == 8
    assert set(run["ratios"]) == {
        "single_stream_decode_vs_transformers",
        "throughput_vs_transformers",
    }
