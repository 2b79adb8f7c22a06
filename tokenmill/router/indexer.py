"""KV indexer: which workers hold which blocks, per storage tier, fed by ``KvEvent``s.

Sequence hashes are chained (``core.block_hash``): equal hash at position i means the whole
prefix up to i is equal. So a flat dict ``block hash -> bitmask of worker slots`` answers
"how many leading blocks of this prompt does each worker hold" by walking the prompt's hashes
and narrowing the mask; the walk stops as soon as no worker is left (early exit). A radix tree
buys nothing here, and the dict keeps each lookup at one hash probe per block.

Workers are mapped to bit slots; a slot freed by ``remove_worker`` is reused by the next new
worker. Per worker and tier a set of held hashes is kept so ``Cleared`` and ``remove_worker``
are O(blocks held by that worker), never a scan of the whole index.

Event ids: each worker's events must arrive with ids 0, 1, 2, ... ``apply_event`` returns an
``EventGap`` when an id is not the expected one (the event is still applied); replaying or
dumping a worker's state is the caller's business (runtime issue).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import accumulate, repeat, takewhile
from operator import and_, neg

from tokenmill.core.events import Cleared, KvEvent, KvEventData, Removed, Stored, Tier

TIERS: tuple[Tier, ...] = (Tier.DEVICE, Tier.HOST, Tier.DISK, Tier.REMOTE)


@dataclass(frozen=True)
class EventGap:
    """Events ``expected .. got - 1`` of ``worker_id`` were lost (or ``got`` < ``expected``:
    the worker restarted its numbering)."""

    worker_id: int
    expected: int
    got: int


def _walk_one(block_hashes: Sequence[int], index: dict[int, int]) -> list[tuple[int, int]]:
    """``[(mask, n)]`` for one map, with the per-block loop in C: the running AND of the
    holders' masks stops at the first empty one. A chain of shrinking bit sets never grows
    numerically, so each distinct mask's last position is found by bisection."""
    acc = list(takewhile(bool, accumulate(map(index.get, block_hashes, repeat(0)), and_)))
    ends: list[tuple[int, int]] = []
    i, n = 0, len(acc)
    while i < n:
        mask = acc[i]
        i = bisect_right(acc, -mask, i, n, key=neg)
        ends.append((mask & ~acc[i] if i < n else mask, i))
    return ends


