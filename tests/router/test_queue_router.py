from __future__ import annotations

import pytest

from tokenmill.core.events import KvEvent, Stored, StoredBlock
from tokenmill.router.approx import ApproxConfig
from tokenmill.router.queue import QueueConfig, RequestQueue
from tokenmill.router.router import KvRouter, Queued, Routed, RouteOverrides, RouterConfig, Shed


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_queue_fcfs_and_shortest_prefill_first():
    fcfs = RequestQueue(QueueConfig(order="fcfs"))
    spf = RequestQueue(QueueConfig(order="spf"))
    for name, tokens in [("a", 300), ("b", 100), ("c", 200), ("d", 100)]:
        fcfs.push(name, tokens)
        spf.push(name, tokens)
    assert [fcfs.pop() for _ in range(4)] == ["a", "b", "c", "d"]
    assert [spf.pop() for _ in range(4)] == ["b", "d", "c", "a"]
    assert spf.pop() is None
    with pytest.raises(ValueError):
        QueueConfig(order="lifo")


def test_queue_hard_limit():
    q = RequestQueue(QueueConfig(max_queued=2))
    assert q.push("a", 1) and q.push("b", 1)
    assert not q.push("c", 1)
    assert len(q) == 2


def make_router(mode: str = "kv", **kw) -> tuple[KvRouter, Clock]:
    clock = Clock()
    router = KvRouter(RouterConfig(mode=mode, block_size=4, **kw), clock)
    router.add_worker(0)
    router.add_worker(1)
    return router, clock


def test_route_follows_cache_and_counts_load():
    router, _ = make_router()
    router.apply_event(KvEvent(0, 1, Stored(None, [StoredBlock(h, h) for h in (10, 11, 12)])))
    d = router.route("r1", [10, 11, 12], 12)
    assert d == Routed("r1", 1, 3, 0.0)
    assert router.active.active_prefill_tokens(1) == 0
    assert router.active.active_blocks(1) == 3
    d2 = router.route("r2", [20, 21], 8)
    assert isinstance(d2, Routed) and d2.worker_id == 0
    assert router.active.active_prefill_tokens(0) == 8
    router.mark_prefill_done("r2")
    router.mark_finished("r2")
    assert router.active.active_blocks(0) == 0
    router.active.check_integrity()


def test_queue_when_all_busy_then_drain_and_shed():
    router, clock = make_router(queue=QueueConfig(busy_prefill_tokens=4, max_queued=1))
    assert isinstance(router.route("a", [1, 2], 8), Routed)
    assert isinstance(router.route("b", [3, 4], 8), Routed)
    assert router.route("c", [5], 4) == Queued("c")
    assert router.route("d", [6], 4) == Shed("d", "queue full")
    clock.now = 2.5
    assert router.drain() == []
    router.mark_prefill_done("a")
    placed = router.drain()
    assert [(p.request_id, p.queued_s) for p in placed] == [("c", 2.5)]


def test_overrides_and_worker_removal():
    router, _ = make_router()
    d = router.route("a", [1], 4, RouteOverrides(worker_id=1))
    assert isinstance(d, Routed) and d.worker_id == 1
    assert router.remove_worker(1) == ["a"]
    assert router.workers == [0]
    assert router.route("b", [1], 4).worker_id == 0
    router.remove_worker(0)
    assert router.route("c", [1], 4) == Shed("c", "no workers")


def test_approximate_mode_predicts_cache_with_ttl_and_size():
    router, clock = make_router(approx=ApproxConfig(ttl_s=10.0, max_blocks=3))
    first = router.route("a", [1, 2], 8)
    router.mark_finished("a")
    again = router.route("b", [1, 2], 8)
    assert again.worker_id == first.worker_id and again.overlap_blocks == 2
    router.mark_finished("b")
    router.route("c", [7, 8], 8, RouteOverrides(worker_id=first.worker_id))
    router.mark_finished("c")
    # size limit 3: block 1 (oldest) pruned, so the prefix no longer matches
    assert router.index.find_matches([1, 2]) == {}
    clock.now = 11.0
    router.route("d", [9], 4, RouteOverrides(worker_id=1 - first.worker_id))
    assert router.index.num_blocks(first.worker_id) == 0
