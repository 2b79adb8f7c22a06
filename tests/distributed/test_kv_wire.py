"""KV events and router state on a real NATS server: a worker's ``KvPublisher`` feeding a
router's ``KvEventFeed`` (live events, gap replay, chunked dumps, restarts), and two router
replicas sharing in-flight state (``ReplicaSync``) so they spread load instead of herding."""

from __future__ import annotations

import asyncio
import time

import msgspec
import pytest

from tokenmill.core.events import Removed, Stored, StoredBlock
from tokenmill.core.request import EngineRequest
from tokenmill.routing.kv_events import KvEventFeed
from tokenmill.routing.kv_policy import KvRouterPolicy
from tokenmill.routing.replicas import ReplicaSync
from tokenmill.runtime.interface import EndpointId
from tokenmill.runtime.kv_wire import KV_REPLAY_ENDPOINT, KvReplayRequest, replay_instance_id
from tokenmill.runtime.nats_runtime import NatsRuntime, NatsRuntimeConfig
from tokenmill.runtime.nats_server import NatsServer, NatsServerConfig
from tokenmill.worker.kv_publisher import KvPublisher, KvPublisherConfig

NS, COMPONENT = "tokenmill", "backend"
GENERATE = EndpointId(NS, COMPONENT, "generate")


async def until(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def idle_handler(request, ctx):
    yield request


def stored_chain(first: int, count: int) -> Stored:
    parent = None if first == 0 else first - 1 + 10_000
    return Stored(parent, [StoredBlock(10_000 + i, i) for i in range(first, first + count)])


async def serve_worker(runtime: NatsRuntime, instance_id: str, publisher: KvPublisher):
    """The endpoints a feed needs from a worker: ``generate`` (discovery) and ``kv_replay``."""
    served = await runtime.serve_endpoint(GENERATE, idle_handler, instance_id=instance_id)
    publisher.bind(instance_id)
    return served, await serve_replay(runtime, instance_id, publisher)


async def serve_replay(runtime: NatsRuntime, instance_id: str, publisher: KvPublisher):
    replay = EndpointId(NS, COMPONENT, KV_REPLAY_ENDPOINT)
    return await runtime.serve_endpoint(
        replay,
        publisher.replay,
        instance_id=replay_instance_id(instance_id),
        request_type=KvReplayRequest,
    )


async def make_feed(runtime: NatsRuntime) -> tuple[KvEventFeed, KvRouterPolicy]:
    policy = KvRouterPolicy.create("kv", 16, events=True)
    feed = KvEventFeed(runtime, runtime.client(GENERATE), policy)
    await feed.start()
    return feed, policy


def indexed(policy: KvRouterPolicy, instance_id: str) -> int:
    wid = policy.known_worker_id(instance_id)
    return 0 if wid is None else policy.router.index.num_blocks(wid)


@pytest.fixture
def small_payload_nats():
    """A server whose max payload (8 KiB) a naive dump of 2,000 blocks would exceed."""
    server = NatsServer(NatsServerConfig(max_payload=8192)).start()
    yield server
    server.stop()


async def test_live_events_gap_replay_and_restart(nats_server):
    worker_rt = await NatsRuntime.connect(nats_server.url)
    router_rt = await NatsRuntime.connect(nats_server.url)
    publisher = KvPublisher(worker_rt, NS, COMPONENT)
    try:
        _, replay = await serve_worker(worker_rt, "w1", publisher)
        feed, policy = await make_feed(router_rt)
        await until(lambda: feed.states.get("w1") and feed.states["w1"].epoch is not None)
        publisher.record(stored_chain(0, 4))
        await until(lambda: indexed(policy, "w1") == 4)
        # Lose one batch on the wire: the next event reveals the gap, the feed replays it.
        real_publish = worker_rt.publish
        dropped = []

        async def drop_once(*args):
            if not dropped:
                dropped.append(args)
                return
            await real_publish(*args)

        worker_rt.publish = drop_once
        publisher.record(stored_chain(4, 3))  # lost
        await until(lambda: bool(dropped))
        publisher.record(Removed([10_000]))
        await until(lambda: feed.states["w1"].next_event_id == publisher.next_event_id)
        assert feed.num_replays == 1
        assert indexed(policy, "w1") == 4 + 3 - 1
        publisher.check_integrity()
        # The worker restarts (same instance id, new epoch): the feed takes a full dump.
        worker_rt.publish = real_publish
        restarted = KvPublisher(worker_rt, NS, COMPONENT)
        await replay.stop()
        await serve_replay(worker_rt, "w1", restarted)
        restarted.bind("w1")
        restarted.record(stored_chain(0, 2))
        dumps = feed.num_dumps
        await until(lambda: feed.num_dumps == dumps + 1)
        await until(lambda: indexed(policy, "w1") == 2)
        await feed.stop()
    finally:
        await worker_rt.shutdown()
        await router_rt.shutdown()


async def test_full_dump_in_chunks_that_fit_the_nats_payload_limit(small_payload_nats):
    config = NatsRuntimeConfig(request_plane="nats")  # the dump crosses NATS itself
    worker_rt = await NatsRuntime.connect(small_payload_nats.url, config)
    router_rt = await NatsRuntime.connect(small_payload_nats.url, config)
    publisher = KvPublisher(
        worker_rt, NS, COMPONENT, KvPublisherConfig(ring_size=16, max_chunk_bytes=4096)
    )
    try:
        publisher.bind("w1")
        for first in range(0, 2000, 100):  # before any router listens: all in the dump
            publisher.record(stored_chain(first, 100))
        publisher.check_integrity()
        chunks = publisher.dump()
        sizes = [len(msgspec.msgpack.encode(c)) for c in chunks]
        assert len(chunks) > 10 and max(sizes) <= 4096
        await serve_worker(worker_rt, "w1", publisher)
        feed, policy = await make_feed(router_rt)
        await until(lambda: indexed(policy, "w1") == 2000)
        assert feed.num_dumps == 1
        await feed.stop()
    finally:
        await worker_rt.shutdown()
        await router_rt.shutdown()


async def test_a_worker_without_kv_events_turns_on_the_approximate_index(nats_server, caplog):
    worker_rt = await NatsRuntime.connect(nats_server.url)
    router_rt = await NatsRuntime.connect(nats_server.url)
    try:
        quiet = await worker_rt.serve_endpoint(
            GENERATE, idle_handler, instance_id="quiet", metadata={"kv_events": "0"}
        )
        feed, policy = await make_feed(router_rt)
        assert policy.router.approx is None
        await until(lambda: policy.router.approx is not None)
        assert "APPROXIMATE" in caplog.text and "quiet" in caplog.text
        # The silence watch: routed requests, no event within silence_s -> the same switch.
        await quiet.stop()
        silent_feed, silent_policy = await make_feed(router_rt)
        silent_feed.silence_s = 0.0
        silent_feed.silence.routed("mute")
        silent_feed.silence.check()
        assert silent_policy.router.approx is not None
        await feed.stop()
        await silent_feed.stop()
    finally:
        await worker_rt.shutdown()
        await router_rt.shutdown()


def request(i: int) -> EngineRequest:
    return EngineRequest(request_id=f"r{i}", prompt_token_ids=[i * 1000 + t for t in range(64)])


async def _route_alternately(policies: list[KvRouterPolicy], syncs: list[ReplicaSync] | None):
    """Eight requests, alternately through each replica, none finishing: the worker each
    one went to."""
    chosen = []
    for i in range(8):
        policy = policies[i % 2]
        chosen.append(await policy.select(request(i), ["w1", "w2"]))
        if syncs is not None:  # the other replica has heard of it before the next routing
            other = syncs[(i + 1) % 2]
            await until(lambda o=other, n=i // 2 + 1: o.num_applied >= n)
    return chosen


async def test_two_router_replicas_spread_load_instead_of_herding(nats_server):
    runtimes = [await NatsRuntime.connect(nats_server.url) for _ in range(2)]
    try:
        lone = [KvRouterPolicy.create("least-loaded", 16) for _ in range(2)]
        herded = await _route_alternately(lone, None)
        shared = [KvRouterPolicy.create("least-loaded", 16) for _ in range(2)]
        for p in shared:
            p.worker_id("w1"), p.worker_id("w2")
        syncs = [ReplicaSync(rt, NS, COMPONENT, p) for rt, p in zip(runtimes, shared, strict=True)]
        for s in syncs:
            await s.start()
        await until(lambda: all(s.has_peers() for s in syncs))  # they heard each other
        spread = await _route_alternately(shared, syncs)
        for s in syncs:
            await s.stop()
    finally:
        for rt in runtimes:
            await rt.shutdown()
    # Without sharing, each replica sees only its own half: both send their k-th request to
    # the same worker. With sharing, the eight in-flight requests split 4/4.
    assert all(herded[i] == herded[i + 1] for i in range(0, 8, 2))
    assert sorted(spread.count(w) for w in ("w1", "w2")) == [4, 4]
    assert all(spread[i] != spread[i + 1] for i in range(0, 8, 2))


async def test_worker_puts_its_tokenizer_blob_back_after_nats_loses_its_store(
    nats_server, monkeypatch
):
    from tokenmill.launch import worker_service

    monkeypatch.setattr(worker_service, "BLOB_CHECK_S", 0.05)
    runtime = await NatsRuntime.connect(nats_server.url)
    keeper = None
    try:
        await runtime.put_blob("tokenizer-x", b"blob")
        keeper = asyncio.create_task(worker_service.keep_blob(runtime, "tokenizer-x", b"blob"))
        await asyncio.to_thread(nats_server.restart, True)  # store wiped
        await runtime.wait_reconnected(1, 30)

        async def fetched() -> bytes:
            while True:
                try:
                    return await runtime.get_blob("tokenizer-x")
                except Exception:
                    await asyncio.sleep(0.05)

        assert await asyncio.wait_for(fetched(), 30) == b"blob"
    finally:
        if keeper is not None:
            keeper.cancel()
        await runtime.shutdown()
