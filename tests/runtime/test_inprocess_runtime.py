"""The in-process runtime keeps the interface's contracts: discovery and watch, streaming,
cancellation reaching the handler, deadlines, the event plane."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
from runtime_handlers import Recorder

from tokenmill.runtime.inprocess import InProcessRuntime
from tokenmill.runtime.interface import (
    DeadlineExceededError,
    EndpointId,
    NoInstancesError,
)
from tokenmill.runtime.wire import (
    WIRE_VERSION,
    InstanceInfo,
    StreamChunk,
    WorkerLoad,
    check_version,
)

EP = EndpointId("ns", "backend", "generate")


async def test_stream_round_trip_and_round_robin():
    rt = InProcessRuntime()
    a, b = Recorder(), Recorder()
    await rt.serve_endpoint(EP, a, instance_id="a")
    await rt.serve_endpoint(EP, b, instance_id="b")
    client = rt.client(EP)
    assert [i.instance_id for i in client.instances()] == ["a", "b"]
    first = [x async for x in client.generate("r", "id1")]
    second = [x async for x in client.generate("s", "id2")]
    assert first == ["r-0", "r-1", "r-2"] and second == ["s-0", "s-1", "s-2"]
    assert a.ended == ["done"] and b.ended == ["done"]
    targeted = client.generate("t", "id3", instance_id="b")
    assert targeted.instance_id == "b"
    assert [x async for x in targeted] == ["t-0", "t-1", "t-2"]
    assert b.contexts[-1].request_id == "id3"


async def test_no_instances_and_gone_instance():
    rt = InProcessRuntime()
    client = rt.client(EP)
    with pytest.raises(NoInstancesError):
        client.generate("x", "id")
    served = await rt.serve_endpoint(EP, Recorder(), instance_id="a")
    await served.stop()
    with pytest.raises(NoInstancesError):
        client.generate("x", "id", instance_id="a")


async def test_close_stream_cancels_handler():
    rt = InProcessRuntime()
    handler = Recorder(count=10)
    await rt.serve_endpoint(EP, handler)
    stream = rt.client(EP).generate("r", "id")
    assert await stream.__anext__() == "r-0"
    await stream.aclose()
    assert handler.ended == ["cancelled"]
    await stream.aclose()  # idempotent


async def test_cancelling_the_consumer_task_cancels_handler():
    rt = InProcessRuntime()
    handler = Recorder(count=5, gated=True)
    await rt.serve_endpoint(EP, handler)

    async def consume():
        async for _ in rt.client(EP).generate("r", "id"):
            pass

    task = asyncio.create_task(consume())
    await asyncio.sleep(0)  # let it reach the handler's wait
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert handler.ended == ["cancelled"]


async def test_deadline_stops_handler():
    rt = InProcessRuntime()
    handler = Recorder(count=5, gated=True)
    await rt.serve_endpoint(EP, handler)
    stream = rt.client(EP).generate("r", "id", deadline_s=0.05)
    assert handler.contexts == []
    with pytest.raises(DeadlineExceededError):
        await stream.__anext__()
    assert handler.ended == ["cancelled"]
    assert handler.contexts[0].deadline is not None


async def test_watch_sees_additions_and_removals_in_order():
    rt = InProcessRuntime()
    await rt.serve_endpoint(EP, Recorder(), instance_id="a")
    client = rt.client(EP)
    watch = client.watch()
    first = await watch.__anext__()
    assert (first.kind, first.instance.instance_id) == ("added", "a")
    served_b = await rt.serve_endpoint(EP, Recorder(), instance_id="b")
    await served_b.stop()
    events = [await watch.__anext__(), await watch.__anext__()]
    assert [(e.kind, e.instance.instance_id) for e in events] == [("added", "b"), ("removed", "b")]
    await watch.aclose()


async def test_wait_for_instances_returns_on_registration():
    rt = InProcessRuntime()
    client = rt.client(EP)
    waiter = asyncio.create_task(client.wait_for_instances(timeout_s=5))
    await asyncio.sleep(0)
    assert not waiter.done()
    await rt.serve_endpoint(EP, Recorder(), instance_id="a")
    assert [i.instance_id for i in await waiter] == ["a"]
    with pytest.raises(TimeoutError):
        await rt.client(EndpointId("ns", "other", "x")).wait_for_instances(timeout_s=0.01)


async def test_event_plane_delivers_after_subscribe_and_drops_oldest_when_full():
    rt = InProcessRuntime()
    sub = rt.subscribe("ns", "backend", "load")
    other = rt.subscribe("ns", "backend", "kv")
    await rt.publish("ns", "backend", "load", WorkerLoad(instance_id="a", kv_usage=0.5))
    assert (await sub.__anext__()).kv_usage == 0.5
    for i in range(1030):
        await rt.publish("ns", "backend", "load", i)
    assert await sub.__anext__() == 6  # 1024 kept: 6..1029
    assert other.buffer.maxlen == 1024 and len(other.buffer) == 0  # other topics see nothing
    await sub.aclose()
    await other.aclose()


async def test_shutdown_deregisters_everything():
    rt = InProcessRuntime()
    await rt.serve_endpoint(EP, Recorder(), instance_id="a")
    await rt.shutdown()
    assert rt.client(EP).instances() == []


def test_wire_structs_round_trip_with_version():
    chunk = StreamChunk(request_id="r", seq=3, payload=b"\x00\x01", final=True)
    data = msgspec.msgpack.encode(chunk)
    back = msgspec.msgpack.decode(data, type=StreamChunk)
    assert back == chunk and back.version == WIRE_VERSION
    info = InstanceInfo(namespace="n", component="c", endpoint="e", instance_id="i")
    assert msgspec.json.decode(msgspec.json.encode(info), type=InstanceInfo) == info
    check_version(WIRE_VERSION)
    with pytest.raises(ValueError):
        check_version(WIRE_VERSION + 1)


def test_endpoint_id_parse():
    assert EndpointId.parse("a.b.c") == EndpointId("a", "b", "c")
    assert EndpointId.parse("a/b/c").path == "a.b.c"
    with pytest.raises(ValueError):
        EndpointId.parse("a.b")
