"""Keeping a deployment's child processes alive (``serve --workers N``: the workers and the
embedded nats-server).

- ``RestartBudget`` (pure, injected times): how long to wait before the next restart of one
  child (exponential backoff) and when to give up (more than ``max_restarts`` restarts within
  ``window_s``).
- ``Supervisor``: polls its children (``poll()`` also reaps them: no zombies), logs each exit
  with its code or signal, restarts the child after its backoff, and when a child's budget is
  spent or its restart fails, resolves ``fatal`` with the reason: the server then exits
  non-zero so that the supervisor above it (systemd, Kubernetes) takes over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)

POLL_S = 0.2


@dataclass(frozen=True)
class RestartPolicy:
    """``max_restarts`` 0: dead children are logged and not replaced (the server keeps
    serving with the rest)."""

    max_restarts: int = 5  # per child within window_s; one more death and the server exits
    window_s: float = 300.0
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 10.0


class RestartBudget:
    """One child's restarts. ``next_delay(now)`` is asked when the child died: seconds to
    wait before restarting it, or None when the budget is spent. Pure: ``now`` is given."""

    def __init__(self, policy: RestartPolicy):
        self.policy = policy
        self._restarts: deque[float] = deque()  # times of the restarts within the window

    def next_delay(self, now: float) -> float | None:
        while self._restarts and self._restarts[0] <= now - self.policy.window_s:
            self._restarts.popleft()
        if len(self._restarts) >= self.policy.max_restarts:
            return None
        delay = self.policy.initial_backoff_s * 2 ** len(self._restarts)
        self._restarts.append(now)
        return min(delay, self.policy.max_backoff_s)


class Child(Protocol):
    """A supervised process: ``poll()`` is None while it runs, else its exit code (negative:
    killed by that signal) and reaps it; ``restart()`` starts it anew (blocking; raises when
    it cannot)."""

    name: str

    @property
    def pid(self) -> int | None: ...

    def poll(self) -> int | None: ...

    def restart(self) -> None: ...


def describe_exit(code: int) -> str:
    """ "exited with 3" or "killed by SIGKILL"."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exited with {code}"


class Supervisor:
    """Watches ``children`` from a task of the running loop (``start``/``stop``)."""

    def __init__(
        self,
        children: Sequence[Child],
        policy: RestartPolicy = RestartPolicy(),
        clock: Callable[[], float] = time.monotonic,
        poll_s: float = POLL_S,
    ):
        self.children = list(children)
        self.policy = policy
        self._budgets = {id(c): RestartBudget(policy) for c in self.children}
        self._clock, self._poll_s = clock, poll_s
        self.fatal: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.num_restarts = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Stops watching (children are left as they are: the caller stops them)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        watching = list(self.children)
        while watching and not self.fatal.done():
            for child in list(watching):
                code = child.poll()
                if code is not None and not await self._replace(child, code):
                    watching.remove(child)
            await asyncio.sleep(self._poll_s)

    async def _replace(self, child: Child, code: int) -> bool:
        """Restarts a dead child after its backoff; False when it stays dead."""
        if self.policy.max_restarts == 0:
            log.error(
                "%s (pid %s) %s; not restarted (restarts disabled)",
                child.name,
                child.pid,
                describe_exit(code),
            )
            return False
        delay = self._budgets[id(child)].next_delay(self._clock())
        if delay is None:
            self._give_up(
                f"{child.name} (pid {child.pid}) {describe_exit(code)}; "
                f"{self.policy.max_restarts} restarts in {self.policy.window_s:g} s spent"
            )
            return False
        log.error(
            "%s (pid %s) %s; restarting in %.1f s",
            child.name,
            child.pid,
            describe_exit(code),
            delay,
        )
        await asyncio.sleep(delay)
        try:
            await asyncio.to_thread(child.restart)
        except Exception as exc:  # noqa: BLE001 - a child that cannot start ends the server
            self._give_up(f"{child.name} could not be restarted: {exc}")
            return False
        self.num_restarts += 1
        log.warning("%s restarted (pid %s)", child.name, child.pid)
        return True

    def _give_up(self, reason: str) -> None:
        log.critical("%s: giving up", reason)
        if not self.fatal.done():
            self.fatal.set_result(reason)
