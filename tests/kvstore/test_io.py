"""TierIO: submissions return at once, completions come back through poll; a store that
fails is skipped (one warning, a count) and used again after its backoff once it recovers."""

from __future__ import annotations

import logging
import resource

import numpy as np
import pytest

from tokenmill.core.events import Tier
from tokenmill.kvstore import record
from tokenmill.kvstore.base import BlockStore
from tokenmill.kvstore.disk import DiskStore
from tokenmill.kvstore.io import StoreHealth, TierIO, TierStats
from tokenmill.kvstore.record import Miss

BLOCK = 4096
FP = record.layout_fingerprint("m", "float32", 16, (4, 64))


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def wait_all(io: TierIO, n: int) -> list:
    out: list = []
    while len(out) < n:
        got = io.wait(10.0)
        assert got, "an operation did not finish"
        out += got
    return out


@pytest.fixture
def disk_io(tmp_path):
    clock = FakeClock()
    wakes: list[int] = []
    io = TierIO([DiskStore(str(tmp_path), 16, BLOCK, FP)], lambda: wakes.append(1), clock)
    assert io.start() == {Tier.DISK: []}
    yield io, clock, wakes
    io.close()


def test_puts_and_gets_complete_through_poll_with_stats(disk_io):
    io, _, wakes = disk_io
    data = np.arange(BLOCK, dtype=np.uint8)
    io.put(Tier.DISK, 1, 11, memoryview(data), tag="a")
    done = wait_all(io, 1)
    assert [(d.op, d.ok, d.tag) for d in done] == [("put", True, "a")]
    io.get(Tier.DISK, 1, 11, tag="b")
    io.get(Tier.DISK, 2, 12, tag="c")
    done = sorted(wait_all(io, 2), key=lambda d: d.tag)
    assert bytes(done[0].payload) == data.tobytes() and done[0].ok
    assert (done[1].ok, done[1].miss) == (False, Miss.TRUNCATED)
    assert io.num_pending == 0 and io.poll() == [] and len(wakes) == 3
    stats = io.stats[Tier.DISK]
    assert (stats.offloaded_bytes, stats.onboarded_bytes) == (BLOCK, BLOCK)
    assert stats.misses == {"truncated": 1}


def test_full_disk_is_skipped_with_one_warning_and_used_again(disk_io, file_size_limit, caplog):
    io, clock, _ = disk_io
    file_size_limit(BLOCK)  # the kernel refuses every write past the first slot
    block = memoryview(bytes(BLOCK))
    with caplog.at_level(logging.WARNING, "tokenmill.kvstore.io"):
        for i in range(3):
            io.put(Tier.DISK, 2 + i, i, block)
            wait_all(io, 1)
    assert [d.ok for d in io.poll()] == []
    assert len([r for r in caplog.records if "unavailable" in r.message]) == 1
    stats = io.stats[Tier.DISK]
    assert (stats.failures, stats.skipped) == (1, 2)  # one real try, then skipped
    file_size_limit(resource.RLIM_INFINITY)  # space again
    io.put(Tier.DISK, 5, 5, block)
    assert not wait_all(io, 1)[0].ok  # still within the backoff: skipped
    clock.now += 1.0
    io.put(Tier.DISK, 5, 5, block)
    assert wait_all(io, 1)[0].ok and io.health[Tier.DISK].up


def test_health_backoff_doubles_and_resets():
    clock = FakeClock()
    health, stats = StoreHealth(Tier.REMOTE, clock, backoff_s=1.0, max_backoff_s=3.0), TierStats()
    health.failed(RuntimeError("x"), stats)
    assert not health.allow()
    clock.now = 1.0
    assert health.allow() and not health.allow()  # one trial per period
    health.failed(RuntimeError("x"), stats)
    clock.now = 2.9
    assert not health.allow()
    clock.now = 3.0
    assert health.allow()
    health.succeeded()
    assert health.up and stats.failures == 1


class BrokenStore(BlockStore):
    tier = Tier.REMOTE

    async def start(self):
        return []

    async def put(self, slot, block_hash, payload):
        raise KeyError("a bug")

    async def get(self, slot, block_hash):
        raise KeyError("a bug")

    async def close(self):
        pass


def test_a_bug_in_a_store_still_finishes_the_operation():
    io = TierIO([BrokenStore()])
    io.start()
    try:
        io.get(Tier.REMOTE, 0, 1)
        done = wait_all(io, 1)
        assert (done[0].ok, done[0].miss) == (False, Miss.UNAVAILABLE)
    finally:
        io.close()
