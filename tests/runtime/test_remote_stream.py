"""``RemoteStream``: the client end of a networked call, fed by hand (no plane): batch reads,
how the stream ends (final chunk, error chunk, failure, gap, timeout, deadline) and when the
remote handler is cancelled rather than forgotten."""

from __future__ import annotations

import asyncio
import time

import pytest

from tokenmill.core.errors import InvalidRequestError
from tokenmill.runtime.inprocess import InProcessRuntime
from tokenmill.runtime.interface import (
    DeadlineExceededError,
    EndpointId,
    InstanceFailedError,
)
from tokenmill.runtime.remote_stream import (
    Canceller,
    RemoteStream,
    encode_payload,
    error_to_chunk,
    payload_decoder,
)
from tokenmill.runtime.wire import StreamChunk


def _stream(inactivity_timeout_s: float = 10.0, deadline: float | None = None):
    """A stream whose canceller records ``"cancel"`` or ``"forget"`` in the returned list."""
    calls: list[str] = []
    stream = RemoteStream(
        "r",
        "i",
        decode=payload_decoder(None),
        inactivity_timeout_s=inactivity_timeout_s,
        deadline=deadline,
    )
    stream.bind_canceller(Canceller(lambda: calls.append("forget"), lambda: calls.append("cancel")))
    return stream, calls


def _chunk(seq: int, item=None, final: bool = False) -> StreamChunk:
    payload = b"" if final else encode_payload(item)
    return StreamChunk(request_id="r", seq=seq, payload=payload, final=final)


async def test_next_batch_returns_everything_ready_in_order_and_mixes_with_anext():
    stream, calls = _stream()
    for seq in range(4):
        stream.deliver(_chunk(seq, f"t{seq}"))
    stream.keepalive()
    assert await stream.__anext__() == "t0"
    assert await stream.next_batch() == ["t1", "t2", "t3"]
    stream.deliver(_chunk(4, "t4"))
    stream.deliver(_chunk(5, final=True))
    assert await stream.next_batch() == ["t4"]
    with pytest.raises(StopAsyncIteration):
        await stream.next_batch()
    with pytest.raises(StopAsyncIteration):
        await stream.__anext__()
    assert calls == ["forget"]  # the remote side ended on its own


async def test_next_batch_waits_past_keepalives_and_never_returns_empty():
    stream, _ = _stream()
    stream.keepalive()
    loop = asyncio.get_running_loop()
    loop.call_soon(stream.keepalive)
    loop.call_soon(lambda: loop.call_soon(stream.deliver, _chunk(0, "late")))
    assert await stream.next_batch() == ["late"]


async def test_error_chunk_after_items_returns_items_then_raises_typed():
    stream, calls = _stream()
    stream.deliver(_chunk(0, "a"))
    stream.deliver(_chunk(1, "b"))
    stream.deliver(error_to_chunk("r", 2, InvalidRequestError("odd prompt")))
    assert await stream.next_batch() == ["a", "b"]
    with pytest.raises(InvalidRequestError, match="odd prompt"):
        await stream.next_batch()
    with pytest.raises(StopAsyncIteration):
        await stream.next_batch()
    assert calls == ["forget"]


async def test_failure_after_items_returns_items_then_raises_and_cancels_remote():
    stream, calls = _stream()
    stream.deliver(_chunk(0, "a"))
    stream.fail(InstanceFailedError("connection lost"))
    stream.deliver(_chunk(1, "after the failure"))
    assert await stream.next_batch() == ["a"]
    assert calls == ["forget", "cancel"]
    with pytest.raises(InstanceFailedError, match="connection lost"):
        await stream.next_batch()
    with pytest.raises(StopAsyncIteration):
        await stream.__anext__()


async def test_sequence_gap_ends_the_stream_after_the_items_before_it():
    stream, calls = _stream()
    stream.deliver(_chunk(0, "a"))
    stream.deliver(_chunk(2, "c"))
    assert await stream.next_batch() == ["a"]
    with pytest.raises(InstanceFailedError, match="chunk 2 of r, expected 1"):
        await stream.next_batch()
    assert calls == ["forget", "cancel"]


async def test_inactivity_timeout_fails_the_stream():
    stream, calls = _stream(inactivity_timeout_s=0.05)
    with pytest.raises(InstanceFailedError, match="no response"):
        await stream.next_batch()
    assert calls == ["forget", "cancel"]


async def test_deadline_fails_the_stream_with_deadline_exceeded():
    stream, calls = _stream(inactivity_timeout_s=60.0, deadline=time.monotonic() + 0.05)
    with pytest.raises(DeadlineExceededError):
        await stream.__anext__()
    assert calls == ["forget", "cancel"]


async def test_cancelling_a_waiting_reader_cancels_the_remote_handler():
    stream, calls = _stream()
    reader = asyncio.create_task(stream.next_batch())
    await asyncio.sleep(0)
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    assert calls == ["forget", "cancel"]
    with pytest.raises(StopAsyncIteration):
        await stream.next_batch()


async def test_close_before_the_end_cancels_and_later_reads_stop():
    stream, calls = _stream()
    stream.deliver(_chunk(0, "a"))
    await stream.aclose()
    await stream.aclose()
    assert calls == ["forget", "cancel"]
    with pytest.raises(StopAsyncIteration):
        await stream.next_batch()


async def test_opener_failure_surfaces_on_the_first_read_then_the_stream_is_over():
    stream, _ = _stream()

    async def opener():
        raise InstanceFailedError("no route")

    stream.set_opener(opener)
    with pytest.raises(InstanceFailedError, match="no route"):
        await stream.next_batch()
    with pytest.raises(StopAsyncIteration):
        await stream.next_batch()


async def test_in_process_next_batch_returns_one_item_per_call():
    runtime = InProcessRuntime()
    ep = EndpointId("ns", "c", "e")

    async def handler(request, ctx):
        for i in range(3):
            yield i

    await runtime.serve_endpoint(ep, handler)
    stream = runtime.client(ep).generate(None, "r")
    assert [await stream.next_batch() for _ in range(3)] == [[0], [1], [2]]
    with pytest.raises(StopAsyncIteration):
        await stream.next_batch()
