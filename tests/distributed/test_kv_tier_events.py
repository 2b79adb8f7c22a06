"""A worker's lower-tier KV events reach a router over a real NATS server with their tier:
``KvPublisher.sink(data, tier)`` numbers them with the device events, and the router's index
keeps them apart (``lower_overlap``), so host-tier blocks count for the worker at a discount."""

from __future__ import annotations

import asyncio
import time

from tokenmill.core.events import Removed, Stored, StoredBlock, Tier
from tokenmill.routing.kv_events import KvEventFeed
from tokenmill.routing.kv_policy import KvRouterPolicy
from tokenmill.runtime.interface import EndpointId
from tokenmill.runtime.kv_wire import KV_REPLAY_ENDPOINT, KvReplayRequest, replay_instance_id
from tokenmill.runtime.nats_runtime import NatsRuntime
from tokenmill.worker.kv_publisher import KvPublisher

NS, COMPONENT = "tokenmill", "backend"
GENERATE = EndpointId(NS, COMPONENT, "generate")


async def until(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def idle_handler(request, ctx):
    yield request


async def test_tier_events_reach_the_router_index_with_their_tier(nats_server):
    worker_rt = await NatsRuntime.connect(nats_server.url)
    router_rt = await NatsRuntime.connect(nats_server.url)
    publisher = KvPublisher(worker_rt, NS, COMPONENT)
    try:
        await worker_rt.serve_endpoint(GENERATE, idle_handler, instance_id="w1")
        publisher.bind("w1")
        await worker_rt.serve_endpoint(
            EndpointId(NS, COMPONENT, KV_REPLAY_ENDPOINT),
            publisher.replay,
            instance_id=replay_instance_id("w1"),
            request_type=KvReplayRequest,
        )
        policy = KvRouterPolicy.create("kv", 16, events=True)
        feed = KvEventFeed(router_rt, router_rt.client(GENERATE), policy)
        await feed.start()
        await until(lambda: feed.states.get("w1") and feed.states["w1"].epoch is not None)
        publisher.sink(Stored(None, [StoredBlock(1, 1), StoredBlock(2, 2)]))  # device
        publisher.sink(Stored(None, [StoredBlock(3, 0), StoredBlock(4, 0)]), Tier.HOST)
        publisher.sink(Removed([4]), Tier.HOST)
        await until(lambda: feed.states["w1"].next_event_id == 3)
        index, wid = policy.router.index, policy.known_worker_id("w1")
        assert (index.num_blocks(wid), index.num_blocks(wid, Tier.HOST)) == (2, 1)
        assert index.find_matches([1, 2, 3], Tier.DEVICE) == {wid: 2}
        assert index.find_matches_any_tier([1, 2, 3]) == {wid: 3}
        await feed.stop()
    finally:
        await worker_rt.shutdown()
        await router_rt.shutdown()
