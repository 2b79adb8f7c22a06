"""TierPlacement: exact slots, LRU order per tier, write-back and write-through demotion,
pins, the bytes-in-flight cap, adoption after a restart, and random sequences that keep the
bookkeeping consistent."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmill.core.events import Tier
from tokenmill.kv.tiers import Hit, PlacementConfig, TierConfig, TierPlacement, Write

H, D, R, DEV = Tier.HOST, Tier.DISK, Tier.REMOTE, Tier.DEVICE
BLOCK = 100


def make(host=2, disk=2, remote=0, write_through=False, cap=10 * BLOCK) -> TierPlacement:
    tiers = [TierConfig(H, host), TierConfig(D, disk)]
    if remote:
        tiers.append(TierConfig(R, remote))
    return TierPlacement(PlacementConfig(tuple(tiers), BLOCK, write_through, cap))


def run(p: TierPlacement, writes: list[Write], ok: bool = True) -> list[Write]:
    """Commit every async write as the executor would (host writes need none)."""
    for w in writes:
        if w.dst is not H:
            p.commit(w.dst, w.block_hash, ok)
    return writes


def test_config_rejects_device_tier_duplicates_and_tiny_cap():
    with pytest.raises(ValueError, match="device tier"):
        TierConfig(DEV, 4)
    with pytest.raises(ValueError, match="at least 1 block"):
        TierConfig(H, 0)
    with pytest.raises(ValueError, match="appears twice"):
        PlacementConfig((TierConfig(H, 1), TierConfig(H, 2)), BLOCK)
    with pytest.raises(ValueError, match="at least one block"):
        PlacementConfig((TierConfig(H, 1),), BLOCK, max_bytes_in_flight=BLOCK - 1)


def test_device_eviction_goes_to_host_slots_in_order():
    p = make()
    assert run(p, p.offload(11, device_block=5)) == [Write(11, DEV, 5, H, 0)]
    assert run(p, p.offload(12, device_block=6)) == [Write(12, DEV, 6, H, 1)]
    assert p.hashes(H) == {11, 12} and p.hashes(D) == set()
    assert p.bytes_in_flight == 0  # host copies are synchronous
    p.check_integrity()


def test_write_back_demotes_host_lru_victim_to_disk_before_reusing_its_slot():
    p = make()
    run(p, p.offload(11, 0))
    run(p, p.offload(12, 1))
    writes = p.offload(13, 2)
    assert writes == [Write(11, H, 0, D, 0), Write(13, DEV, 2, H, 0)]
    assert p.bytes_in_flight == BLOCK  # the disk write is in flight
    assert not p.contains(D, 11)  # not found until committed
    run(p, writes)
    assert p.bytes_in_flight == 0
    assert (p.hashes(H), p.hashes(D)) == ({12, 13}, {11})
    p.check_integrity()


def test_a_block_the_host_has_is_touched_not_copied():
    p = make()
    run(p, p.offload(11, 0))
    run(p, p.offload(12, 1))
    assert p.offload(11, 7) == []  # 11 becomes most recently used
    assert p.offload(13, 2)[0] == Write(12, H, 1, D, 0)  # so 12 is the victim


def test_write_through_writes_every_tier_and_evicts_without_copies():
    p = make(write_through=True, remote=4)
    writes = p.offload(11, 3)
    assert writes == [Write(11, DEV, 3, H, 0), Write(11, H, 0, D, 0), Write(11, D, 0, R, 0)]
    run(p, writes)
    run(p, p.offload(12, 4))
    assert p.hashes(D) == {11, 12}
    # 11 leaves host without a copy (disk has it); disk makes room for 13 by dropping 11
    assert p.offload(13, 5) == [
        Write(13, DEV, 5, H, 0),
        Write(13, H, 0, D, 0),
        Write(13, D, 0, R, 2),
    ]


def test_lookup_returns_longest_run_fastest_tier_first():
    p = make(host=2, disk=4)
    for i, h in enumerate([1, 2, 3]):
        run(p, p.offload(h, i))  # 1 demoted to disk by 3
    run(p, p.offload(2, 9))  # touch only
    assert p.lookup([1, 2, 3, 4, 1]) == [Hit(1, D, 0), Hit(2, H, 1), Hit(3, H, 0)]
    assert p.lookup([4, 1]) == []
    assert p.counters(H).hits == 0  # lookup changes nothing


def test_a_host_entry_is_ready_when_planned_and_a_later_write_may_demote_it():
    p = make(host=1, disk=2)
    assert p.offload(1, 0) + p.offload(2, 1) == [
        Write(1, DEV, 0, H, 0),
        Write(1, H, 0, D, 0),  # read after the copy above, before the one below
        Write(2, DEV, 1, H, 0),
    ]
    assert p.hashes(H) == {2} and not p.contains(D, 1)
    assert p.is_async(D) and p.is_async(R) and not p.is_async(H)
    p.commit(D, 1, ok=True)
    assert p.lookup([1, 2]) == [Hit(1, D, 0), Hit(2, H, 0)]


def test_disk_first_without_a_host_tier_is_async():
    p = TierPlacement(PlacementConfig((TierConfig(D, 2),), BLOCK))
    assert p.offload(5, 3) == [Write(5, DEV, 3, D, 0)]
    assert p.bytes_in_flight == BLOCK and p.lookup([5]) == []
    p.commit(D, 5, ok=True)
    assert p.lookup([5]) == [Hit(5, D, 0)] and p.bytes_in_flight == 0


def test_pinned_entries_are_not_evicted_and_writes_drop_when_all_pinned():
    p = make(host=1, disk=1)
    run(p, p.offload(1, 0))
    hits = p.lookup([1])
    p.pin(hits)
    assert p.counters(H).hits == 1
    assert p.offload(2, 1) == []  # nothing evictable in host
    assert p.counters(H).dropped == 1
    p.unpin(hits)
    assert p.offload(2, 1) == [Write(1, H, 0, D, 0), Write(2, DEV, 1, H, 0)]


def test_failed_write_is_a_miss_and_frees_the_slot():
    p = make()
    run(p, p.offload(1, 0))
    run(p, p.offload(2, 1))
    writes = p.offload(3, 2)
    p.commit(D, 1, ok=False)
    assert p.lookup([1]) == []
    assert p.counters(D).failed == 1 and p.num_used_blocks(D) == 0
    with pytest.raises(ValueError, match="no write"):
        p.commit(D, 1, ok=True)
    assert writes[0].dst is D
    p.check_integrity()


def test_invalidate_forgets_an_entry_even_while_pinned():
    p = make()
    run(p, p.offload(1, 0))
    hits = p.lookup([1])
    p.pin(hits)
    p.invalidate(H, 1)
    p.unpin(hits)  # skipped: forgotten
    assert p.lookup([1]) == [] and p.counters(H).invalid == 1
    p.check_integrity()


def offload_sync(p: TierPlacement, block_hash: int) -> list[Write]:
    """Offload; the async writes (the host copy needs no commit)."""
    return [w for w in p.offload(block_hash, block_hash) if w.dst is not H]


def test_bytes_in_flight_cap_drops_async_writes_and_refuses_reads():
    p = make(host=1, disk=8, cap=2 * BLOCK)
    offload_sync(p, 1)
    w1 = offload_sync(p, 2)  # demotes 1: one block in flight
    w2 = offload_sync(p, 3)  # demotes 2: two in flight
    assert [w.block_hash for w in w1 + w2] == [1, 2]
    assert offload_sync(p, 4) == []  # 3 dropped on its way to disk
    assert p.counters(D).dropped == 1 and p.hashes(H) == {4}
    assert not p.reserve(BLOCK)
    run(p, w1 + w2)
    assert p.reserve(3 * BLOCK)  # a lone transfer over the cap is allowed
    p.unreserve(3 * BLOCK)
    with pytest.raises(ValueError):
        p.unreserve(1)
    assert p.hashes(D) == {1, 2}
    p.check_integrity()


def test_adopt_takes_found_blocks_once():
    p = make(host=1, disk=3)
    assert p.adopt(D, 2, 77)
    assert not p.adopt(D, 2, 78)  # slot taken
    assert not p.adopt(D, 0, 77)  # hash known
    assert p.lookup([77]) == [Hit(77, D, 2)]
    p.check_integrity()


@settings(max_examples=60, deadline=None)
@given(
    st.booleans(),
    st.lists(
        st.tuples(
            st.sampled_from(["offload", "commit", "fail", "read", "bad"]), st.integers(0, 12)
        ),
        max_size=80,
    ),
)
def test_random_operations_keep_integrity(write_through, ops):
    p = make(host=3, disk=4, remote=5, write_through=write_through, cap=3 * BLOCK)
    pending: list[Write] = []
    pinned: list[list[Hit]] = []
    for op, h in ops:
        if op == "offload":
            pending.extend(w for w in p.offload(h, device_block=h) if w.dst is not H)
        elif op in ("commit", "fail") and pending:
            w = pending.pop(0)
            p.commit(w.dst, w.block_hash, op == "commit")
        elif op == "read":
            hits = p.lookup([h])
            p.pin(hits)
            pinned.append(hits)
        elif op == "bad":
            p.invalidate(H, h)
        p.check_integrity()
        for tier in p.tiers:
            assert p.num_used_blocks(tier) <= p.num_blocks(tier)
    for hits in pinned:
        p.unpin(hits)
    for w in pending:
        p.commit(w.dst, w.block_hash, True)
    assert p.bytes_in_flight == 0
    p.check_integrity()
