"""KVCacheManager: block tables, prefix hits, incremental caching, tail-first freeing."""

from __future__ import annotations

from tokenmill.core.block_hash import block_hash_pairs, block_hashes
from tokenmill.core.events import Removed, Stored, StoredBlock
from tokenmill.engine.request import Request
from tokenmill.kv.manager import KVCacheManager

BS = 4


def make(num_blocks: int = 16) -> tuple[KVCacheManager, list]:
    events: list = []
    return KVCacheManager(num_blocks, BS, True, events.append), events


def request(request_id: str, prompt: list[int], salt: str | None = None) -> Request:
    return Request(request_id, prompt, cache_salt=salt, block_size=BS)


def run_prefill(kv: KVCacheManager, req: Request) -> list[int]:
    """Admit like the scheduler: prefix hits, then the whole rest of the prompt in one step."""
    computed, num_cached = kv.get_computed_blocks(req)
    assert kv.allocate_slots(req, req.num_tokens - num_cached, computed) is not None
    req.num_computed_tokens = req.num_tokens
    kv.cache_full_blocks(req)
    return kv.get_block_ids(req.request_id)


def test_request_hashes_match_core_function_incrementally():
    req = request("a", list(range(10)))
    assert req.block_hashes == block_hashes(list(range(10)), BS)
    for t in range(10, 17):
        req.append_output_token(t)
    assert req.block_hashes == block_hashes(list(range(17)), BS)
    assert req.local_hashes == [p[1] for p in block_hash_pairs(list(range(17)), BS)]


def test_precomputed_prompt_hashes_are_used_and_extended():
    prompt = list(range(10))
    pairs = block_hash_pairs(prompt, BS)
    given = ([h for h, _ in pairs], [lh for _, lh in pairs])
    req = Request("a", prompt, block_size=BS, prompt_hashes=given)
    assert (req.block_hashes, req.local_hashes) == given
    req.append_output_token(10)
    req.append_output_token(11)
    assert req.block_hashes == block_hashes(list(range(12)), BS)


def test_allocate_covers_tokens_and_stores_full_blocks():
    kv, events = make()
    req = request("a", list(range(10)))  # 2 full blocks + 2 tokens
    assert run_prefill(kv, req) == [0, 1, 2]
    pairs = block_hash_pairs(list(range(10)), BS)
    assert events == [Stored(None, [StoredBlock(h, lh) for h, lh in pairs])]
    kv.check_integrity()


def test_prefix_hit_shares_blocks_and_never_covers_the_whole_prompt():
    kv, _ = make()
    run_prefill(kv, request("a", list(range(12))))  # 3 full blocks cached
    b = request("b", list(range(12)))
    computed, num_cached = kv.get_computed_blocks(b)
    assert (computed, num_cached) == ([0, 1], 8)  # the last block is recomputed
    c = request("c", list(range(13)))
    assert kv.get_computed_blocks(c) == ([0, 1, 2], 12)
    assert kv.allocate_slots(c, 1, [0, 1, 2]) == [3]
    assert kv.get_block_ids("c") == [0, 1, 2, 3]
    assert [kv.pool.ref_count(i) for i in range(4)] == [2, 2, 2, 1]
    kv.check_integrity()


def test_salted_requests_do_not_share():
    kv, _ = make()
    run_prefill(kv, request("a", list(range(12)), salt="tenant-1"))
    assert kv.get_computed_blocks(request("b", list(range(12)), salt="tenant-2")) == ([], 0)
    assert kv.get_computed_blocks(request("c", list(range(12)))) == ([], 0)
    assert kv.get_computed_blocks(request("d", list(range(12)), salt="tenant-1"))[1] == 8
    kv.check_integrity()


def test_free_is_tail_first_and_hits_revive_free_blocks():
    kv, events = make(8)
    run_prefill(kv, request("a", list(range(10))))  # blocks 0, 1 cached; 2 partial
    kv.free("a")
    assert kv.pool.free_queue() == [3, 4, 5, 6, 7, 2, 1, 0]
    b = request("b", list(range(9)))
    computed, num_cached = kv.get_computed_blocks(b)
    assert (computed, num_cached) == ([0, 1], 8)
    assert kv.allocate_slots(b, 1, computed) == [3]
    assert kv.pool.free_queue() == [4, 5, 6, 7, 2]
    kv.free("b")
    assert kv.get_block_ids("b") == []
    assert kv.num_used_blocks == 0
    assert not any(isinstance(e, Removed) for e in events)
    kv.check_integrity()


def test_allocate_fails_without_change_when_pool_or_watermark_is_short():
    kv, _ = make(4)
    a = request("a", list(range(12)))
    assert kv.allocate_slots(a, 12) == [0, 1, 2]
    b = request("b", list(range(8)))
    assert kv.allocate_slots(b, 8) is None
    assert kv.allocate_slots(b, 4, num_reserved_blocks=1) is None
    assert kv.get_block_ids("b") == []
    assert kv.allocate_slots(b, 4) == [3]
    kv.check_integrity()


def test_decode_grows_table_one_block_at_a_time_and_caches_output_blocks():
    kv, events = make()
    req = request("a", list(range(7)))
    run_prefill(kv, req)  # 1 full block + 3 tokens, table [0, 1]
    req.append_output_token(100)  # token 7 fills block 1 once computed
    assert kv.allocate_slots(req, 1) == []
    req.num_computed_tokens += 1
    kv.cache_full_blocks(req)
    assert events[-1] == Stored(
        req.block_hashes[0], [StoredBlock(req.block_hashes[1], req.local_hashes[1])]
    )
    req.append_output_token(101)
    assert kv.allocate_slots(req, 1) == [2]
    assert kv.get_block_ids("a") == [0, 1, 2]
    # the next conversation turn (prompt + output + more) hits the output block too
    turn2 = request("b", [*range(7), 100, 101, 5, 6, 7])
    assert kv.get_computed_blocks(turn2) == ([0, 1], 8)
    kv.check_integrity()


def test_eviction_emits_removed_for_reused_cached_blocks():
    kv, events = make(3)
    run_prefill(kv, request("a", list(range(8)) + [99]))  # blocks 0, 1 cached, 2 partial
    kv.free("a")
    b = request("b", [50 + i for i in range(9)])
    assert kv.get_computed_blocks(b) == ([], 0)
    assert kv.allocate_slots(b, 9) == [2, 1, 0]
    assert events[-1] == Removed(block_hashes(list(range(8)), BS)[::-1])
    kv.check_integrity()


def test_caching_disabled_looks_up_and_stores_nothing():
    events: list = []
    kv = KVCacheManager(8, BS, False, events.append)
    req = Request("a", list(range(9)), block_size=None)
    assert kv.get_computed_blocks(req) == ([], 0)
    assert kv.allocate_slots(req, 9) == [0, 1, 2]
    req.num_computed_tokens = 9
    kv.cache_full_blocks(req)
    assert events == [] and kv.pool.num_cached_blocks == 0
    kv.free("a")
    kv.check_integrity()
