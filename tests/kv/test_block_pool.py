"""BlockPool: exact block ids, ref counts, eviction order and KV events."""

from __future__ import annotations

import random

import pytest

from tokenmill.core.events import Cleared, Removed, Stored, StoredBlock
from tokenmill.kv.block_pool import BlockPool


class EventLog(list):
    """A sink that records events and replays them into the set of cached hashes."""

    def replay(self) -> set[int]:
        cached: set[int] = set()
        for event in self:
            if isinstance(event, Stored):
                cached.update(b.block_hash for b in event.blocks)
            elif isinstance(event, Removed):
                assert set(event.block_hashes) <= cached
                cached.difference_update(event.block_hashes)
            else:
                cached.clear()
        return cached


def make_pool(num_blocks: int = 8) -> tuple[BlockPool, EventLog]:
    events = EventLog()
    return BlockPool(num_blocks, events.append), events


def test_fresh_pool_allocates_ids_in_order_with_ref_one():
    pool, events = make_pool(8)
    assert pool.allocate(3) == [0, 1, 2]
    assert pool.allocate(2) == [3, 4]
    assert [pool.ref_count(b) for b in range(8)] == [1, 1, 1, 1, 1, 0, 0, 0]
    assert (pool.num_free_blocks, pool.num_used_blocks, pool.usage) == (3, 5, 5 / 8)
    assert events == []
    pool.check_integrity()


def test_allocate_more_than_free_raises_and_changes_nothing():
    pool, _ = make_pool(4)
    pool.allocate(3)
    with pytest.raises(ValueError, match="cannot allocate 2 blocks: 1 free"):
        pool.allocate(2)
    assert pool.num_free_blocks == 1
    pool.check_integrity()


def test_free_more_than_allocated_raises():
    pool, _ = make_pool(4)
    with pytest.raises(ValueError, match="block 0 freed more often"):
        pool.free([0])


def test_plain_blocks_are_reused_in_free_order():
    pool, _ = make_pool(4)
    assert pool.allocate(4) == [0, 1, 2, 3]
    pool.free([2, 0])
    pool.free([3])
    assert pool.free_queue() == [2, 0, 3]
    assert pool.allocate(2) == [2, 0]
    pool.check_integrity()


def test_stored_event_carries_parent_and_local_hashes():
    pool, events = make_pool(4)
    blocks = pool.allocate(3)
    pool.cache_blocks(blocks[:2], [101, 102], [11, 12], None)
    pool.cache_blocks(blocks[2:], [103], [13], 102)
    assert events == [
        Stored(None, [StoredBlock(101, 11), StoredBlock(102, 12)]),
        Stored(102, [StoredBlock(103, 13)]),
    ]
    assert [pool.block_hash(b) for b in range(4)] == [101, 102, 103, None]
    assert pool.get_cached_block(102) == 1
    assert pool.num_cached_blocks == 3
    pool.check_integrity()


def test_ref_count_zero_keeps_block_cached_until_evicted():
    pool, events = make_pool(3)
    blocks = pool.allocate(3)
    pool.cache_blocks(blocks, [100, 101, 102], [1, 2, 3], None)
    pool.free(reversed(blocks))  # tail first, as the manager does
    assert pool.free_queue() == [2, 1, 0]
    assert pool.cached_hashes() == {100, 101, 102}
    assert len(events) == 1  # no Removed when ref counts drop to zero
    assert pool.allocate(1) == [2]  # the request's last block is evicted first
    assert events[-1] == Removed([102])
    assert pool.allocate(2) == [1, 0]
    assert events[-1] == Removed([101, 100])  # one event per allocate call
    assert pool.num_cached_blocks == 0
    pool.check_integrity()


