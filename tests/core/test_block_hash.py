"""The one block-hash function against its written definition (core/block_hash.py): XXH3-64
with the seed over little-endian u32 token bytes per full block, chained over little-endian
u64 pairs; the same hashes for a list, a tuple and a numpy array of the same ids."""

from __future__ import annotations

import random
import struct

import numpy as np
import pytest
import xxhash

from tokenmill.core.block_hash import SEED, block_hash_pairs, block_hashes, local_block_hashes

BLOCK = 16


def spec_local(ids: list[int], seed: int = SEED) -> list[int]:
    full = len(ids) // BLOCK * BLOCK
    return [
        xxhash.xxh3_64_intdigest(struct.pack(f"<{BLOCK}I", *ids[i : i + BLOCK]), seed=seed)
        for i in range(0, full, BLOCK)
    ]


def spec_chain(local: list[int], seed: int = SEED) -> list[int]:
    out = []
    for h in local:
        out.append(
            h if not out else xxhash.xxh3_64_intdigest(struct.pack("<QQ", out[-1], h), seed=seed)
        )
    return out


def test_hashes_follow_the_definition_for_every_input_type():
    rng = random.Random(7)
    ids = [rng.randrange(2**32) for _ in range(5 * BLOCK + 3)]  # a partial tail block
    expected = spec_local(ids)
    assert len(expected) == 5
    for given in (ids, tuple(ids), np.array(ids, dtype=np.int64), np.array(ids, dtype=np.uint32)):
        assert local_block_hashes(given, BLOCK) == expected
    assert block_hashes(ids, BLOCK) == spec_chain(expected)
    assert [s for s, _ in block_hash_pairs(ids, BLOCK)] == spec_chain(expected)
    assert local_block_hashes(ids[: BLOCK - 1], BLOCK) == []


def test_salt_changes_every_hash():
    ids = list(range(3 * BLOCK))
    assert not set(block_hashes(ids, BLOCK)) & set(block_hashes(ids, BLOCK, salt="tenant"))


@pytest.mark.parametrize("bad", [-1, 2**32])
def test_ids_outside_u32_are_refused(bad):
    with pytest.raises(OverflowError):
        local_block_hashes([1] * (BLOCK - 1) + [bad], BLOCK)
