"""TierWorker with small tensors: device -> host copies in one batch (a slot planned twice
holds the last block), host -> async snapshots taken before the slot is overwritten, host
loads into device blocks, disk loads landing after the step, misses failing the load."""

from __future__ import annotations

import time

import torch

from tokenmill.core.events import Tier
from tokenmill.engine.executor.kv_tiers import TierWorker
from tokenmill.kv.connector import KvLoad
from tokenmill.kv.tier_connector import TierMetadata
from tokenmill.kv.tiers import Hit, Write
from tokenmill.kvstore.disk import DiskStore
from tokenmill.kvstore.host import HostStore
from tokenmill.kvstore.io import TierIO

L, N, BS, HKV, HD = 2, 6, 4, 1, 8
DEV, H, D = Tier.DEVICE, Tier.HOST, Tier.DISK


def caches():
    k = [torch.randn(N, BS, HKV, HD) for _ in range(L)]
    v = [torch.randn(N, BS, HKV, HD) for _ in range(L)]
    return k, v


def worker(host_slots=2, io=None):
    k, v = caches()
    w = TierWorker(HostStore(host_slots, 2 * L * BS * HKV * HD * 4), io)
    w.register_kv_caches(k, v)
    return w, k, v


def report(w: TierWorker):
    """The worker's next non-empty report (the engine polls each step; no event to await)."""
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        out = w.get_finished()
        if out is not None:
            return out
        time.sleep(0.002)
    raise AssertionError("no report within 10 s")


def block_bytes(w: TierWorker, block_id: int) -> bytes:
    return w.copier.save([block_id]).numpy()[0].tobytes()


def test_a_host_slot_planned_twice_holds_the_last_block_and_a_victim_is_read_first(tmp_path):
    io = TierIO([DiskStore(str(tmp_path), 4, 2 * L * BS * HKV * HD * 4, 1)])
    io.start()
    w, _, _ = worker(io=io)
    try:
        first, second = block_bytes(w, 1), block_bytes(w, 2)
        w.start_load_kv(
            TierMetadata(
                writes=[
                    Write(11, DEV, 1, H, 0),
                    Write(11, H, 0, D, 3),  # demoted: must read block 1's bytes, not block 2's
                    Write(12, DEV, 2, H, 0),
                    Write(13, DEV, 3, H, 1),
                    Write(14, DEV, 4, H, 1),  # slot 1 again, nothing read in between
                ]
            )
        )
        assert w.host.arena[0].tobytes() == second and w.host.read(0, 12) is not None
        assert w.host.arena[1].tobytes() == block_bytes(w, 4)
        done = io.wait(10.0)
        assert [(d.tier, d.block_hash, d.ok) for d in done] == [(D, 11, True)]
        io.get(D, 3, 11)
        assert bytes(io.wait(10.0)[0].payload) == first
    finally:
        io.close()


def test_host_loads_copy_at_once_and_disk_loads_land_after_the_step(tmp_path):
    bb = 2 * L * BS * HKV * HD * 4
    io = TierIO([DiskStore(str(tmp_path), 4, bb, 1)])
    io.start()
    w, _, _ = worker(io=io)
    try:
        w.start_load_kv(TierMetadata(writes=[Write(21, DEV, 0, H, 0)]))
        io.put(D, 2, 22, memoryview(w.copier.save([1]).numpy()[0].copy()))
        io.wait(10.0)
        want_0, want_1 = block_bytes(w, 0), block_bytes(w, 1)
        load = KvLoad(request_id="r", block_ids=[4, 5], first_block=0, num_tokens=8)
        hits = [Hit(21, H, 0), Hit(22, D, 2)]
        w.start_load_kv(TierMetadata(loads=[load], hits={"r": hits}))
        assert block_bytes(w, 4) == want_0  # host: before the forward
        out = report(w)
        assert out.finished_loads == ["r"]
        assert block_bytes(w, 5) == want_1
        bad = KvLoad(request_id="x", block_ids=[3], first_block=0, num_tokens=4)
        w.start_load_kv(TierMetadata(loads=[bad], hits={"x": [Hit(99, D, 3)]}))
        out = report(w)
        assert out.failed_loads == ["x"] and out.invalid == [(D, 99)]
    finally:
        io.close()
