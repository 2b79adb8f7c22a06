"""The paged engine against the contiguous-KV reference forward pass (fp32, tiny models, on
``TEST_DEVICE``).

Tolerance: logits within 1e-4 absolute (fp32; the only differences are summation orders of
the batched matmuls and SDPA over gathered blocks), greedy tokens identical.
"""

from __future__ import annotations

import pytest
import torch
from helpers.tiny_models import TEST_DEVICE

from tokenmill.core.request import EngineRequest, FinishReason
from tokenmill.core.sampling import SamplingParams
from tokenmill.engine.builder import build_real_core
from tokenmill.engine.config import CacheConfig, SchedulerConfig
from tokenmill.engine.executor.model_runner import ModelRunner, StepSeq
from tokenmill.engine.loader import load_model
from tokenmill.engine.reference import greedy_generate, reference_logits

ATOL = 1e-4
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module", params=["smollm2", "llama3"])
def loaded(request, tiny_model_dir):
    torch.set_num_threads(1)
    path = tiny_model_dir(request.param)
    return load_model(path, dtype="fp32", device=TEST_DEVICE)


def prompts(n: int, lengths=(5, 17, 33, 3, 24, 9)) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [
        torch.randint(4, 300, (lengths[i % len(lengths)],), generator=g).tolist() for i in range(n)
    ]


def run_core(loaded, token_lists, params=GREEDY, num_blocks=64, block_size=4, **sched):
    cache = CacheConfig(block_size=block_size, num_blocks=num_blocks)
    core = build_real_core(loaded, SchedulerConfig(max_model_len=128, **sched), cache=cache)
    for i, ids in enumerate(token_lists):
        core.add_request(EngineRequest(request_id=f"r{i}", prompt_token_ids=ids, params=params))
    tokens = {f"r{i}": [] for i in range(len(token_lists))}
    outs = {}
    while core.has_unfinished_requests():
        for out in core.step():
            tokens[out.request_id].extend(out.new_token_ids)
            if out.finished:
                outs[out.request_id] = out
    core.check_integrity()
    assert core.scheduler.kv.num_used_blocks == 0
    return [tokens[f"r{i}"] for i in range(len(token_lists))], outs, core


@pytest.mark.parametrize("batched_decode", [True, False])
def test_paged_logits_match_reference_prefill_chunks_and_decode(loaded, batched_decode):
    """Three sequences prefilled in uneven chunks (some with a cached prefix), then decoded
    together: every sampled row's logits equal the reference's for the same position."""
    seqs = prompts(3)
    refs = reference_logits(loaded.model, seqs)
    runner = ModelRunner(
        loaded.model,
        loaded.config,
        40,
        4,
        torch.float32,
        loaded.device,
        batched_decode=batched_decode,
        decode_group_size=2,
    )
    tables = [list(range(i * 13, (i + 1) * 13))[::-1] for i in range(3)]  # scattered blocks
    cuts = [[0, 3, 5], [0, 7, 16, 17], [0, 1, 20, 33]]
    for step in range(3):
        batch = []
        for i, ids in enumerate(seqs):
            if step + 1 < len(cuts[i]):
                a, b = cuts[i][step], cuts[i][step + 1]
                batch.append((i, StepSeq(f"s{i}", ids[a:b], a, tables[i], True, GREEDY, ids, [])))
        logits = runner.forward_logits([s for _, s in batch])
        for row, (i, s) in enumerate(batch):
            end = s.num_computed + len(s.token_ids)
            torch.testing.assert_close(logits[row], refs[i][end - 1], atol=ATOL, rtol=0)
    # decode one extra token per sequence: all three are decode rows
    nxt = [int(r[-1].argmax()) for r in refs]
    batch = [
        StepSeq(f"s{i}", [nxt[i]], len(ids), tables[i], True, GREEDY, ids, [])
        for i, ids in enumerate(seqs)
    ]
    logits = runner.forward_logits(batch)
    full = reference_logits(loaded.model, [ids + [nxt[i]] for i, ids in enumerate(seqs)])
    for i in range(3):
        torch.testing.assert_close(logits[i], full[i][-1], atol=ATOL, rtol=0)


def test_mixed_batch_greedy_matches_reference(loaded):
    seqs = prompts(6)
    got, outs, _ = run_core(loaded, seqs)
    assert got == greedy_generate(loaded.model, seqs, 10, eos_token_ids=())
    assert all(o.finish_reason == FinishReason.LENGTH for o in outs.values())


def test_chunked_prefill_same_tokens_as_unchunked(loaded):
    seqs = prompts(4)
    chunked, _, core = run_core(loaded, seqs, max_num_batched_tokens=6)
    unchunked, _, _ = run_core(loaded, seqs, max_num_batched_tokens=2048)
    assert chunked == unchunked == greedy_generate(loaded.model, seqs, 10, eos_token_ids=())
    assert core.num_steps > 20  # 81 prompt tokens at 6 per step: really chunked


def test_prefix_cache_hit_same_output_and_cached_tokens_reported(loaded):
    shared = prompts(1, lengths=(21,))[0]
    seqs = [shared, shared + [7, 8, 9]]
    cache = CacheConfig(block_size=4, num_blocks=64)
    core = build_real_core(loaded, SchedulerConfig(max_model_len=128), cache=cache)
    results = []
    for i, ids in enumerate(seqs):  # one after the other: the second hits the first's blocks
        core.add_request(EngineRequest(request_id=f"p{i}", prompt_token_ids=ids, params=GREEDY))
        toks, last = [], None
        while core.has_unfinished_requests():
            for out in core.step():
                toks.extend(out.new_token_ids)
                last = out
        results.append((toks, last.num_cached_tokens))
    ref = greedy_generate(loaded.model, seqs, 10, eos_token_ids=())
    assert [r[0] for r in results] == ref
    assert results[0][1] == 0
    assert results[1][1] == 20  # 5 full blocks of the shared 21-token prompt
    core.check_integrity()


def test_preemption_under_tiny_pool_every_request_right(loaded):
    seqs = prompts(5)
    params = SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True)
    got, outs, core = run_core(loaded, seqs, params=params, num_blocks=16, block_size=4)
    assert core.scheduler.num_preemptions > 0
    assert got == greedy_generate(loaded.model, seqs, 14, eos_token_ids=())
    assert all(o.num_output_tokens == 14 for o in outs.values())
