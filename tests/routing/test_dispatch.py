"""Routing policies behind the dispatcher: round-robin, and the router core adapter (kv
affinity for a repeated prompt, shedding as OverloadedError, queueing until capacity frees)."""

from __future__ import annotations

import asyncio

import pytest

from tokenmill.core.errors import OverloadedError
from tokenmill.core.request import EngineRequest
from tokenmill.router.queue import QueueConfig
from tokenmill.router.router import KvRouter, RouterConfig
from tokenmill.routing.dispatch import RoundRobinPolicy
from tokenmill.routing.kv_policy import KvRouterPolicy


def req(rid: str, prompt: list[int]) -> EngineRequest:
    return EngineRequest(request_id=rid, prompt_token_ids=prompt)


async def test_round_robin_cycles():
    policy = RoundRobinPolicy()
    picks = [await policy.select(req(str(i), [1]), ["a", "b", "c"]) for i in range(4)]
    assert picks == ["a", "b", "c", "a"]


async def test_kv_mode_sends_a_repeated_prompt_to_the_same_worker():
    policy = KvRouterPolicy.create("kv")
    prompt = list(range(64))
    first = await policy.select(req("r1", prompt), ["a", "b"])
    policy.on_finished("r1")
    for i in range(4):
        assert await policy.select(req(f"x{i}", prompt), ["a", "b"]) == first
        policy.on_finished(f"x{i}")


async def test_removed_instances_are_forgotten():
    policy = KvRouterPolicy.create("round-robin")
    assert await policy.select(req("r1", [1]), ["a", "b"]) in ("a", "b")
    assert await policy.select(req("r2", [1]), ["b"]) == "b"
    assert policy.router.workers == [policy._worker_ids["b"]]


async def test_shed_raises_overloaded_and_queued_waits_for_capacity():
    queue = QueueConfig(busy_prefill_tokens=10, max_queued=1)
    config = RouterConfig(mode="least-loaded", block_size=16, queue=queue)
    policy = KvRouterPolicy(KvRouter(config, lambda: 0.0), retry_after_s=2.0)
    assert await policy.select(req("r1", list(range(32))), ["a"]) == "a"  # now busy
    waiter = asyncio.create_task(policy.select(req("r2", list(range(32))), ["a"]))
    await asyncio.sleep(0)
    assert not waiter.done()
    with pytest.raises(OverloadedError) as e:
        await policy.select(req("r3", list(range(32))), ["a"])
    assert e.value.retry_after_s == 2.0
    policy.on_prefill_done("r1")  # frees prefill capacity: r2 is placed
    assert await asyncio.wait_for(waiter, 5) == "a"
