"""TierConnector with plain data (no engine, no I/O): lookup past the device hit, sync
(host) and async (disk) loads, pins, offload plans from the device pool's evictions, holds
while a load runs, and the tiers' KV events."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from tokenmill.core.events import Removed, Tier
from tokenmill.kv.block_pool import BlockPool
from tokenmill.kv.tier_connector import TierConnector, TierMetadata, TierOutput
from tokenmill.kv.tiers import Hit, PlacementConfig, TierConfig, TierPlacement, Write

B, BLOCK_BYTES = 4, 100
H, D, DEV = Tier.HOST, Tier.DISK, Tier.DEVICE


@dataclass
class Req:
    request_id: str
    block_hashes: list[int]
    num_prompt_tokens: int
    num_computed_tokens: int = 0
    local_hashes: list[int] = field(default_factory=list)
    kv_transfer_params: None = None
    finish_reason: None = None

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens


def make(host=4, disk=4):
    events: list = []
    tiers = (TierConfig(H, host), TierConfig(D, disk))
    placement = TierPlacement(PlacementConfig(tiers, BLOCK_BYTES))
    conn = TierConnector(placement, B, lambda data, tier: events.append((tier, data)))
    pool = BlockPool(8)
    conn.attach(pool)
    return conn, placement, pool, events


def evict(pool: BlockPool, hashes: list[int]) -> list[int]:
    """Cache blocks for ``hashes`` and free them, then allocate everything (evicting them)."""
    ids = pool.allocate(len(hashes))
    pool.cache_blocks(ids, hashes, hashes, None)
    pool.free(ids)
    pool.allocate(pool.num_free_blocks)
    return ids


def test_evictions_become_ordered_writes_at_build_time_and_emit_tier_events():
    conn, placement, pool, events = make(host=2)
    ids = evict(pool, [11, 12, 13])
    assert placement.hashes(H) == set()  # nothing planned inside allocate()
    meta = conn.build_connector_meta()
    assert isinstance(meta, TierMetadata)
    assert meta.writes == [
        Write(11, DEV, ids[0], H, 0),
        Write(12, DEV, ids[1], H, 1),
        Write(11, H, 0, D, 0),  # host full: its LRU victim goes down first
        Write(13, DEV, ids[2], H, 0),
    ]
    assert conn.has_pending()  # the disk write is in flight
    conn.update_connector_output(TierOutput(written=[(D, 11, True)]))
    assert not conn.has_pending() and conn.build_connector_meta() is None
    assert [(t, type(d).__name__) for t, d in events] == [
        (H, "Stored"),
        (H, "Removed"),
        (H, "Stored"),
        (D, "Stored"),
    ]
    assert events[1][1] == Removed([11]) and [b.block_hash for b in events[3][1].blocks] == [11]


def test_lookup_starts_after_the_device_hit_and_never_covers_the_last_token():
    conn, placement, pool, _ = make()
    evict(pool, [1, 2, 3])
    conn.build_connector_meta()
    req = Req("a", [1, 2, 3], num_prompt_tokens=12)
    assert conn.get_num_new_matched_tokens(req, 0) == (8, False)  # block 3 holds the last token
    assert conn.get_num_new_matched_tokens(req, 4) == (4, False)
    assert conn.get_num_new_matched_tokens(Req("b", [9, 1], 8), 0) == (0, False)


def test_a_host_load_is_sync_a_disk_load_async_and_hits_are_pinned_until_reported():
    conn, placement, pool, _ = make(host=1)
    evict(pool, [1, 2])  # 1 goes on to disk, 2 stays in host
    conn.update_connector_output(
        TierOutput(
            written=[
                (w.dst, w.block_hash, True)
                for w in conn.build_connector_meta().writes
                if w.dst is D
            ]
        )
    )
    req = Req("a", [1, 2, 7], num_prompt_tokens=12)
    assert conn.get_num_new_matched_tokens(req, 0) == (8, True)
    conn.update_state_after_alloc(req, [5, 6, 7], 0, 8)
    meta = conn.build_connector_meta()
    (load,) = meta.loads
    assert (load.block_ids, load.first_block, load.is_async) == ([5, 6], 0, True)
    assert meta.hits["a"] == [Hit(1, D, 0), Hit(2, H, 0)]
    assert placement.bytes_in_flight == BLOCK_BYTES  # the disk read
    assert conn.request_finished(req, [5, 6, 7])  # aborted while loading: held
    assert conn.take_releasable() == []
    conn.update_connector_output(TierOutput(finished_loads=["a"]))
    assert conn.take_releasable() == ["a"] and placement.bytes_in_flight == 0
    assert conn.num_onboarded_blocks == 2 and not conn.has_pending()
    placement.check_integrity()
    assert not conn.request_finished(req, [5])  # nothing in flight: freed at once


def test_invalid_entries_are_forgotten_and_the_failed_load_counted():
    conn, placement, pool, events = make()
    evict(pool, [1])
    conn.build_connector_meta()
    req = Req("a", [1, 5], 8)
    conn.update_state_after_alloc(req, [0, 1], 0, 4)
    conn.build_connector_meta()
    conn.update_connector_output(TierOutput(failed_loads=["a"], invalid=[(H, 1)]))
    assert placement.lookup([1]) == [] and conn.num_failed_loads == 1
    assert events[-1] == (H, Removed([1]))
    with pytest.raises(AssertionError):  # an allocation the connector never offered
        conn.update_state_after_alloc(Req("b", [1, 5], 8), [0, 1], 0, 4)
