"""Sampler unit tests on hand-made logits: each processor's exact effect, seeded batch
independence, per-row NaN isolation, logprobs. Logits and generators on ``TEST_DEVICE``."""

from __future__ import annotations

import pytest
import torch
from helpers.tiny_models import TEST_DEVICE

from tokenmill.core.errors import InvalidRequestError
from tokenmill.core.sampling import MAX_SEED, MIN_SEED, SamplingParams
from tokenmill.engine.executor.sampler import Sampler, SamplingRow

V = 10
EOS = 9


def row(rid="a", out=(), prompt=(1,), **params) -> SamplingRow:
    return SamplingRow(rid, SamplingParams(**params), list(prompt), list(out))


def logits_of(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32, device=TEST_DEVICE)


BASE = [0.0, 1.0, 5.0, 4.0, 3.0, 2.0, 0.5, 0.2, 0.1, 6.0]  # argmax = EOS (9), then 2, 3


def test_greedy_is_argmax():
    out = Sampler([EOS], TEST_DEVICE).sample(
        logits_of(BASE, BASE[::-1]), [row("a", temperature=0), row("b", temperature=0)]
    )
    assert out.sampled == {"a": [9], "b": [0]}
    assert out.errors == {} and out.logprobs == {}


@pytest.mark.parametrize(
    "params",
    [dict(top_k=1), dict(top_p=0.01), dict(min_p=1.0), dict(temperature=0.01, seed=3)],
)
def test_filters_that_leave_only_the_best_token(params):
    out = Sampler([EOS], TEST_DEVICE).sample(logits_of(BASE), [row(**params)])
    assert out.sampled == {"a": [9]}


def test_top_k_2_only_draws_the_two_best():
    s = Sampler([EOS], TEST_DEVICE)
    drawn = {
        s.sample(logits_of([0.0, 3.0, 3.0, 0.0] + [0.0] * 6), [row(top_k=2)]).sampled["a"][0]
        for _ in range(200)
    }
    assert drawn == {1, 2}


def test_top_p_keeps_the_smallest_set_reaching_p():
    # probs = [0.628, 0.231, 0.140, 0 ...]: top_p 0.7 keeps ids 0 and 1 (0.628 < 0.7 before
    # id 1; 0.859 >= 0.7 before id 2); -inf logits are legal masked entries.
    big = [float("-inf")] * V
    big[0], big[1], big[2] = 1.0, 0.0, -0.5
    s = Sampler([EOS], TEST_DEVICE)
    drawn = {s.sample(logits_of(big), [row(top_p=0.7)]).sampled["a"][0] for _ in range(200)}
    assert drawn == {0, 1}


def test_logit_bias_forces_a_token():
    out = Sampler([EOS], TEST_DEVICE).sample(
        logits_of(BASE), [row(temperature=0, logit_bias={4: 100.0})]
    )
    assert out.sampled == {"a": [4]}


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    s = Sampler([EOS], TEST_DEVICE)
    p = dict(temperature=0, min_tokens=2, stop_token_ids=(2,))
    assert s.sample(logits_of(BASE), [row(out=[5], **p)]).sampled == {"a": [3]}
    assert s.sample(logits_of(BASE), [row(out=[5, 5], **p)]).sampled == {"a": [9]}


def test_presence_and_frequency_penalties_subtract_from_seen_output_tokens():
    s = Sampler([EOS], TEST_DEVICE)
    # EOS (6.0) seen once: presence 2 -> 4.0 < 5.0 (id 2)
    assert s.sample(
        logits_of(BASE), [row(out=[9], temperature=0, presence_penalty=2.0)]
    ).sampled == {"a": [2]}
    # EOS seen 3 times with frequency 0.5: 6 - 1.5 = 4.5 < 5
    assert s.sample(
        logits_of(BASE), [row(out=[9, 9, 9], temperature=0, frequency_penalty=0.5)]
    ).sampled == {"a": [2]}
    # seen once with frequency 0.5: 5.5 > 5 keeps EOS
    assert s.sample(
        logits_of(BASE), [row(out=[9], temperature=0, frequency_penalty=0.5)]
    ).sampled == {"a": [9]}


