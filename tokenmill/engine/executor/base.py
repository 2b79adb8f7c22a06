"""The executor interface between the engine core and whatever runs the model (no torch).

The engine core calls ``execute`` once per step with the scheduler's decision and gets back,
for every scheduled request that samples this step, its new token ids; a request whose row
failed (NaN logits, an exception in its own preprocessing) appears in ``errors`` instead and
nowhere else. A failure of the whole batch is an exception out of ``execute``.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from tokenmill.core.request import TokenLogprob
from tokenmill.engine.executor.kv_connector import NULL_WORKER_CONNECTOR, WorkerConnector


@dataclass
class ExecutorOutput:
    """What one step produced.

    ``sampled``: request_id -> new token ids (one per sampling request per step).
    ``logprobs``: request_id -> one ``TokenLogprob`` per sampled token, only for requests
    that asked for logprobs. ``errors``: request_id -> why that request failed; such a
    request is in neither of the other maps.
    """

    sampled: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, list[TokenLogprob]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


class Executor(abc.ABC):
    """Runs the scheduled batch. Implementations: ``ModelRunner`` (real model), the mocker.

    ``num_blocks`` is the size of the KV pool the executor allocated; the scheduler's block
    pool must have exactly that many blocks. ``release`` drops per-request state (sampling
    generators) of finished or aborted requests; releasing an unknown id is a no-op.
    ``kv_connector``: the worker side of the engine's KV connector, registered with this
    executor's KV tensors (the null one by default); the engine core drives it.
    """

    num_blocks: int
    block_size: int
    kv_connector: WorkerConnector = NULL_WORKER_CONNECTOR

    @abc.abstractmethod
    def execute(self, scheduler_output: Any) -> ExecutorOutput:
        """Run one step. Raises only when the whole batch failed."""

    def set_kv_connector(self, connector: WorkerConnector) -> None:
        """Use ``connector`` as this executor's worker-side KV connector; an executor with KV
        tensors registers them with it here (the mocker has none)."""
        self.kv_connector = connector

    def on_thread_start(self) -> None:  # noqa: B027 - optional hook
        """Called once in the engine loop's thread before its first step (torch threads)."""

    def on_wake(self) -> None:  # noqa: B027 - optional hook
        """Called in the engine loop's thread when it resumes after waiting for work (the
        engine was idle), before the step that follows (the mocker's pacing uses it)."""

    def prepare(self, request: Any) -> Future[None] | None:
        """Work a request needs before its first step, started off the engine thread (its
        grammar compiled: ``engine/structured``); the caller awaits the future (it fails with
        the request's error) before adding the request. None: nothing to wait for (the
        default; the mocker ignores structured output)."""
        return None

    def release(self, request_ids: Iterable[str]) -> None:  # noqa: B027 - optional hook
        """Forget per-request state of finished requests (no-op by default)."""

    def shutdown(self) -> None:  # noqa: B027 - optional hook
        """Free device memory; the executor is unusable afterwards (no-op by default)."""
