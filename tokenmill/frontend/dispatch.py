"""Picks a worker instance for each engine request and opens the stream to it.

The decision is a ``RoutePolicy`` (pure: instance ids and tokens in, instance id out; raises
``OverloadedError`` to shed). ``RoundRobinPolicy`` is the built-in fallback; ``KvRouterPolicy``
adapts the router core (``tokenmill.router``) when launch wires one in. The dispatcher tells
the policy when a request's prefill is done (first token) and when it finished, so load-aware
policies track in-flight work.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import Protocol

from tokenmill.core.request import EngineRequest
from tokenmill.runtime.interface import EndpointClient, NoInstancesError, ResponseStream


class RoutePolicy(Protocol):
    async def select(self, request: EngineRequest, instance_ids: list[str]) -> str:
        """The instance for ``request`` (may wait in a queue); ``OverloadedError`` sheds it."""
        ...

    def on_prefill_done(self, request_id: str) -> None: ...

    def on_finished(self, request_id: str) -> None: ...


class RoundRobinPolicy:
    """Cycles through the live instances; keeps no per-request state."""

    def __init__(self) -> None:
        self._counter = itertools.count()

    async def select(self, request: EngineRequest, instance_ids: list[str]) -> str:
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
    ):
        self.client = client
        self.policy = policy or RoundRobinPolicy()
        self._observe = observe

    def set_observer(self, observe: RouteObserver | None) -> None:
        self._observe = observe

    def has_instances(self) -> bool:
        return bool(self.client.instances())

    async def open(self, request: EngineRequest, deadline_s: float | None) -> ResponseStream:
        """Routes and opens the stream; ``NoInstancesError`` / ``OverloadedError`` when it
        cannot. The caller must call ``finished(request_id)`` once the stream is done."""
        instance_ids = [info.instance_id for info in self.client.instances()]
        if not instance_ids:
            raise NoInstancesError("no worker is serving")
        start = time.perf_counter()
        instance_id = await self.policy.select(request, instance_ids)
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
