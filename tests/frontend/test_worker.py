"""The worker over the in-process runtime with the echo engine: streaming, duplicate ids,
abort on close, drain on stop, load on the event plane."""

from __future__ import annotations

import asyncio

import pytest

from tokenmill.core.request import EngineRequest, FinishReason
from tokenmill.core.sampling import SamplingParams
from tokenmill.runtime.inprocess import InProcessRuntime
from tokenmill.runtime.interface import InstanceFailedError
from tokenmill.runtime.wire import LOAD_TOPIC
from tokenmill.worker.echo_engine import EchoConfig, EchoEngine
from tokenmill.worker.worker import DuplicateRequestError, Worker, WorkerConfig


def request(rid: str, max_tokens: int = 4, prompt: list[int] | None = None) -> EngineRequest:
    prompt = prompt if prompt is not None else list(range(10, 50))
    return EngineRequest(
        request_id=rid, prompt_token_ids=prompt, params=SamplingParams(max_tokens=max_tokens)
    )


async def start(delay: float = 0.0, **config) -> tuple[EchoEngine, Worker, InProcessRuntime]:
    runtime = InProcessRuntime()
    engine = EchoEngine(EchoConfig(block_size=16, num_blocks=64, token_delay_s=delay))
    worker = Worker(engine, runtime, WorkerConfig(instance_id="w0", **config))
    await worker.start()
    return engine, worker, runtime


async def test_generate_streams_outputs_and_frees_blocks():
    engine, worker, runtime = await start()
    outs = [o async for o in runtime.client(worker.config.endpoint).generate(request("a"), "a")]
    assert [o.new_token_ids for o in outs] == [[10], [11], [12], [13]]
    assert outs[-1].finish_reason is FinishReason.LENGTH and outs[-1].num_output_tokens == 4
    assert engine.num_used_blocks == 0 and worker.num_active_requests == 0
    engine.check_integrity()
    await worker.stop()


async def test_duplicate_request_id_is_rejected_while_in_flight():
    engine, worker, runtime = await start()
    client = runtime.client(worker.config.endpoint)
    first = client.generate(request("dup", max_tokens=8), "dup")
    assert (await first.__anext__()).new_token_ids == [10]
    with pytest.raises(DuplicateRequestError):
        await client.generate(request("dup"), "dup").__anext__()
    assert len([o async for o in first]) == 7  # the first stream is untouched
    assert len([o async for o in client.generate(request("dup"), "dup")]) == 4  # id free again
    await worker.stop()


async def test_closing_the_stream_aborts_and_frees_blocks():
    engine, worker, runtime = await start()
    stream = runtime.client(worker.config.endpoint).generate(request("a", max_tokens=100), "a")
    await stream.__anext__()
    assert engine.num_used_blocks == 3  # 40 prompt + 1 output tokens
    await stream.aclose()
    assert engine.num_used_blocks == 0 and worker.num_active_requests == 0
    engine.check_integrity()
    await worker.stop()


async def test_stop_drains_in_flight_then_evicts_the_rest_for_migration():
    engine, worker, runtime = await start(delay=0.001)
    client = runtime.client(worker.config.endpoint)
    short = client.generate(request("short", max_tokens=3), "short")
    long = client.generate(request("long", max_tokens=100000), "long")

    async def collect(stream):
        outs = []
        try:
            async for o in stream:
                outs.append(o)
        except InstanceFailedError as exc:  # evicted: a frontend migrates it
            outs.append(exc)
        return outs

    tasks = [asyncio.create_task(collect(short)), asyncio.create_task(collect(long))]
    await asyncio.sleep(0.01)  # both running
    assert await worker.stop(drain_timeout_s=0.05) == 1  # "long" evicted
    short_outs, long_outs = await asyncio.gather(*tasks)
    assert short_outs[-1].finish_reason is FinishReason.LENGTH
    assert isinstance(long_outs[-1], InstanceFailedError)
    assert all(o.finish_reason is None for o in long_outs[:-1])
    assert client.instances() == []
    assert engine.num_used_blocks == 0
    engine.check_integrity()


async def test_load_is_published_on_the_event_plane():
    runtime = InProcessRuntime()
    sub = runtime.subscribe("tokenmill", "backend", LOAD_TOPIC)
    engine = EchoEngine(EchoConfig(num_blocks=10))
    worker = Worker(engine, runtime, WorkerConfig(instance_id="w0", load_interval_s=0.01))
    await worker.start()
    load = await asyncio.wait_for(sub.__anext__(), 5)
    assert (load.instance_id, load.num_total_blocks, load.kv_usage) == ("w0", 10, 0.0)
    await sub.aclose()
    await worker.stop()


async def test_unhealthy_engine_is_refused():
    engine, worker, runtime = await start()
    engine.shutdown()
    from tokenmill.core.errors import EngineDeadError

    with pytest.raises(EngineDeadError):
        await runtime.client(worker.config.endpoint).generate(request("a"), "a").__anext__()
    await worker.stop()
