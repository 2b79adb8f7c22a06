"""In-process transport: endpoints, discovery and the event plane inside one event loop.

A call iterates the handler's async generator directly in the caller's task (no queue, no
copy, no serialization), so the per-token cost is one generator step. Cancellation is the
generator's own: closing the stream closes the generator, cancelling the caller's task throws
``CancelledError`` into the handler at its current ``await``. Use one ``InProcessRuntime`` per
event loop; it is not thread-safe.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from tokenmill.runtime.interface import (
    DeadlineExceededError,
    EndpointClient,
    EndpointId,
    Handler,
    InstanceEvent,
    NoInstancesError,
    RequestContext,
    ResponseStream,
    Runtime,
    ServedEndpoint,
)
from tokenmill.runtime.wire import InstanceInfo

SUBSCRIPTION_BUFFER = 1024


class _Registry:
    """Instances per endpoint path, and the watchers of each path."""

    def __init__(self) -> None:
        self.instances: dict[str, dict[str, tuple[InstanceInfo, Handler]]] = {}
        self.watchers: dict[str, set[asyncio.Queue[InstanceEvent]]] = {}
        self.changed = asyncio.Event()

    def add(self, path: str, info: InstanceInfo, handler: Handler) -> None:
        self.instances.setdefault(path, {})[info.instance_id] = (info, handler)
        self._notify(path, InstanceEvent("added", info))

    def remove(self, path: str, instance_id: str) -> None:
        entry = self.instances.get(path, {}).pop(instance_id, None)
        if entry is not None:
            self._notify(path, InstanceEvent("removed", entry[0]))

    def _notify(self, path: str, event: InstanceEvent) -> None:
        for queue in self.watchers.get(path, ()):
            queue.put_nowait(event)
        self.changed.set()
        self.changed = asyncio.Event()


class _Served(ServedEndpoint):
    def __init__(self, registry: _Registry, path: str, info: InstanceInfo):
        self._registry, self._path, self.info = registry, path, info

    async def stop(self) -> None:
        self._registry.remove(self._path, self.info.instance_id)


class InProcessStream(ResponseStream):
    """Drives one handler generator. The deadline is one timer per stream (not one per step):
    when it fires it cancels the task waiting in ``__anext__`` (or marks the stream expired
    if none is), and that cancellation becomes ``DeadlineExceededError``."""

    def __init__(self, gen: AsyncIterator[Any], ctx: RequestContext):
        self._gen = gen
        self.request_id, self.instance_id = ctx.request_id, ctx.instance_id
        self._waiter: asyncio.Task[Any] | None = None
        self._expired = False
        self._timer: asyncio.TimerHandle | None = None
        if ctx.deadline is not None:
            loop = asyncio.get_running_loop()
            delay = max(ctx.deadline - time.monotonic(), 0.0)
            self._timer = loop.call_at(loop.time() + delay, self._expire)

    def _expire(self) -> None:
        self._expired = True
        if self._waiter is not None:
            self._waiter.cancel()

    async def __anext__(self) -> Any:
        if self._expired:
            await self._deadline_passed()
        self._waiter = asyncio.current_task()
        try:
            return await self._gen.__anext__()
        except asyncio.CancelledError:
            if not self._expired or self._waiter is None:
                raise
            self._waiter.uncancel()
            await self._deadline_passed()
        except StopAsyncIteration:
            self._cancel_timer()
            raise
        finally:
            self._waiter = None

    async def _deadline_passed(self) -> None:
        await self.aclose()
        raise DeadlineExceededError(f"request {self.request_id} passed its deadline")

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def aclose(self) -> None:
        self._cancel_timer()
        await self._gen.aclose()  # type: ignore[attr-defined]


class InProcessClient(EndpointClient):
    def __init__(self, registry: _Registry, endpoint: EndpointId):
        self._registry, self.endpoint = registry, endpoint
        self._path = endpoint.path
        self._rr = itertools.count()

    def instances(self) -> list[InstanceInfo]:
        return [info for info, _ in self._registry.instances.get(self._path, {}).values()]

    async def wait_for_instances(self, timeout_s: float | None = None) -> list[InstanceInfo]:
        async with asyncio.timeout(timeout_s):
            while not self.instances():
                await self._registry.changed.wait()
        return self.instances()

    async def watch(self) -> AsyncIterator[InstanceEvent]:
        queue: asyncio.Queue[InstanceEvent] = asyncio.Queue()
        for info in self.instances():
            queue.put_nowait(InstanceEvent("added", info))
        watchers = self._registry.watchers.setdefault(self._path, set())
        watchers.add(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            watchers.discard(queue)

    def generate(
        self,
        request: Any,
        request_id: str,
        instance_id: str | None = None,
        deadline_s: float | None = None,
    ) -> ResponseStream:
        info, handler = self._pick(instance_id)
        deadline = None if deadline_s is None else time.monotonic() + deadline_s
        ctx = RequestContext(request_id, info.instance_id, deadline)
        return InProcessStream(handler(request, ctx), ctx)

    def _pick(self, instance_id: str | None) -> tuple[InstanceInfo, Handler]:
        served = self._registry.instances.get(self._path, {})
        if instance_id is not None:
            if instance_id not in served:
                raise NoInstancesError(f"instance {instance_id} of {self._path} is gone")
            return served[instance_id]
        if not served:
            raise NoInstancesError(f"no live instance of {self._path}")
        entries = list(served.values())
        return entries[next(self._rr) % len(entries)]


class _Subscription:
    """A bounded buffer: when full, the oldest message is dropped (``num_dropped`` counts).
    Registered at creation, so nothing published after ``subscribe()`` returns is missed."""

    def __init__(self, subs: set[_Subscription]) -> None:
        self._subs = subs
        subs.add(self)
        self.buffer: deque[Any] = deque(maxlen=SUBSCRIPTION_BUFFER)
        self.ready = asyncio.Event()
        self.num_dropped = 0

    def put(self, message: Any) -> None:
        if len(self.buffer) == self.buffer.maxlen:
            self.num_dropped += 1
        self.buffer.append(message)
        self.ready.set()

    async def get(self) -> Any:
        while not self.buffer:
            self.ready.clear()
            await self.ready.wait()
        return self.buffer.popleft()

    def __aiter__(self) -> _Subscription:
        return self

    async def __anext__(self) -> Any:
        return await self.get()

    async def aclose(self) -> None:
        self._subs.discard(self)


class InProcessRuntime(Runtime):
    """Everything in one event loop. Create it inside the loop that will use it."""

    def __init__(self) -> None:
        self._registry = _Registry()
        self._served: list[_Served] = []
        self._subscriptions: dict[str, set[_Subscription]] = {}

    async def serve_endpoint(
        self,
        endpoint: EndpointId,
        handler: Handler,
        *,
        instance_id: str | None = None,
        metadata: dict[str, str] | None = None,
        request_type: type | None = None,
    ) -> ServedEndpoint:
        info = InstanceInfo(
            namespace=endpoint.namespace,
            component=endpoint.component,
            endpoint=endpoint.endpoint,
            instance_id=instance_id or uuid.uuid4().hex[:12],
            metadata=dict(metadata or {}),
        )
        self._registry.add(endpoint.path, info, handler)
        served = _Served(self._registry, endpoint.path, info)
        self._served.append(served)
        return served

    def client(self, endpoint: EndpointId, response_type: type | None = None) -> EndpointClient:
        return InProcessClient(self._registry, endpoint)

    async def publish(self, namespace: str, component: str, topic: str, message: Any) -> None:
        for sub in self._subscriptions.get(f"{namespace}.{component}.{topic}", ()):
            sub.put(message)

    def subscribe(
        self, namespace: str, component: str, topic: str, message_type: type | None = None
    ) -> AsyncIterator[Any]:
        subject = f"{namespace}.{component}.{topic}"
        return _Subscription(self._subscriptions.setdefault(subject, set()))

    async def shutdown(self) -> None:
        for served in self._served:
            await served.stop()
        self._served.clear()
