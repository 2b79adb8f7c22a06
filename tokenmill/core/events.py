"""KV cache events (ARCHITECTURE.md, "KV events"), the wire contract between engines and routers.

``Stored`` when full blocks enter a worker's prefix cache, ``Removed`` when cached blocks are
evicted (not when their ref count drops to zero), ``Cleared`` on reset. Each ``KvEvent`` has a
per-worker monotonically increasing ``event_id`` so a router can detect gaps.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

import msgspec

EVENTS_VERSION = 1


class Tier(enum.StrEnum):
    DEVICE = "device"
    HOST = "host"
    DISK = "disk"
    REMOTE = "remote"


class StoredBlock(msgspec.Struct, frozen=True, array_like=True):
    block_hash: int  # sequence (chained) hash: the prefix-cache key
    local_hash: int  # hash of this block's tokens alone


class Stored(msgspec.Struct, frozen=True, tag="stored"):
    parent_hash: int | None  # sequence hash of the block before blocks[0]; None at the root
    blocks: list[StoredBlock]


class Removed(msgspec.Struct, frozen=True, tag="removed"):
    block_hashes: list[int]


class Cleared(msgspec.Struct, frozen=True, tag="cleared"):
    pass


KvEventData = Stored | Removed | Cleared


class KvEvent(msgspec.Struct, frozen=True):
    event_id: int
    worker_id: int
    data: KvEventData
    tier: Tier = Tier.DEVICE
    version: int = EVENTS_VERSION


KvEventSink = Callable[[KvEventData], None]
"""Where a block pool reports what entered or left its prefix cache (ids are added later)."""


def null_sink(_: KvEventData) -> None:
    """A sink that drops events: for pools nobody routes to."""


class EventNumberer:
    """Wraps pool events into ``KvEvent``s with consecutive ids and forwards them.

    ``event_id`` starts at 0 and increases by exactly one per event, so a gap is a lost event.
    """

    def __init__(
        self, worker_id: int, publish: Callable[[KvEvent], None], tier: Tier = Tier.DEVICE
    ):
        self.worker_id = worker_id
        self.tier = tier
        self.next_event_id = 0
        self._publish = publish

    def __call__(self, data: KvEventData) -> None:
        event = KvEvent(self.next_event_id, self.worker_id, data, self.tier)
        self.next_event_id += 1
        self._publish(event)
