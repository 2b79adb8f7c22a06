from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmill.core.events import Cleared, KvEvent, Removed, Stored, StoredBlock, Tier
from tokenmill.router.indexer import EventGap, KvIndexer


def stored(worker: int, eid: int, hashes: list[int], tier: Tier = Tier.DEVICE) -> KvEvent:
    blocks = [StoredBlock(h, h) for h in hashes]
    return KvEvent(eid, worker, Stored(None, blocks), tier)


def brute_matches(held: dict[int, set[int]], query: list[int]) -> dict[int, int]:
    out = {}
    for w, blocks in held.items():
        n = 0
        while n < len(query) and query[n] in blocks:
            n += 1
        if n:
            out[w] = n
    return out


ops = st.lists(
    st.tuples(
        st.sampled_from(["store", "remove", "clear", "leave"]),
        st.integers(0, 3),
        st.lists(st.integers(0, 7), max_size=6),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(ops, st.lists(st.lists(st.integers(0, 7), max_size=6), min_size=1, max_size=5))
def test_find_matches_agrees_with_brute_force(events, queries):
    index = KvIndexer()
    held: dict[int, set[int]] = {}
    eid: dict[int, int] = {}
    for op, w, hashes in events:
        if op == "leave":
            index.remove_worker(w)
            held.pop(w, None)
            eid.pop(w, None)
            continue
        data = {
            "store": Stored(None, [StoredBlock(h, h) for h in hashes]),
            "remove": Removed(hashes),
            "clear": Cleared(),
        }[op]
        gap = index.apply_event(KvEvent(eid.get(w, 0), w, data))
        assert gap is None
        eid[w] = eid.get(w, 0) + 1
        blocks = held.setdefault(w, set())
        if op == "store":
            blocks.update(hashes)
        elif op == "remove":
            blocks.difference_update(hashes)
        else:
            blocks.clear()
        index.check_integrity()
    for q in queries:
        assert index.find_matches(q) == brute_matches(held, q)
    for w, blocks in held.items():
        assert index.num_blocks(w) == len(blocks)


def test_early_exit_and_partial_prefixes():
    index = KvIndexer()
    index.apply_event(stored(0, 0, [1, 2, 3]))
    index.apply_event(stored(1, 0, [1, 2]))
    index.apply_event(stored(2, 0, [9]))
    assert index.find_matches([1, 2, 3, 4]) == {0: 3, 1: 2}
    assert index.find_matches([9, 1]) == {2: 1}
    assert index.find_matches([5, 1, 2]) == {}
    assert index.find_matches([]) == {}


def test_tiers_are_separate_and_any_tier_combines():
    index = KvIndexer()
    index.apply_event(stored(0, 0, [1, 2]))
    index.apply_event(KvEvent(0, 0, Stored(2, [StoredBlock(3, 3)]), Tier.HOST))
    assert index.find_matches([1, 2, 3]) == {0: 2}
    assert index.find_matches([1, 2, 3], Tier.HOST) == {}
    assert index.find_matches_any_tier([1, 2, 3]) == {0: 3}
    index.apply_event(KvEvent(1, 0, Cleared(), Tier.HOST))
    assert index.find_matches_any_tier([1, 2, 3]) == {0: 2}


def test_event_gaps_reported_per_worker_and_event_still_applied():
    index = KvIndexer()
    assert index.apply_event(stored(0, 0, [1])) is None
    assert index.apply_event(stored(0, 3, [2])) == EventGap(0, 1, 3)
    assert index.apply_event(stored(0, 4, [3])) is None
    assert index.apply_event(stored(1, 1, [1])) == EventGap(1, 0, 1)
    assert index.find_matches([1, 2, 3]) == {0: 3, 1: 1}


def test_remove_worker_purges_blocks_and_reuses_slot():
    index = KvIndexer()
    index.apply_event(stored(0, 0, [1, 2]))
    index.apply_event(stored(1, 0, [1]))
    index.remove_worker(0)
    assert index.find_matches([1, 2]) == {1: 1}
    index.apply_event(stored(7, 0, [1, 2]))
    assert index.find_matches([1, 2]) == {1: 1, 7: 2}
    assert index.num_blocks(0) == 0
    index.check_integrity()