def test_repetition_penalty_covers_prompt_and_output():
    s = Sampler([EOS], TEST_DEVICE)
    # 6.0 / 1.5 = 4.0 < 5.0: the prompt's EOS is penalised; id 2 in the output too: 5/1.5
    assert s.sample(
        logits_of(BASE), [row(prompt=[9], temperature=0, repetition_penalty=1.5)]
    ).sampled == {"a": [2]}
    out = s.sample(
        logits_of(BASE), [row(prompt=[9], out=[2], temperature=0, repetition_penalty=1.5)]
    )
    assert out.sampled == {"a": [3]}


def test_non_finite_row_fails_alone():
    bad = list(BASE)
    bad[3] = float("nan")
    inf = list(BASE)
    inf[0] = float("inf")
    out = Sampler([EOS], TEST_DEVICE).sample(
        logits_of(BASE, bad, inf), [row("ok", temperature=0), row("nan"), row("inf")]
    )
    assert out.sampled == {"ok": [9]}
    assert set(out.errors) == {"nan", "inf"}


def test_logprobs_are_the_raw_distribution_with_top_n():
    out = Sampler([EOS], TEST_DEVICE).sample(logits_of(BASE), [row(temperature=0, logprobs=2)])
    lp = torch.log_softmax(logits_of(BASE)[0], -1)
    (tok,) = out.logprobs["a"]
    assert tok.token_id == 9 and tok.logprob == pytest.approx(float(lp[9]))
    assert [t for t, _ in tok.top] == [9, 2]
    assert tok.top[1][1] == pytest.approx(float(lp[2]))


def _seeded_tokens(companions: int, seed: int = 42, steps: int = 8) -> list[int]:
    s = Sampler([EOS], TEST_DEVICE)
    g = torch.Generator().manual_seed(7)
    toks = []
    for _ in range(steps):
        mine = torch.randn(1, 50, generator=g)
        others = torch.randn(companions, 50)
        rows = [row("me", seed=seed, temperature=1.0)] + [row(f"o{i}") for i in range(companions)]
        if companions:
            rows.append(row("other-seeded", seed=seed, temperature=0.7))
            others = torch.cat([others, torch.randn(1, 50)])
        toks += s.sample(torch.cat([mine, others]).to(TEST_DEVICE), rows).sampled["me"]
    return toks


def test_seeded_sampling_is_batch_independent():
    alone = _seeded_tokens(0)
    assert alone == _seeded_tokens(5) == _seeded_tokens(17)
    assert alone != _seeded_tokens(0, seed=43)


def test_release_drops_the_generator_so_a_new_request_restarts_its_seed():
    s = Sampler([EOS], TEST_DEVICE)
    x = torch.randn(1, 50, device=TEST_DEVICE)
    first = [s.sample(x, [row("r", seed=1)]).sampled["r"][0] for _ in range(6)]
    s.release(["r"])
    again = [s.sample(x, [row("r", seed=1)]).sampled["r"][0] for _ in range(6)]
    assert first == again


@pytest.mark.parametrize(
    "param,value",
    [
        ("n", 0),
        ("max_tokens", 0),
        ("min_tokens", -1),
        ("temperature", -0.5),
        ("top_k", -2),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("min_p", 1.5),
        ("presence_penalty", 3.0),
        ("frequency_penalty", -3.0),
        ("repetition_penalty", 0.0),
        ("logprobs", 21),
        ("stop", ("",)),
        ("stop_token_ids", (-1,)),
        ("logit_bias", {1: 200.0}),
    ],
)
def test_each_invalid_parameter_is_rejected_by_name(param, value):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**{param: value})
    assert e.value.param == param


@pytest.mark.parametrize("seed", [MIN_SEED, -1, 0, 2**63, MAX_SEED])
def test_the_seed_range_sampling_params_accept_is_the_generators(seed):
    out = Sampler([EOS], TEST_DEVICE).sample(logits_of(BASE), [row(seed=seed)])
    assert not out.errors and len(out.sampled["a"]) == 1
    with pytest.raises(ValueError):  # one past either end overflows in the generator
        torch.Generator().manual_seed(MAX_SEED + 1 if seed > 0 else MIN_SEED - 1)