def test_plain_free_blocks_go_before_any_cached_block():
    pool, events = make_pool(4)
    blocks = pool.allocate(4)
    pool.cache_blocks(blocks[:2], [100, 101], [1, 2], None)
    pool.free([1, 0, 3, 2])
    assert pool.free_queue() == [3, 2, 1, 0]  # plain (FIFO) first, then cached (LRU)
    assert pool.allocate(3) == [3, 2, 1]
    assert events[-1] == Removed([101])
    pool.check_integrity()


def test_touch_revives_a_cached_free_block_from_the_middle_of_the_queue():
    pool, _ = make_pool(4)
    blocks = pool.allocate(4)
    pool.cache_blocks(blocks, [100, 101, 102, 103], [1, 2, 3, 4], None)
    pool.free([3, 2, 1, 0])
    pool.touch([pool.get_cached_block(101)])
    assert pool.free_queue() == [3, 2, 0]
    assert pool.ref_count(1) == 1
    pool.touch([1])
    assert pool.ref_count(1) == 2
    pool.free([1])
    assert pool.free_queue() == [3, 2, 0]
    pool.free([1])
    assert pool.free_queue() == [3, 2, 0, 1]  # most recently freed: evicted last
    pool.check_integrity()


def test_duplicate_hash_is_not_cached_twice_and_splits_stored_runs():
    pool, events = make_pool(6)
    first = pool.allocate(3)
    pool.cache_blocks(first[1:2], [201], [21], 200)
    second = pool.allocate(3)
    pool.cache_blocks(second, [200, 201, 202], [20, 21, 22], None)
    assert events[1:] == [Stored(None, [StoredBlock(200, 20)]), Stored(201, [StoredBlock(202, 22)])]
    assert pool.get_cached_block(201) == first[1]
    assert pool.block_hash(second[1]) is None
    pool.free(reversed(second))
    assert pool.free_queue() == [4, 5, 3]  # the uncached duplicate is plain
    pool.check_integrity()


def test_reset_clears_cache_keeps_used_blocks():
    pool, events = make_pool(4)
    blocks = pool.allocate(4)
    pool.cache_blocks(blocks, [100, 101, 102, 103], [1, 2, 3, 4], None)
    pool.free([3, 1])
    pool.reset()
    assert events[-1] == Cleared()
    assert pool.num_cached_blocks == 0
    assert pool.free_queue() == [3, 1]
    assert (pool.ref_count(0), pool.ref_count(2)) == (1, 1)
    pool.free([0, 2])
    assert pool.free_queue() == [3, 1, 0, 2]
    assert events.replay() == set()
    pool.check_integrity()


def test_check_integrity_detects_corruption():
    pool, _ = make_pool(4)
    pool.allocate(2)
    pool._ref[3] = 1  # a used block that is also in the free queue
    with pytest.raises(AssertionError, match="free block has references|free \\+ used"):
        pool.check_integrity()


def test_random_operations_keep_events_equal_to_cache_contents():
    rng = random.Random(7)
    pool, events = make_pool(32)
    held: list[list[int]] = []
    next_hash = 1
    for _ in range(2000):
        op = rng.random()
        if op < 0.4 and pool.num_free_blocks:
            blocks = pool.allocate(rng.randint(1, min(4, pool.num_free_blocks)))
            num_cached = rng.randint(0, len(blocks))
            hashes = [
                rng.choice([next_hash + i, rng.randint(1, next_hash)]) for i in range(len(blocks))
            ]
            next_hash += len(blocks)
            pool.cache_blocks(blocks[:num_cached], hashes, hashes, None)
            held.append(blocks)
        elif op < 0.7 and held:
            pool.free(reversed(held.pop(rng.randrange(len(held)))))
        elif op < 0.98 and pool.num_cached_blocks:
            block_id = pool.get_cached_block(rng.choice(sorted(pool.cached_hashes())))
            pool.touch([block_id])
            held.append([block_id])
        else:
            pool.reset()
        assert events.replay() == pool.cached_hashes()
        pool.check_integrity()
    for blocks in held:
        pool.free(blocks)
    assert pool.num_used_blocks == 0
    pool.check_integrity()
