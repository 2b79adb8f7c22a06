"""The shared remote tier on a real Redis server and a real NATS JetStream object store:
round trips, a probe of what other workers stored, corrupted values as misses, and an
outage that is skipped and then recovered from."""

from __future__ import annotations

import time

import numpy as np
import pytest

from tokenmill.core.events import Tier
from tokenmill.kvstore import record
from tokenmill.kvstore.io import TierIO
from tokenmill.kvstore.record import Miss
from tokenmill.kvstore.remote import NatsObjectStore, RedisStore, block_key

BLOCK = 300_000  # several NATS object chunks
FP = record.layout_fingerprint("m", "bfloat16", 16, (30, 2, 16, 3, 64))


class FakeClock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def data(seed: int) -> memoryview:
    return memoryview(np.random.default_rng(seed).integers(0, 256, BLOCK, dtype=np.uint8))


def wait_one(io: TierIO):
    done = io.wait(15.0)
    assert len(done) == 1
    return done[0]


def make_store(kind: str, server):
    if kind == "redis":
        return RedisStore(server.url, BLOCK, FP, timeout_s=2.0)
    return NatsObjectStore(server.url, BLOCK, FP, bucket="kv_test", timeout_s=2.0)


@pytest.fixture(params=["redis", "nats"])
def remote(request):
    fixture = "redis_server" if request.param == "redis" else "nats_server"
    server = request.getfixturevalue(fixture)
    clock = FakeClock()
    io = TierIO([make_store(request.param, server)], clock=clock)
    io.start()
    yield request.param, server, io, clock
    io.close()


def test_round_trip_probe_and_isolation_between_layouts(remote):
    kind, server, io, _ = remote
    for h in (1, 2, 3):
        io.put(Tier.REMOTE, 0, h, data(h))
        assert wait_one(io).ok
    io.get(Tier.REMOTE, 0, 2)
    got = wait_one(io)
    assert got.ok and bytes(got.payload) == bytes(data(2))
    io.get(Tier.REMOTE, 0, 9)
    assert wait_one(io).miss is Miss.ABSENT
    assert io.count_present(Tier.REMOTE, [1, 2, 9, 3], 5.0) == 2
    # a second worker of the same model sees the blocks; another layout does not
    other = TierIO([make_store(kind, server)])
    other.start()
    try:
        other.get(Tier.REMOTE, 7, 3)
        assert bytes(wait_one(other).payload) == bytes(data(3))
        other.stores[Tier.REMOTE].fingerprint = FP + 1
        assert other.count_present(Tier.REMOTE, [1], 5.0) == 0
    finally:
        other.close()


def test_corrupted_value_is_a_checksum_miss(redis_server):
    import redis

    io = TierIO([make_store("redis", redis_server)])
    io.start()
    try:
        io.put(Tier.REMOTE, 0, 5, data(5))
        assert wait_one(io).ok
        client = redis.Redis.from_url(redis_server.url)
        value = bytearray(client.get(block_key(FP, 5)))
        value[-1] ^= 1
        client.set(block_key(FP, 5), bytes(value))
        client.close()
        io.get(Tier.REMOTE, 0, 5)
        assert wait_one(io).miss is Miss.CHECKSUM
        assert io.stats[Tier.REMOTE].misses == {"checksum": 1}
    finally:
        io.close()


def test_outage_is_skipped_then_the_store_is_used_again(remote):
    kind, server, io, clock = remote
    if kind == "redis":
        server.stop()
    else:
        server._kill()  # the process only: start() brings it back on the same port and store
    io.put(Tier.REMOTE, 0, 1, data(1))
    first = wait_one(io)
    assert (first.ok, first.miss) == (False, Miss.UNAVAILABLE)
    io.get(Tier.REMOTE, 0, 1)
    assert wait_one(io).miss is Miss.UNAVAILABLE  # skipped while down
    assert io.stats[Tier.REMOTE].failures == 1 and io.stats[Tier.REMOTE].skipped == 1
    server.start()
    clock.now += 1.0
    deadline = time.monotonic() + 15.0
    while time.monotonic() < deadline:  # the client reconnects in the background (no event)
        io.put(Tier.REMOTE, 0, 1, data(1))
        if wait_one(io).ok:
            break
        clock.now += 30.0
        time.sleep(0.05)
    else:
        pytest.fail("the store was not used again after it came back")
    io.get(Tier.REMOTE, 0, 1)
    assert wait_one(io).ok and io.health[Tier.REMOTE].up


def test_a_store_down_at_start_is_retried_and_used_when_it_comes_up(nats_server):
    nats_server._kill()  # down before the tier starts
    clock = FakeClock()
    io = TierIO([make_store("nats", nats_server)], clock=clock)
    try:
        assert io.start() == {Tier.REMOTE: []}
        assert not io.health[Tier.REMOTE].up and io.stats[Tier.REMOTE].failures == 1
        nats_server.start()
        clock.now += 1.0
        io.put(Tier.REMOTE, 0, 1, data(1))
        assert wait_one(io).ok and io.health[Tier.REMOTE].up
    finally:
        io.close()
