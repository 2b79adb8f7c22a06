"""The NATS runtime keeps the in-process runtime's contracts over a real nats-server, on both
request planes: discovery and watch, streaming, cancellation and deadlines reaching the
remote handler, typed errors, the event plane."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
from runtime_handlers import Recorder

from tokenmill.core.errors import DuplicateRequestError, InternalError, InvalidRequestError
from tokenmill.runtime.event_plane import SUBSCRIPTION_BUFFER
from tokenmill.runtime.interface import (
    DeadlineExceededError,
    EndpointId,
    InstanceFailedError,
    NoInstancesError,
)
from tokenmill.runtime.wire import WorkerLoad

EP = EndpointId("ns", "backend", "generate")
PLANES = ["tcp", "nats"]


class Req(msgspec.Struct):
    text: str
    n: int


async def _serve_one(make_runtime, handler, **server_config):
    """``(server, client)``: ``handler`` served as instance "a" by a runtime made with
    ``server_config``, and a client of a second runtime that already sees it."""
    server, caller = await make_runtime(**server_config), await make_runtime()
    await server.serve_endpoint(EP, handler, instance_id="a")
    client = caller.client(EP)
    await client.wait_for_instances(timeout_s=5)
    return server, client


async def test_discovery_watch_sees_additions_and_removals(make_runtime):
    server, other = await make_runtime(), await make_runtime()
    client = other.client(EP)
    a = await server.serve_endpoint(EP, Recorder(), instance_id="a", metadata={"model": "m"})
    assert [i.instance_id for i in await client.wait_for_instances(timeout_s=5)] == ["a"]
    assert client.instances()[0].metadata == {"model": "m"}
    assert client.instances()[0].address.startswith("tcp://127.0.0.1:")
    watch = client.watch()
    first = await watch.__anext__()
    assert (first.kind, first.instance.instance_id) == ("added", "a")
    b = await server.serve_endpoint(EP, Recorder(), instance_id="b")
    await b.stop()
    await a.stop()
    events = [await watch.__anext__() for _ in range(3)]
    assert [(e.kind, e.instance.instance_id) for e in events] == [
        ("added", "b"),
        ("removed", "b"),
        ("removed", "a"),
    ]
    await watch.aclose()
    assert client.instances() == []


async def test_wait_for_instances_times_out_and_generate_without_instances(make_runtime):
    rt = await make_runtime()
    client = rt.client(EndpointId("ns", "nobody", "x"))
    with pytest.raises(TimeoutError):
        await client.wait_for_instances(timeout_s=0.2)
    with pytest.raises(NoInstancesError):
        await client.generate("x", "id").__anext__()


@pytest.mark.parametrize("plane", PLANES)
async def test_typed_stream_round_trip_and_round_robin(make_runtime, plane):
    server, caller = await make_runtime(request_plane=plane), await make_runtime()

    async def handler(req: Req, ctx):
        for i in range(req.n):
            yield {"i": i, "text": req.text, "rid": ctx.request_id, "iid": ctx.instance_id}

    await server.serve_endpoint(EP, handler, instance_id="a", request_type=Req)
    await server.serve_endpoint(EP, handler, instance_id="b", request_type=Req)
    client = caller.client(EP)
    await client.wait_for_instances(timeout_s=5)
    while len(client.instances()) < 2:
        await client.wait_for_instances(timeout_s=5)
        await asyncio.sleep(0.01)
    first = [x async for x in client.generate(Req("hi", 3), "r1")]
    assert first == [{"i": i, "text": "hi", "rid": "r1", "iid": "a"} for i in range(3)]
    second = [x["iid"] async for x in client.generate(Req("hi", 2), "r2")]
    assert second == ["b", "b"]
    targeted = client.generate(Req("t", 1), "r3", instance_id="b")
    assert targeted.instance_id == "b"
    assert [x["iid"] async for x in targeted] == ["b"]


@pytest.mark.parametrize("plane", PLANES)
async def test_next_batch_reads_the_whole_stream_in_order(make_runtime, plane):
    handler = Recorder(count=50)
    server, client = await _serve_one(make_runtime, handler, request_plane=plane)
    stream = client.generate("r", "id1")
    batches = [await stream.next_batch()]
    await asyncio.wait_for(handler.finished.wait(), 5)
    with pytest.raises(StopAsyncIteration):
        while True:
            batches.append(await stream.next_batch())
    assert all(batches)
    assert [x for batch in batches for x in batch] == [f"r-{i}" for i in range(50)]


@pytest.mark.parametrize("plane", PLANES)
async def test_close_stream_cancels_remote_handler(make_runtime, plane):
    handler = Recorder(count=100, gated=True)
    server, client = await _serve_one(make_runtime, handler, request_plane=plane)
    stream = client.generate("r", "id1")
    handler.step.set()
    assert await stream.__anext__() == "r-0"
    await stream.aclose()
    await asyncio.wait_for(handler.finished.wait(), 5)
    assert handler.ended == ["cancelled"]
    await stream.aclose()  # idempotent


@pytest.mark.parametrize("plane", PLANES)
async def test_cancelling_the_consumer_task_cancels_remote_handler(make_runtime, plane):
    handler = Recorder(count=5, gated=True)
    server, client = await _serve_one(make_runtime, handler, request_plane=plane)
    started = asyncio.Event()

    async def consume():
        async for _ in client.generate("r", "id1"):
            started.set()

    task = asyncio.create_task(consume())
    handler.step.set()
    await asyncio.wait_for(started.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(handler.finished.wait(), 5)
    assert handler.ended == ["cancelled"]


@pytest.mark.parametrize("plane", PLANES)
async def test_deadline_stops_remote_handler(make_runtime, plane):
    handler = Recorder(count=5, gated=True)
    server, client = await _serve_one(make_runtime, handler, request_plane=plane)
    stream = client.generate("r", "id1", deadline_s=0.3)
    with pytest.raises(DeadlineExceededError):
        await stream.__anext__()
    await asyncio.wait_for(handler.finished.wait(), 5)
    assert handler.ended == ["cancelled"]
    assert handler.contexts[0].deadline is not None


@pytest.mark.parametrize("plane", PLANES)
async def test_handler_errors_come_back_typed(make_runtime, plane):

    async def handler(req, ctx):
        yield "first"
        if req == "bad":
            raise InvalidRequestError("prompt too odd")
        raise KeyError("boom")

    server, client = await _serve_one(make_runtime, handler, request_plane=plane)
    stream = client.generate("bad", "id1")
    assert await stream.__anext__() == "first"
    with pytest.raises(InvalidRequestError, match="prompt too odd"):
        await stream.__anext__()
    with pytest.raises(InternalError) as info:
        [x async for x in client.generate("other", "id2")]
    assert str(info.value) == "internal error: KeyError"  # the class only, never its text


async def test_duplicate_request_id_on_one_connection_is_rejected(make_runtime):
    handler = Recorder(count=3, gated=True)
    server, client = await _serve_one(make_runtime, handler)
    first = client.generate("r", "same")
    handler.step.set()
    assert await first.__anext__() == "r-0"
    with pytest.raises(DuplicateRequestError, match="'same' is already in flight"):
        await client.generate("r", "same").__anext__()
    await first.aclose()


async def test_blobs_round_trip_and_has_blob(make_runtime):
    runtime = await make_runtime()
    assert not await runtime.has_blob("tokenizer-none")
    await runtime.put_blob("tokenizer-y", b"x" * 300_000)
    assert await runtime.has_blob("tokenizer-y")
    assert await runtime.get_blob("tokenizer-y") == b"x" * 300_000
    with pytest.raises(KeyError):
        await runtime.get_blob("tokenizer-none")


async def test_event_plane_pub_sub(make_runtime):
    pub, sub_rt = await make_runtime(), await make_runtime()
    load = sub_rt.subscribe("ns", "backend", "load")
    kv = sub_rt.subscribe("ns", "backend", "kv")
    other = sub_rt.subscribe("ns", "other", "kv")
    for sub in (load, kv, other):
        await sub.ready()
    await pub.publish("ns", "backend", "load", WorkerLoad(instance_id="a", kv_usage=0.5))
    await pub.publish("ns", "backend", "kv", {"event_id": 7})
    assert await asyncio.wait_for(load.__anext__(), 5) == WorkerLoad(instance_id="a", kv_usage=0.5)
    assert await asyncio.wait_for(kv.__anext__(), 5) == {"event_id": 7}
    assert list(other.buffer) == []
    await load.aclose()
    await load.aclose()
    with pytest.raises(StopAsyncIteration):
        await load.__anext__()


@pytest.mark.parametrize("plane", PLANES)
async def test_server_shutdown_mid_stream_fails_the_stream_at_once(make_runtime, plane):
    handler = Recorder(count=5, gated=True)
    server, client = await _serve_one(make_runtime, handler, request_plane=plane)
    stream = client.generate("r", "id1")
    handler.step.set()
    assert await stream.__anext__() == "r-0"
    await server.shutdown()
    await server.shutdown()  # idempotent
    assert handler.ended == ["cancelled"]
    with pytest.raises(InstanceFailedError, match="shut down"):
        await asyncio.wait_for(stream.__anext__(), 2)


async def test_event_plane_slow_subscriber_drops_the_oldest(make_runtime):
    pub, sub_rt = await make_runtime(), await make_runtime()
    sub = sub_rt.subscribe("ns", "backend", "kv")
    await sub.ready()
    for i in range(SUBSCRIPTION_BUFFER + 6):
        await pub.publish("ns", "backend", "kv", i)
    await pub.nc.flush()
    async with asyncio.timeout(5):
        while sub.num_dropped + len(sub.buffer) < SUBSCRIPTION_BUFFER + 6:
            await asyncio.sleep(0.01)
    assert sub.num_dropped == 6
    assert await sub.__anext__() == 6
    await sub.aclose()


async def test_tcp_plane_carries_large_items_intact(make_runtime):
    blobs = [bytes([i]) * size for i, size in enumerate([1, 70_000, 3_000_000, 5])]

    async def handler(req, ctx):
        for blob in blobs:
            yield blob

    server, client = await _serve_one(make_runtime, handler)
    assert [x async for x in client.generate("x", "big")] == blobs
