"""The runtime's client interface: how components find and call each other, whatever the
transport (in-process here, NATS/TCP later).

Addressing is ``namespace / component / endpoint`` (``EndpointId``), e.g.
``tokenmill / backend / generate``. A component serves an endpoint with an async-generator
handler; each serving registers one *instance* (``InstanceInfo``) in discovery. A client for
the endpoint lists and watches instances and opens response streams to one of them.

Contracts every transport keeps:

- ``handler(request, ctx)`` is an async generator; each yielded item is one response.
  An exception raised by the handler ends the client's stream with that exception. The
  in-process transport passes the exception object itself; networked transports send its
  registered code, message and param and raise the same class again
  (``core.errors.from_wire``); any other exception arrives as ``InternalError`` naming its
  class only, which is what the frontend tells a client about it in-process too.
- The runtime's own errors (``NoInstancesError``, ``DeadlineExceededError``,
  ``InstanceFailedError``) are defined in ``core.errors`` with the others and importable
  from here.
- Closing a ``ResponseStream`` (``aclose()``, leaving ``async with``, or cancelling the task
  that iterates it) stops the handler: it sees ``GeneratorExit``/``CancelledError`` at its
  current ``await``, so its ``finally`` blocks run (the worker aborts the engine request there).
- A deadline (``deadline_s``, seconds from the call) bounds the whole stream. When it passes,
  the handler is stopped as above and the client gets ``DeadlineExceededError``.
- ``ServedEndpoint.stop()`` deregisters the instance at once (watchers see ``removed``); streams
  already open run to completion.
- ``watch()`` first yields every current instance as ``added``, then changes in order.
- The event plane (``publish``/``subscribe``) is fire-and-forget, at most once, per subject
  ``namespace.component.topic``; a slow subscriber loses the oldest messages, never blocks the
  publisher.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

# re-exported: the runtime's errors are registered in core with every other error
from tokenmill.core.errors import (  # noqa: F401
    DeadlineExceededError,
    InstanceFailedError,
    NoInstancesError,
)
from tokenmill.runtime.wire import InstanceInfo


@dataclass(frozen=True)
class EndpointId:
    namespace: str
    component: str
    endpoint: str

    @property
    def path(self) -> str:
        return f"{self.namespace}.{self.component}.{self.endpoint}"

    @classmethod
    def parse(cls, path: str) -> EndpointId:
        """``"ns.component.endpoint"`` (also accepts ``/`` separators)."""
        parts = path.replace("/", ".").split(".")
        if len(parts) != 3 or not all(parts):
            raise ValueError(f"endpoint path must be namespace.component.endpoint: {path!r}")
        return cls(*parts)


@dataclass(frozen=True)
class RequestContext:
    """What a handler knows about its call. ``deadline`` is ``time.monotonic()`` based."""

    request_id: str
    instance_id: str
    deadline: float | None = None

    def time_left_s(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()


class InstanceEvent(msgspec.Struct, frozen=True):
    kind: Literal["added", "removed"]
    instance: InstanceInfo


Handler = Callable[[Any, RequestContext], AsyncIterator[Any]]


class ResponseStream(ABC):
    """An open call: iterate it (or call ``next_batch()``) for responses; ``aclose()`` cancels
    the handler. Idempotent close; safe to close after the stream ended."""

    request_id: str
    instance_id: str

    def __aiter__(self) -> ResponseStream:
        return self

    @abstractmethod
    async def __anext__(self) -> Any: ...

    async def next_batch(self) -> list[Any]:
        """Waits until at least one item is ready and returns every item ready now, in order
        (never an empty list). ``StopAsyncIteration`` once the stream ended and nothing is
        left. When the stream fails, the items that arrived before the failure are returned
        first and the next call raises the error. Mixing it with ``__anext__`` on one stream
        is allowed. This default returns one item per call: right for a transport that
        buffers nothing (in-process, the handler runs on demand); networked streams return
        their whole buffer."""
        return [await self.__anext__()]

    @abstractmethod
    async def aclose(self) -> None: ...

    async def __aenter__(self) -> ResponseStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class ServedEndpoint(ABC):
    info: InstanceInfo

    @abstractmethod
    async def stop(self) -> None:
        """Deregisters the instance; open streams keep running. Idempotent."""


class EndpointClient(ABC):
    endpoint: EndpointId

    @abstractmethod
    def instances(self) -> list[InstanceInfo]:
        """The live instances now, in registration order."""

    @abstractmethod
    async def wait_for_instances(self, timeout_s: float | None = None) -> list[InstanceInfo]:
        """Returns once at least one instance is live; ``TimeoutError`` after ``timeout_s``."""

    @abstractmethod
    def watch(self) -> AsyncIterator[InstanceEvent]:
        """Current instances as ``added``, then additions/removals. Close it with aclose()."""

    @abstractmethod
    def generate(
        self,
        request: Any,
        request_id: str,
        instance_id: str | None = None,
        deadline_s: float | None = None,
    ) -> ResponseStream:
        """Opens a stream to ``instance_id`` (None: the client picks, round-robin).
        Raises ``NoInstancesError`` (at call or on first ``__anext__``) if none is live."""


class Runtime(ABC):
    """One process's handle on the runtime (transport + discovery + event plane)."""

    @abstractmethod
    async def serve_endpoint(
        self,
        endpoint: EndpointId,
        handler: Handler,
        *,
        instance_id: str | None = None,
        metadata: dict[str, str] | None = None,
        request_type: type | None = None,
    ) -> ServedEndpoint:
        """Registers one instance serving ``handler``. ``request_type`` tells a networked
        transport what to decode payloads into (ignored in-process)."""

    @abstractmethod
    def client(self, endpoint: EndpointId, response_type: type | None = None) -> EndpointClient:
        """A client for ``endpoint``; ``response_type`` is for networked decoding."""

    @abstractmethod
    async def publish(self, namespace: str, component: str, topic: str, message: Any) -> None: ...

    @abstractmethod
    def subscribe(
        self, namespace: str, component: str, topic: str, message_type: type | None = None
    ) -> AsyncIterator[Any]:
        """Messages published after the call; close the iterator with aclose().
        ``message_type`` tells a networked transport what to decode into (ignored in-process,
        where the published objects themselves arrive)."""

    @abstractmethod
    async def shutdown(self) -> None:
        """Deregisters everything this runtime served and closes subscriptions."""
