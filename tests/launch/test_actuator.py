"""The local process actuator with fake processes (no spawning): which worker goes, how."""

from __future__ import annotations

import signal

from tokenmill.launch.actuator import LocalProcessActuator
from tokenmill.launch.specs import EngineSpec, WorkerSpec
from tokenmill.planner.observation import PoolDecision


class FakeProc:
    def __init__(self, pid):
        self.pid, self.code, self.signals = pid, None, []

    def poll(self):
        return self.code

    def send_signal(self, sig):
        self.signals.append(sig)

    def kill(self):
        self.signals.append(signal.SIGKILL)

    def wait(self, timeout=None):
        self.code = 0 if self.code is None else self.code
        return self.code


def make(discovered, running=None):
    spawned = []

    def spawn(engine, worker, url):
        proc = FakeProc(len(spawned))
        proc.instance_id = worker.instance_id
        spawned.append(proc)
        return proc

    act = LocalProcessActuator(
        EngineSpec(kind="mocker"),
        WorkerSpec(),
        "nats://x",
        lambda: discovered,
        running or (lambda _: 0),
        spawn=spawn,
    )
    return act, spawned


def decision(target, current, drain=True):
    return PoolDecision("both", current, target, "test", drain)


def test_start_counts_and_up_once_discovered():
    live: set[str] = set()
    act, spawned = make(live)
    act.apply(decision(3, 0))
    assert [p.instance_id for p in spawned] == ["planned-0", "planned-1", "planned-2"]
    assert act.counts("both") == (0, 3, 0)
    live.update({"planned-0", "planned-1"})
    assert act.counts("both") == (2, 1, 0)


def test_scale_down_cancels_starting_then_drains_the_least_busy():
    live: set[str] = set()
    busy = {"planned-0": 5, "planned-1": 1, "planned-2": 3}
    act, spawned = make(live, lambda iid: busy.get(iid, 0))
    act.apply(decision(4, 0))
    live.update({"planned-0", "planned-1", "planned-2"})  # planned-3 still starting
    act.apply(decision(2, 4))
    assert spawned[3].signals == [signal.SIGTERM]  # the starting one first
    assert spawned[1].signals == [signal.SIGTERM]  # then the up one with fewest requests
    assert spawned[0].signals == spawned[2].signals == []
    assert act.counts("both") == (2, 0, 2)
    spawned[1].code = spawned[3].code = 0  # they drained and exited
    act.poll()
    assert act.counts("both") == (2, 0, 0) and act.num_drained == 2


def test_kill_for_the_dynamo_control_and_never_below_one():
    live = {"planned-0", "planned-1"}
    act, spawned = make(live)
    act.apply(decision(2, 0))
    act.apply(decision(0, 2, drain=False))
    assert signal.SIGKILL in spawned[0].signals + spawned[1].signals
    assert sum(1 for p in spawned if p.signals) == 1  # one serving worker stays


def test_a_worker_that_dies_is_forgotten_and_counted():
    live = {"planned-0"}
    act, spawned = make(live)
    act.apply(decision(1, 0))
    spawned[0].code = -9
    act.poll()
    assert act.counts("both") == (0, 0, 0) and act.num_lost == 1
    act.apply(decision(1, 0))  # the planner's next decision replaces it
    assert len(spawned) == 2
    act.stop(0.1)
    assert act.children == []
