"""A worker's KV events on the wire: numbered, published, replayable, dumpable.

The engine's block pool calls ``sink(data)`` (any thread: the engine loop runs in its own;
events wait in an inbox and one event-loop wake-up takes every event there).
``KvPublisher`` numbers each event on the event loop (ids 0, 1, 2... per ``epoch``; a new
epoch, random per publisher, means the worker restarted), applies it to a local index (the
blocks cached now, per tier, with parent and local hash) and a ring buffer of the last
``ring_size`` events, and publishes ``KvEventBatch``es on topic ``kv`` (one per
``flush_interval_s`` while events keep coming).

``replay(from_event_id)`` is the handler of the worker's ``kv_replay`` endpoint: the events
from ``from_event_id`` when the ring buffer still holds them, otherwise (or for ``None``) a
full dump: a ``reset`` chunk, then the local index as ``Stored`` events, in chunks of at most
``max_chunk_bytes`` so each fits NATS's payload limit. Every chunk says the ``next_event_id``
the dump or replay is consistent with; live events from there on complete it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from tokenmill.core.events import (
    Cleared,
    KvEvent,
    KvEventData,
    Removed,
    Stored,
    StoredBlock,
    Tier,
)
from tokenmill.runtime.interface import Runtime
from tokenmill.runtime.kv_wire import KV_TOPIC, KvEventBatch, KvReplayChunk, KvReplayRequest

log = logging.getLogger(__name__)

_BLOCK_WIRE_BYTES = 20  # upper bound of one StoredBlock in msgpack (two uint64 + array header)
_EVENT_WIRE_BYTES = 96  # upper bound of a KvEvent without its blocks (ids, tag, tier, version)


@dataclass(frozen=True)
class KvPublisherConfig:
    """``flush_interval_s``: events recorded within this long of the first unpublished one go
    out in the same batch (one NATS message, not one per engine step; 0: end of iteration).
    It bounds how stale the routers' view can be, so keep it well under a prefill's time."""

    ring_size: int = 4096
    max_chunk_bytes: int = 512 * 1024  # NATS default max_payload is 1 MiB
    flush_interval_s: float = 0.01


class KvPublisher:
    def __init__(
        self,
        runtime: Runtime,
        namespace: str,
        component: str,
        config: KvPublisherConfig | None = None,
    ):
        self.runtime, self.namespace, self.component = runtime, namespace, component
        self.config = config or KvPublisherConfig()
        self.epoch = uuid.uuid4().hex[:12]
        self.instance_id = ""
        self.next_event_id = 0
        self.ring: collections.deque[KvEvent] = collections.deque(maxlen=self.config.ring_size)
        self.blocks: dict[Tier, dict[int, tuple[int | None, int]]] = {}  # hash -> parent, local
        self._pending: list[KvEvent] = []
        self._inbox: list[tuple[KvEventData, Tier]] = []  # from the engine thread, not numbered
        self._inbox_lock = threading.Lock()
        self._inbox_posted = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.num_published = 0

    def bind(self, instance_id: str) -> None:
        """Call on the event loop once the instance id is known; events start flowing."""
        self.instance_id = instance_id
        self._loop = asyncio.get_running_loop()

    def sink(self, data: KvEventData, tier: Tier = Tier.DEVICE) -> None:
        """The engine's ``event_sink`` (``tier``: a lower KV tier's events): thread-safe,
        never blocks. Events wait in an inbox; the event loop is woken only when the inbox
        was empty (one wake-up per burst)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with self._inbox_lock:
            self._inbox.append((data, tier))
            if self._inbox_posted:
                return
            self._inbox_posted = True
        try:
            loop.call_soon_threadsafe(self._drain_inbox)
        except RuntimeError:  # the loop closed meanwhile
            pass

    def _drain_inbox(self) -> None:
        with self._inbox_lock:
            inbox, self._inbox = self._inbox, []
            self._inbox_posted = False
        for data, tier in inbox:
            self.record(data, tier)

    def record(self, data: KvEventData, tier: Tier = Tier.DEVICE) -> KvEvent:
        """Numbers ``data`` and applies it locally; published with the batch it joins."""
        event = KvEvent(self.next_event_id, 0, data, tier)
        self.next_event_id += 1
        self.ring.append(event)
        self._apply(event)
        if not self._pending and self._loop is not None:
            self._loop.call_later(self.config.flush_interval_s, self._flush)
        self._pending.append(event)
        return event

    def _apply(self, event: KvEvent) -> None:
        blocks = self.blocks.setdefault(event.tier, {})
        data = event.data
        if isinstance(data, Stored):
            parent = data.parent_hash
            for block in data.blocks:
                blocks[block.block_hash] = (parent, block.local_hash)
                parent = block.block_hash
        elif isinstance(data, Removed):
            for h in data.block_hashes:
                blocks.pop(h, None)
        elif isinstance(data, Cleared):
            blocks.clear()

    def _flush(self) -> None:
        events, self._pending = self._pending, []
        if not events:
            return
        batch = KvEventBatch(instance_id=self.instance_id, epoch=self.epoch, events=events)
        task = asyncio.ensure_future(self._publish(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish(self, batch: KvEventBatch) -> None:
        try:
            await self.runtime.publish(self.namespace, self.component, KV_TOPIC, batch)
            self.num_published += len(batch.events)
        except Exception as exc:  # a lost batch is a gap: routers replay it
            log.warning("worker: publishing %d KV events failed: %s", len(batch.events), exc)

    async def replay(self, request: KvReplayRequest, ctx: Any) -> AsyncIterator[KvReplayChunk]:
        """The ``kv_replay`` endpoint handler (see the module docstring)."""
        start = request.from_event_id
        oldest = self.ring[0].event_id if self.ring else self.next_event_id
        if start is not None and oldest <= start <= self.next_event_id:
            events = [e for e in self.ring if e.event_id >= start]
            for chunk in _chunks(events, self.config.max_chunk_bytes):
                yield KvReplayChunk(
                    epoch=self.epoch, next_event_id=self.next_event_id, events=chunk
                )
            if not events:
                yield KvReplayChunk(epoch=self.epoch, next_event_id=self.next_event_id, events=[])
            return
        for chunk in self.dump():
            yield chunk

    def dump(self) -> list[KvReplayChunk]:
        """The local index as chunks (taken in one go: consistent with ``next_event_id``)."""
        stored = [
            KvEvent(-1, 0, Stored(parent, [StoredBlock(h, local)]), tier)
            for tier, blocks in self.blocks.items()
            for h, (parent, local) in blocks.items()
        ]
        head = KvReplayChunk(
            epoch=self.epoch, next_event_id=self.next_event_id, events=[], reset=True
        )
        return [head] + [
            KvReplayChunk(epoch=self.epoch, next_event_id=self.next_event_id, events=chunk)
            for chunk in _chunks(stored, self.config.max_chunk_bytes)
        ]

    def check_integrity(self) -> None:
        """The ring holds consecutive ids ending at ``next_event_id - 1``, at most
        ``ring_size`` of them; the batch not yet published is likewise consecutive."""
        ids = [e.event_id for e in self.ring]
        assert len(ids) <= self.config.ring_size
        assert ids == list(range(self.next_event_id - len(ids), self.next_event_id)), ids[:5]
        pending = [e.event_id for e in self._pending]
        first = self.next_event_id - len(pending)
        assert pending == list(range(first, self.next_event_id)), pending[:5]

    async def close(self) -> None:
        self._flush()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def _wire_size(event: KvEvent) -> int:
    """An upper bound of the event's msgpack size."""
    data = event.data
    if isinstance(data, Stored):
        return _EVENT_WIRE_BYTES + _BLOCK_WIRE_BYTES * len(data.blocks)
    if isinstance(data, Removed):
        return _EVENT_WIRE_BYTES + 9 * len(data.block_hashes)
    return _EVENT_WIRE_BYTES


def _chunks(events: list[KvEvent], max_bytes: int) -> list[list[KvEvent]]:
    """Consecutive runs of ``events`` of at most ``max_bytes`` each (an event bigger than
    that alone goes in a chunk of its own)."""
    chunks: list[list[KvEvent]] = []
    current: list[KvEvent] = []
    size = 0
    for event in events:
        n = _wire_size(event)
        if current and size + n > max_bytes:
            chunks.append(current)
            current, size = [], 0
        current.append(event)
        size += n
    if current:
        chunks.append(current)
    return chunks
