"""A worker's registration carries its role (validated; ``both`` by default) and the router
side reads it; the load it publishes carries step time and waiting prefill tokens, and a
load message from an older worker (without them) still decodes."""

from __future__ import annotations

import msgspec
import pytest

from tokenmill.routing.models import WORKER_ROLES, instance_role
from tokenmill.runtime.inprocess import InProcessRuntime
from tokenmill.runtime.wire import InstanceInfo, WorkerLoad
from tokenmill.worker.echo_engine import EchoConfig, EchoEngine
from tokenmill.worker.protocol import load_from_stats
from tokenmill.worker.worker import Worker, WorkerConfig


def info(**metadata: str) -> InstanceInfo:
    return InstanceInfo(
        namespace="ns", component="backend", endpoint="generate", instance_id="w", metadata=metadata
    )


def test_an_instance_without_a_role_is_aggregated():
    assert instance_role(info(model="m")) == "both"
    assert [instance_role(info(role=role)) for role in WORKER_ROLES] == list(WORKER_ROLES)


def test_an_unknown_role_is_refused_on_both_sides():
    with pytest.raises(ValueError, match="role"):
        instance_role(info(role="verifier"))
    with pytest.raises(ValueError, match="role"):
        WorkerConfig(role="verifier")
    assert WorkerConfig().role == "both"


@pytest.mark.parametrize("role", ["both", "prefill", "decode"])
async def test_the_role_is_in_the_registration(role):
    runtime = InProcessRuntime()
    worker = Worker(EchoEngine(EchoConfig()), runtime, WorkerConfig(instance_id="w0", role=role))
    await worker.start()
    [registered] = runtime.client(worker.config.endpoint).instances()
    assert registered.metadata["role"] == role and instance_role(registered) == role
    await worker.stop()


def test_load_carries_step_time_and_waiting_prefill_tokens():
    stats = {
        "num_running": 2,
        "num_waiting": 3,
        "kv_usage": 0.25,
        "num_blocks": 64,
        "step_time_ms": 12.5,
        "num_waiting_prefill_tokens": 700,
    }
    load = load_from_stats("w0", stats)
    assert (load.num_waiting_requests, load.step_time_ms, load.num_waiting_prefill_tokens) == (
        3,
        12.5,
        700,
    )
    assert load_from_stats("w0", {}).step_time_ms == 0.0  # an engine that reports none


@pytest.mark.parametrize("codec", [msgspec.msgpack, msgspec.json])
def test_a_load_message_without_the_new_fields_still_decodes(codec):
    old = codec.encode(
        {
            "instance_id": "w0",
            "num_running_requests": 1,
            "kv_usage": 0.5,
            "num_total_blocks": 10,
            "version": 1,
        }
    )
    load = codec.decode(old, type=WorkerLoad)
    assert (load.num_running_requests, load.kv_usage) == (1, 0.5)
    assert (load.step_time_ms, load.num_waiting_prefill_tokens) == (0.0, 0)
    new = WorkerLoad(instance_id="w0", step_time_ms=3.0, num_waiting_prefill_tokens=9)
    assert codec.decode(codec.encode(new), type=WorkerLoad) == new
