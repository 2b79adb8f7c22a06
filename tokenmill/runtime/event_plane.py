"""Event plane over core NATS: subject ``tokenmill.ev.<namespace>.<component>.<topic>``,
msgpack payloads, at most once. A subscription buffers up to ``SUBSCRIPTION_BUFFER``
messages and drops the oldest when a slow reader falls behind, so a publisher is never
blocked (``num_dropped`` counts the losses, as in-process).
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from tokenmill.runtime.remote_stream import payload_decoder
from tokenmill.runtime.wire import LOAD_TOPIC, WorkerLoad

SUBJECT_PREFIX = "tokenmill.ev"
SUBSCRIPTION_BUFFER = 1024
# Topics whose message type is known without the caller naming it.
TOPIC_TYPES: dict[str, type] = {LOAD_TOPIC: WorkerLoad}


def event_subject(namespace: str, component: str, topic: str) -> str:
    return f"{SUBJECT_PREFIX}.{namespace}.{component}.{topic}"


class NatsSubscription:
    """Async iterator over one subject. The NATS subscription is made in a task started by
    the constructor; ``await ready()`` returns once the server has it (messages published
    after that are delivered). ``aclose()`` unsubscribes; idempotent."""

    def __init__(
        self,
        nc: Any,
        subject: str,
        topic: str,
        message_type: type | None,
        registry: set[NatsSubscription],
    ):
        self._nc, self._registry = nc, registry
        self._decode = payload_decoder(message_type or TOPIC_TYPES.get(topic))
        self.buffer: deque[Any] = deque(maxlen=SUBSCRIPTION_BUFFER)
        self.num_dropped = 0
        self._ready_event = asyncio.Event()
        self._sub: Any = None
        self._closed = False
        registry.add(self)
        self._setup = asyncio.get_running_loop().create_task(self._subscribe(subject))

    async def _subscribe(self, subject: str) -> None:
        self._sub = await self._nc.subscribe(subject, cb=self._on_msg)
        # nats-py writes flush()'s PING straight to the socket, ahead of the SUB still in its
        # pending buffer (so a PONG did not prove the server had the SUB: 5% of messages
        # published right after ready() were lost). Push the buffer out first.
        await self._nc._flush_pending(force_flush=True)
        await self._nc.flush()

    async def ready(self) -> None:
        await asyncio.shield(self._setup)

    async def _on_msg(self, msg: Any) -> None:
        if len(self.buffer) == self.buffer.maxlen:
            self.num_dropped += 1
        self.buffer.append(self._decode(msg.data))
        self._ready_event.set()

    def __aiter__(self) -> NatsSubscription:
        return self

    async def __anext__(self) -> Any:
        while not self.buffer:
            if self._closed:
                raise StopAsyncIteration
            self._ready_event.clear()
            await self._ready_event.wait()
        return self.buffer.popleft()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._registry.discard(self)
        self._ready_event.set()
        try:
            await self.ready()
            await self._sub.unsubscribe()
        except Exception:  # connection already closed
            pass
