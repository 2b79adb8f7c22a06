"""Picks a worker instance for each engine request and opens the stream to it.

The decision is a ``RoutePolicy`` (pure: instance ids and tokens in, instance id out; raises
``OverloadedError`` to shed). ``RoundRobinPolicy`` is the built-in fallback; ``KvRouterPolicy``
adapts the router core (``tokenmill.router``) when launch wires one in. The dispatcher tells
the policy when a request's prefill is done (first token) and when it finished, so load-aware
policies track in-flight work.

An instance that failed a stream (``instance_failed``) is skipped for ``exclude_s`` seconds,
so requests stop going to a dead worker at the first failure signal, before discovery's
lease expires.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import Any, Protocol

from tokenmill.core.request import EngineRequest
from tokenmill.runtime.interface import EndpointClient, NoInstancesError, ResponseStream


class RoutePolicy(Protocol):
    async def select(self, request: EngineRequest, instance_ids: list[str]) -> str:
        """The instance for ``request`` (may wait in a queue); ``OverloadedError`` sheds it.
        Policies that take per-request options accept them as a third argument."""
        ...

    def on_prefill_done(self, request_id: str) -> None: ...

    def on_finished(self, request_id: str) -> None: ...


class RoundRobinPolicy:
    """Cycles through the live instances; keeps no per-request state."""

    def __init__(self) -> None:
        self._counter = itertools.count()

    async def select(
        self, request: EngineRequest, instance_ids: list[str], options: Any = None
    ) -> str:
        """``options.worker_id`` (a pin) wins when that instance is live."""
        pin = getattr(options, "worker_id", None)
        if pin in instance_ids:
            return pin
        return instance_ids[next(self._counter) % len(instance_ids)]

    def on_prefill_done(self, request_id: str) -> None:
        pass

    def on_finished(self, request_id: str) -> None:
        pass


RouteObserver = Callable[[str, float], None]  # (instance id, seconds spent deciding)


class Dispatcher:
    """Routes engine requests to instances of one endpoint. ``observe`` (optional) is told
    every decision and its overhead (the frontend's router metrics)."""

    def __init__(
        self,
        client: EndpointClient,
        policy: RoutePolicy | None = None,
        observe: RouteObserver | None = None,
        exclude_s: float = 30.0,
    ):
        self.client = client
        self.policy = policy or RoundRobinPolicy()
        self._observe = observe
        self.exclude_s = exclude_s
        self._excluded: dict[str, float] = {}  # instance id -> monotonic time it is allowed again

    def set_observer(self, observe: RouteObserver | None) -> None:
        self._observe = observe

    def has_instances(self) -> bool:
        return bool(self.live_instances())

    def live_instances(self) -> list[str]:
        """Instance ids discovery lists now, minus the recently failed ones."""
        ids = [info.instance_id for info in self.client.instances()]
        if not self._excluded:
            return ids
        now = time.monotonic()
        for iid in [i for i, until in self._excluded.items() if until <= now]:
            del self._excluded[iid]
        return [iid for iid in ids if iid not in self._excluded]

    def instance_failed(self, instance_id: str, request_id: str | None = None) -> None:
        """Stops routing to ``instance_id`` for ``exclude_s``; ``request_id`` (placed there)
        is released from the policy's in-flight accounting."""
        self._excluded[instance_id] = time.monotonic() + self.exclude_s
        if request_id is not None:
            self.policy.on_finished(request_id)

    async def open(
        self, request: EngineRequest, deadline_s: float | None, options: Any = None
    ) -> ResponseStream:
        """Routes and opens the stream; ``NoInstancesError`` / ``OverloadedError`` when it
        cannot. The caller must call ``finished(request_id)`` once the stream is done.
        ``options`` (per-request router options) go to the policy when given."""
        instance_ids = self.live_instances()
        if not instance_ids:
            raise NoInstancesError("no worker is serving")
        start = time.perf_counter()
        if options is None:
            instance_id = await self.policy.select(request, instance_ids)
        else:
            instance_id = await self.policy.select(request, instance_ids, options)  # type: ignore[call-arg]
        if self._observe is not None:
            self._observe(instance_id, time.perf_counter() - start)
        try:
            return self.client.generate(request, request.request_id, instance_id, deadline_s)
        except BaseException:
            self.policy.on_finished(request.request_id)
            raise

    def prefill_done(self, request_id: str) -> None:
        self.policy.on_prefill_done(request_id)

    def finished(self, request_id: str) -> None:
        self.policy.on_finished(request_id)
