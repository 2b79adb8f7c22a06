"""Supervision of child processes: the restart budget (pure), and the supervisor over fake
children (exits are logged with their signal, children restarted after their backoff, the
server told to give up when a budget is spent or a restart fails)."""

from __future__ import annotations

import asyncio
import logging
import signal

import pytest

from tokenmill.launch.supervision import (
    RestartBudget,
    RestartPolicy,
    Supervisor,
    describe_exit,
)


def test_backoff_doubles_up_to_the_cap_and_the_budget_runs_out():
    budget = RestartBudget(
        RestartPolicy(max_restarts=4, window_s=100.0, initial_backoff_s=1.0, max_backoff_s=3.0)
    )
    assert [budget.next_delay(t) for t in (0.0, 1.0, 2.0, 3.0)] == [1.0, 2.0, 3.0, 3.0]
    assert budget.next_delay(4.0) is None
    assert budget.next_delay(99.0) is None


def test_restarts_leave_the_budget_after_the_window():
    budget = RestartBudget(RestartPolicy(max_restarts=2, window_s=10.0, initial_backoff_s=0.5))
    assert budget.next_delay(0.0) == 0.5
    assert budget.next_delay(5.0) == 1.0
    assert budget.next_delay(9.0) is None
    assert budget.next_delay(10.0) == 1.0  # the restart at 0 has left the window; 5 is in it
    assert budget.next_delay(14.0) is None


def test_exit_descriptions():
    assert describe_exit(-signal.SIGKILL) == "killed by SIGKILL"
    assert describe_exit(3) == "exited with 3"
    assert describe_exit(-200) == "killed by signal 200"


class FakeChild:
    """Dies (exit code ``code``) whenever ``kill()`` is called; ``restart`` revives it or, past
    ``restart_fails_after`` restarts, raises."""

    def __init__(self, name: str, restart_fails_after: int | None = None):
        self.name, self.pid, self.code = name, 100, None
        self.restarts = 0
        self._fails_after = restart_fails_after

    def kill(self, code: int = -signal.SIGKILL) -> None:
        self.code = code

    def poll(self) -> int | None:
        return self.code

    def restart(self) -> None:
        if self._fails_after is not None and self.restarts >= self._fails_after:
            raise OSError("no such file")
        self.restarts += 1
        self.pid, self.code = 100 + self.restarts, None


FAST = RestartPolicy(max_restarts=2, window_s=60.0, initial_backoff_s=0.01, max_backoff_s=0.01)


async def _until(condition, timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.005)


async def _supervised(children, policy=FAST) -> Supervisor:
    supervisor = Supervisor(children, policy, poll_s=0.01)
    supervisor.start()
    return supervisor


async def test_a_dead_child_is_logged_and_restarted(caplog):
    caplog.set_level(logging.WARNING, "tokenmill.launch.supervision")
    worker, other = FakeChild("worker 0"), FakeChild("worker 1")
    supervisor = await _supervised([worker, other])
    try:
        worker.kill()
        await _until(lambda: supervisor.num_restarts == 1)
        assert (worker.restarts, other.restarts, supervisor.num_restarts) == (1, 0, 1)
        assert not supervisor.fatal.done()
        assert "worker 0 (pid 100) killed by SIGKILL; restarting in 0.0 s" in caplog.text
        assert "worker 0 restarted (pid 101)" in caplog.text
    finally:
        await supervisor.stop()


async def test_a_spent_budget_is_fatal():
    child = FakeChild("worker 0")
    supervisor = await _supervised([child])
    try:
        for n in range(1, FAST.max_restarts + 1):
            child.kill()
            await _until(lambda n=n: supervisor.num_restarts == n)
        child.kill(3)
        reason = await asyncio.wait_for(supervisor.fatal, 5)
        assert reason == "worker 0 (pid 102) exited with 3; 2 restarts in 60 s spent"
    finally:
        await supervisor.stop()


async def test_a_failed_restart_is_fatal():
    child = FakeChild("nats-server", restart_fails_after=0)
    supervisor = await _supervised([child])
    try:
        child.kill()
        reason = await asyncio.wait_for(supervisor.fatal, 5)
        assert reason == "nats-server could not be restarted: no such file"
    finally:
        await supervisor.stop()


async def test_restarts_disabled_leave_the_dead_child_and_keep_serving(caplog):
    caplog.set_level(logging.ERROR, "tokenmill.launch.supervision")
    child = FakeChild("worker 0")
    supervisor = await _supervised([child], RestartPolicy(max_restarts=0))
    try:
        child.kill()
        await _until(lambda: "not restarted" in caplog.text)
        assert child.restarts == 0 and not supervisor.fatal.done()
    finally:
        await supervisor.stop()


@pytest.mark.parametrize("argv", [["--worker-restarts", "-1"], ["--restart-window", "0"]])
def test_restart_flags_are_checked(argv):
    from tokenmill.launch.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", *argv])
