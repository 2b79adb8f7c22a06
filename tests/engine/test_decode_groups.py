"""Decode rows grouped by context length (``PagedAttention._decode_groups``) against the
contiguous-KV reference (fp32, tiny model): logits within 1e-4 whatever the row order, and the
groups really are sorted.

Rows arrive in T order with lengths out of order; with ``decode_group_size=2`` they are
attended in groups of similar length, and each row's output must land back in its own row.
"""

from __future__ import annotations

import pytest
import torch
from helpers.tiny_models import TEST_DEVICE

from tokenmill.core.sampling import SamplingParams
from tokenmill.engine.executor.model_runner import ModelRunner, StepSeq
from tokenmill.engine.executor.paged_attention import PagedAttention
from tokenmill.engine.loader import load_model
from tokenmill.engine.reference import reference_logits

ATOL = 1e-4
GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
LENGTHS = (33, 5, 24, 9, 17)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(tiny_model_dir("smollm2"), dtype="fp32", device=TEST_DEVICE)


def test_sorted_decode_groups_match_reference(loaded):
    g = torch.Generator().manual_seed(7)
    seqs = [torch.randint(4, 300, (n,), generator=g).tolist() for n in LENGTHS]
    runner = ModelRunner(
        loaded.model, loaded.config, 64, 4, torch.float32, loaded.device, decode_group_size=2
    )
    tables = [list(range(i * 12, (i + 1) * 12)) for i in range(len(seqs))]
    prefill = [
        StepSeq(f"s{i}", ids, 0, tables[i], True, GREEDY, ids, []) for i, ids in enumerate(seqs)
    ]
    nxt = [int(row.argmax()) for row in runner.forward_logits(prefill)]
    decode = [
        StepSeq(f"s{i}", [nxt[i]], len(ids), tables[i], True, GREEDY, ids, [nxt[i]])
        for i, ids in enumerate(seqs)
    ]
    logits = runner.forward_logits(decode)  # [5, V]
    full = reference_logits(loaded.model, [ids + [nxt[i]] for i, ids in enumerate(seqs)])
    for i in range(len(seqs)):
        torch.testing.assert_close(logits[i], full[i][-1], atol=ATOL, rtol=0)


def test_groups_are_sorted_by_context_length():
    attn = PagedAttention(1, 64, 4, 1, 8, torch.float32, decode_group_size=2)
    attn.prepare([(n - 1, 1, list(range(i * 12, (i + 1) * 12))) for i, n in enumerate(LENGTHS)])
    lengths = [d.gather.shape[1] for d in attn._layout.decode]
    assert lengths == [9, 24, 33]  # (5, 9), (17, 24), (33,): padded to the group's longest
    assert not attn._layout.pure_decode
