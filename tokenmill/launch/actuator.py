"""Actuators: apply the planner's ``PoolDecision``s to real workers.

``Actuator`` is the contract a planner loop drives (a Kubernetes actuator patching a
Deployment's replicas would implement the same three calls):

- ``counts(pool)`` -> ``(up, starting, draining)`` workers of the pool now;
- ``apply(decision)``: start workers up to ``decision.target`` or remove down to it;
  removal drains (``decision.drain``) or kills; never below one serving worker;
- ``poll()``: refresh states (reap exited processes); ``stop(timeout_s)``: end every worker.

``LocalProcessActuator`` runs each worker as a ``tokenmill worker`` child
(``processes.spawn_worker``) with an instance id of its own (``<prefix>-<n>``), so discovery
tells which child is up: a child is *starting* until its instance id is discovered, then
*up*. Removing picks starting children first (newest first), then the up one with the
fewest running requests (``running(instance_id)``). Draining is the worker's own SIGTERM
path: it deregisters (the router stops sending it requests), lets in-flight requests finish
for ``WorkerSpec.drain_timeout_s`` and then evicts the rest, which the frontend migrates to
other workers; so no request fails because of a scale-down. Killing (SIGKILL) is there for
the ``dynamo`` control only. A child that exits on its own is logged and forgotten; the
planner sees one worker fewer and replaces it.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from tokenmill.launch.processes import Process, spawn_worker, stop_processes
from tokenmill.launch.specs import EngineSpec, WorkerSpec
from tokenmill.planner.observation import PoolDecision

log = logging.getLogger(__name__)


class Actuator(Protocol):
    def counts(self, pool: str) -> tuple[int, int, int]: ...

    def apply(self, decision: PoolDecision) -> None: ...

    def poll(self) -> None: ...

    def stop(self, timeout_s: float) -> None: ...


@dataclass
class _Child:
    instance_id: str
    proc: Process
    started: float
    draining: bool = False


class LocalProcessActuator:
    """Worker processes of one pool (``pool``) on this machine."""

    def __init__(
        self,
        engine: EngineSpec,
        worker: WorkerSpec,
        nats_url: str,
        discovered: Callable[[], set[str]],
        running: Callable[[str], int] = lambda _: 0,
        pool: str = "both",
        prefix: str = "planned",
        spawn: Callable[[EngineSpec, WorkerSpec, str], Process] = spawn_worker,
    ):
        self.engine, self.worker, self.nats_url = engine, worker, nats_url
        self.pool, self._discovered, self._running = pool, discovered, running
        self._spawn, self._prefix = spawn, prefix
        self._ids = itertools.count()
        self.children: list[_Child] = []
        self.num_started = self.num_drained = self.num_lost = 0

    def set_discovery(self, discovered: Callable[[], set[str]]) -> None:
        """The instance ids discovery lists now (known once the frontend is connected)."""
        self._discovered = discovered

    # ---- the contract --------------------------------------------------------------------
    def counts(self, pool: str) -> tuple[int, int, int]:
        live = self._discovered()
        up = sum(1 for c in self.children if not c.draining and c.instance_id in live)
        draining = sum(1 for c in self.children if c.draining)
        return up, len(self.children) - up - draining, draining

    def apply(self, decision: PoolDecision) -> None:
        provisioned = [c for c in self.children if not c.draining]
        for _ in range(decision.target - len(provisioned)):
            self.start_worker()
        for _ in range(len(provisioned) - decision.target):
            self.remove_worker(decision.drain)

    def poll(self) -> None:
        for child in list(self.children):
            code = child.proc.poll()
            if code is None:
                continue
            self.children.remove(child)
            if child.draining:
                self.num_drained += 1
                log.info("planner: worker %s drained and stopped", child.instance_id)
            else:
                self.num_lost += 1
                log.error("planner: worker %s exited with %s", child.instance_id, code)

    def stop(self, timeout_s: float) -> None:
        stop_processes([c.proc for c in self.children], timeout_s)
        self.children.clear()

    # ---- one worker at a time ------------------------------------------------------------
    def start_worker(self) -> str:
        instance_id = f"{self._prefix}-{next(self._ids)}"
        spec = dataclasses.replace(self.worker, instance_id=instance_id)
        proc = self._spawn(self.engine, spec, self.nats_url)
        self.children.append(_Child(instance_id, proc, time.monotonic()))
        self.num_started += 1
        log.info("planner: starting worker %s (pid %s)", instance_id, proc.pid)
        return instance_id

    def remove_worker(self, drain: bool = True) -> str | None:
        """Drains (or kills) one worker; None when only one serving worker is left."""
        live = self._discovered()
        candidates = [c for c in self.children if not c.draining]
        starting = [c for c in candidates if c.instance_id not in live]
        up = [c for c in candidates if c.instance_id in live]
        if starting:
            child = starting[-1]
        elif len(up) > 1:
            child = min(up, key=lambda c: (self._running(c.instance_id), -c.started))
        else:
            return None
        child.draining = True
        if drain or child in starting:
            child.proc.send_signal(signal.SIGTERM)
        else:
            child.proc.kill()
        log.info("planner: %s worker %s", "draining" if drain else "killing", child.instance_id)
        return child.instance_id