class KvIndexer:
    """Block hash -> workers holding it, one map per tier. Not thread safe; pure bookkeeping."""

    def __init__(self) -> None:
        self._maps: dict[Tier, dict[int, int]] = {t: {} for t in TIERS}
        self._held: dict[tuple[int, Tier], set[int]] = {}
        self._slot: dict[int, int] = {}  # worker id -> bit index
        self._free_slots: list[int] = []
        self._worker_of: list[int] = []  # slot -> worker id
        self._next_event_id: dict[int, int] = {}

    # ---- workers -------------------------------------------------------------------------
    @property
    def workers(self) -> list[int]:
        return list(self._slot)

    def add_worker(self, worker_id: int) -> None:
        """Register a worker (idempotent). Events from unknown workers register them too."""
        if worker_id in self._slot:
            return
        slot = self._free_slots.pop() if self._free_slots else len(self._slot)
        self._slot[worker_id] = slot
        if slot == len(self._worker_of):
            self._worker_of.append(worker_id)
        self._worker_of[slot] = worker_id
        self._next_event_id[worker_id] = 0
        for tier in TIERS:
            self._held[(worker_id, tier)] = set()

    def remove_worker(self, worker_id: int) -> None:
        """Purge every block of ``worker_id`` in every tier and free its slot (no-op if unknown)."""
        if worker_id not in self._slot:
            return
        for tier in TIERS:
            self._drop(worker_id, tier, self._held.pop((worker_id, tier)))
        self._free_slots.append(self._slot.pop(worker_id))
        del self._next_event_id[worker_id]

    def num_blocks(self, worker_id: int, tier: Tier = Tier.DEVICE) -> int:
        """Blocks of ``worker_id`` in ``tier`` (its "cached tree size")."""
        held = self._held.get((worker_id, tier))
        return len(held) if held is not None else 0

    # ---- events --------------------------------------------------------------------------
    def apply_event(self, event: KvEvent) -> EventGap | None:
        """Apply one event; return the gap if its id is not the next expected one."""
        worker = event.worker_id
        self.add_worker(worker)
        expected = self._next_event_id[worker]
        self._next_event_id[worker] = event.event_id + 1
        self.apply_data(worker, event.data, event.tier)
        if event.event_id != expected:
            return EventGap(worker, expected, event.event_id)
        return None

    def apply_data(self, worker_id: int, data: KvEventData, tier: Tier = Tier.DEVICE) -> None:
        """Apply one event's payload to ``worker_id``'s blocks in ``tier`` (no id checks)."""
        if isinstance(data, Stored):
            self.store(worker_id, [b.block_hash for b in data.blocks], tier)
        elif isinstance(data, Removed):
            self.remove(worker_id, data.block_hashes, tier)
        elif isinstance(data, Cleared):
            self.clear(worker_id, tier)

    def store(self, worker_id: int, block_hashes: Sequence[int], tier: Tier = Tier.DEVICE) -> None:
        """Mark ``block_hashes`` as held by ``worker_id`` (idempotent per block)."""
        self.add_worker(worker_id)
        bit = 1 << self._slot[worker_id]
        index = self._maps[tier]
        get = index.get
        held = self._held[(worker_id, tier)]
        for h in block_hashes:
            index[h] = get(h, 0) | bit
        held.update(block_hashes)

    def remove(self, worker_id: int, block_hashes: Iterable[int], tier: Tier = Tier.DEVICE) -> None:
        """Forget ``block_hashes`` of ``worker_id``; unknown hashes are ignored."""
        held = self._held.get((worker_id, tier))
        if held is None:
            return
        gone = []
        for h in block_hashes:
            if h in held:
                held.discard(h)
                gone.append(h)
        self._drop(worker_id, tier, gone)

    def clear(self, worker_id: int, tier: Tier = Tier.DEVICE) -> None:
        """Forget every block of ``worker_id`` in ``tier``."""
        held = self._held.get((worker_id, tier))
        if held is None:
            return
        self._drop(worker_id, tier, held)
        self._held[(worker_id, tier)] = set()

    def _drop(self, worker_id: int, tier: Tier, hashes: Iterable[int]) -> None:
        keep = ~(1 << self._slot[worker_id])
        index = self._maps[tier]
        for h in hashes:
            mask = index[h] & keep
            if mask:
                index[h] = mask
            else:
                del index[h]

    # ---- lookups -------------------------------------------------------------------------
    def find_matches(self, block_hashes: Sequence[int], tier: Tier = Tier.DEVICE) -> dict[int, int]:
        """``{worker: number of leading blocks of block_hashes it holds in tier}``, for workers
        holding at least the first block. Cost: one dict probe per matched position."""
        return self._counts(self._walk(block_hashes, (self._maps[tier],)))

    def find_matches_any_tier(self, block_hashes: Sequence[int]) -> dict[int, int]:
        """Like ``find_matches``, but a block counts when any tier of the worker holds it."""
        return self._counts(self._walk(block_hashes, tuple(self._maps.values())))

    def _walk(
        self, block_hashes: Sequence[int], maps: tuple[dict[int, int], ...]
    ) -> list[tuple[int, int]]:
        """``[(mask, n)]``: workers in ``mask`` hold exactly the first n blocks."""
        ends: list[tuple[int, int]] = []
        if len(maps) == 1:
            return _walk_one(block_hashes, maps[0])
        mask = -1
        for i, h in enumerate(block_hashes):
            held = 0
            for m in maps:
                held |= m.get(h, 0)
            held &= mask
            if held != mask:
                if i:
                    ends.append((mask & ~held, i))
                if not held:
                    return ends
                mask = held
        if block_hashes:
            ends.append((mask, len(block_hashes)))
        return ends

    def _counts(self, ends: list[tuple[int, int]]) -> dict[int, int]:
        out: dict[int, int] = {}
        worker_of = self._worker_of
        for mask, n in ends:
            while mask:
                low = mask & -mask
                out[worker_of[low.bit_length() - 1]] = n
                mask ^= low
        return out

    def check_integrity(self) -> None:
        """Every held set agrees with the bitmask maps (raises AssertionError otherwise)."""
        for tier, index in self._maps.items():
            total = 0
            for worker, slot in self._slot.items():
                held = self._held[(worker, tier)]
                total += len(held)
                bit = 1 << slot
                assert all(index[h] & bit for h in held), f"worker {worker} {tier} map"
            assert total == sum(m.bit_count() for m in index.values()), f"{tier} count"
