"""EngineCore: request validation, abort, per-request failure isolation, stop strings, seeded
sampling across batches, logprobs. Tiny fp32 model on ``TEST_DEVICE``; integrity checked after
each test."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers.tiny_models import TEST_DEVICE

from tokenmill.core.errors import ContextLengthExceededError, InvalidRequestError
from tokenmill.core.request import EngineRequest, FinishReason
from tokenmill.core.sampling import SamplingParams
from tokenmill.engine.builder import build_real_core
from tokenmill.engine.config import CacheConfig, SchedulerConfig
from tokenmill.engine.loader import load_model

POISON, NAN_TOKEN = 290, 291
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


class FaultyModel:
    """Delegates to a real model; raises on POISON in the batch, NaNs rows of NAN_TOKEN."""

    def __init__(self, model):
        self.model = model

    def forward(self, input_ids, positions, attn):
        if (input_ids == POISON).any():
            raise RuntimeError("poisoned batch")
        hidden = self.model.forward(input_ids, positions, attn)  # [T, H]
        return hidden.masked_fill((input_ids == NAN_TOKEN)[:, None], float("nan"))

    def compute_logits(self, hidden):
        return self.model.compute_logits(hidden)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    torch.set_num_threads(1)
    path = tiny_model_dir("smollm2")
    base = load_model(path, dtype="fp32", device=TEST_DEVICE)
    return dataclasses.replace(base, model=FaultyModel(base.model))


@pytest.fixture
def core(loaded):
    c = build_real_core(loaded, SchedulerConfig(max_model_len=64), cache=CacheConfig(4, 64))
    yield c
    c.check_integrity()
    assert c.scheduler.kv.num_used_blocks == 0


def req(rid, ids, params=GREEDY):
    return EngineRequest(request_id=rid, prompt_token_ids=list(ids), params=params)


def drain(core):
    outs = {}
    while core.has_unfinished_requests():
        for out in core.step():
            outs.setdefault(out.request_id, []).append(out)
    return outs


def tokens(outs, rid):
    return [t for o in outs[rid] for t in o.new_token_ids]


@pytest.mark.parametrize(
    "ids,params,exc,param",
    [
        ([], GREEDY, InvalidRequestError, "prompt"),
        ([5, 336], GREEDY, InvalidRequestError, "prompt"),  # vocab is 336
        ([5, -1], GREEDY, InvalidRequestError, "prompt"),
        ([5] * 60, SamplingParams(max_tokens=5), ContextLengthExceededError, "max_tokens"),
        ([5] * 64, SamplingParams(max_tokens=None), ContextLengthExceededError, "prompt"),
        ([5], SamplingParams(logit_bias={999: 1.0}), InvalidRequestError, "logit_bias"),
    ],
)
def test_invalid_requests_rejected_with_param_named(core, ids, params, exc, param):
    with pytest.raises(exc) as e:
        core.add_request(req("bad", ids, params))
    assert e.value.param == param
    assert not core.has_unfinished_requests()


def test_duplicate_request_id_rejected(core):
    core.add_request(req("a", [5, 6]))
    with pytest.raises(InvalidRequestError):
        core.add_request(req("a", [5, 6]))
    drain(core)


def test_abort_frees_every_block_at_once(core):
    for i in range(3):
        core.add_request(
            req(
                f"r{i}",
                range(10 + i, 30 + i),
                SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
            )
        )
    core.step()
    core.step()
    assert core.scheduler.kv.num_used_blocks > 0
    outs = core.abort_requests(["r0", "r1", "r2", "unknown"])
    assert [(o.request_id, o.finish_reason) for o in outs] == [
        ("r0", FinishReason.ABORT),
        ("r1", FinishReason.ABORT),
        ("r2", FinishReason.ABORT),
    ]
    assert core.scheduler.kv.num_used_blocks == 0
    assert not core.has_unfinished_requests()


def test_exception_in_one_request_fails_only_it(core, loaded):
    good = list(range(10, 20))
    core.add_request(req("good", good))
    core.add_request(req("bad", [11, 12, POISON, 13]))
    outs = drain(core)
    assert outs["bad"][-1].finish_reason == FinishReason.ERROR
    assert "poisoned batch" in outs["bad"][-1].error
    assert outs["good"][-1].finish_reason == FinishReason.LENGTH
    alone = build_real_core(loaded, SchedulerConfig(max_model_len=64), cache=CacheConfig(4, 64))
    alone.add_request(req("good", good))
    assert tokens(outs, "good") == tokens(drain(alone), "good")


def test_nan_logits_fail_only_that_request(core):
    core.add_request(req("ok", [10, 11, 12]))
    core.add_request(req("nan", [10, 11, NAN_TOKEN]))
    outs = drain(core)
    assert outs["nan"][-1].finish_reason == FinishReason.ERROR
    assert "non-finite" in outs["nan"][-1].error
    assert len(tokens(outs, "ok")) == 8


def test_stop_string_ends_the_request_and_is_not_in_the_text(core, loaded):
    core.add_request(
        req("free", [10, 11, 12], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    )
    full = "".join(o.text_delta for o in drain(core)["free"])
    assert len(full) >= 6
    stop = full[3:6]
    core.add_request(
        req(
            "s",
            [10, 11, 12],
            SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=(stop,)),
        )
    )
    outs = drain(core)["s"]
    assert "".join(o.text_delta for o in outs) == full[: full.index(stop)]
    assert (outs[-1].finish_reason, outs[-1].stop_reason) == (FinishReason.STOP, stop)


def test_eos_stops_unless_ignore_eos(core, loaded):
    eos = loaded.tokenizer.eos_token_ids[0]
    bias = {eos: 100.0}
    core.add_request(
        req("e", [10, 11], SamplingParams(temperature=0, max_tokens=5, logit_bias=bias))
    )
    core.add_request(
        req(
            "i",
            [10, 11],
            SamplingParams(temperature=0, max_tokens=5, logit_bias=bias, ignore_eos=True),
        )
    )
    core.add_request(
        req(
            "m",
            [10, 11],
            SamplingParams(temperature=0, max_tokens=5, logit_bias=bias, min_tokens=3),
        )
    )
    outs = drain(core)
    assert tokens(outs, "e") == [eos] and outs["e"][-1].finish_reason == FinishReason.STOP
    assert tokens(outs, "i") == [eos] * 5 and outs["i"][-1].finish_reason == FinishReason.LENGTH
    assert len(tokens(outs, "m")) == 4 and tokens(outs, "m")[-1] == eos


def test_seeded_request_same_tokens_whatever_the_batch(core):
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=10, ignore_eos=True)
    core.add_request(req("me", [20, 21, 22], seeded))
    alone = tokens(drain(core), "me")
    for i in range(4):
        core.add_request(
            req(
                f"o{i}",
                range(30 + i, 40 + 2 * i),
                SamplingParams(temperature=1.0, seed=7 + i, max_tokens=10),
            )
        )
    core.add_request(req("me", [20, 21, 22], seeded))
    assert tokens(drain(core), "me") == alone


def test_logprobs_streamed_per_token(core):
    core.add_request(
        req(
            "lp", [10, 11], SamplingParams(temperature=0, max_tokens=4, logprobs=3, ignore_eos=True)
        )
    )
    outs = drain(core)["lp"]
    lps = [lp for o in outs for lp in o.logprobs]
    assert [lp.token_id for lp in lps] == tokens({"lp": outs}, "lp")
    assert all(len(lp.top) == 3 and lp.top[0][0] == lp.token_id for lp in lps)
    assert (outs[-1].num_prompt_tokens, outs[-1].num_output_tokens) == (2, 4)
