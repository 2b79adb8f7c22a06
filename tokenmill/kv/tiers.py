"""Tier placement (pure bookkeeping, no I/O, no clock): which block hashes live in which lower
KV tier (host memory, local disk, a shared remote store), in which slot, and which copies a
device eviction or a write-through store sets off. The bytes move elsewhere (the executor
side of the tier connector, ``tokenmill.kvstore``); it reports back with ``commit``.

Tiers are ordered fastest first (``PlacementConfig.tiers``, e.g. host, disk, remote); each is
an independent LRU cache of at most ``num_blocks`` blocks in slots ``0..num_blocks-1`` (a host
arena slot, a slot of the disk file; the remote store keys by hash, its slot only counts). One
block may sit in several tiers at once. Each entry of a tier is in one of three states::

    writing    slot reserved, bytes in flight         not found by lookup, not evictable
               (disk and remote only: a host entry is ready when planned, its memcpy runs
               before anything can read it)
    ready      bytes valid                            found by lookup; evictable unless pinned
    pinned     ready and being read (an onboard)      found by lookup, not evictable

Data flow (write-back, the default)::

    device eviction of X ──▶ host (if host lacks X) ──▶ host's LRU victim Y ──▶ disk (if disk
    lacks Y) ──▶ disk's LRU victim ──▶ remote ...     (a tier that has X already: LRU touch only)

With ``write_through`` a block entering a tier is also written to every later tier at once, so
an eviction never has to copy. The returned ``Write`` ops must be carried out in list order: a
victim's bytes are read out of its slot before the op that overwrites the slot (host copies are
synchronous memcpys in the executor; writes into async tiers take a snapshot first).

Async writes and reads (disk and remote; host copies are synchronous) count against ``max_bytes_in_flight``: a
write that would exceed it is dropped (``Write`` not issued, a ``dropped`` count), an onboard
that would exceed it is not planned (``reserve`` is False; the caller recomputes or retries).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum

from tokenmill.core.events import Tier


@dataclass(frozen=True)
class TierConfig:
    tier: Tier
    num_blocks: int

    def __post_init__(self) -> None:
        if self.tier is Tier.DEVICE:
            raise ValueError("the device tier is the block pool, not a placement tier")
        if self.num_blocks < 1:
            raise ValueError(f"{self.tier} tier needs at least 1 block, got {self.num_blocks}")


@dataclass(frozen=True)
class PlacementConfig:
    """``tiers``: fastest first, each tier at most once. ``block_bytes``: the size of one
    stored block (all layers' K and V). The host tier is synchronous (memcpys on the engine
    thread); disk and remote transfers are asynchronous and count against
    ``max_bytes_in_flight``."""

    tiers: tuple[TierConfig, ...]
    block_bytes: int
    write_through: bool = False
    max_bytes_in_flight: int = 256 << 20

    def __post_init__(self) -> None:
        names = [t.tier for t in self.tiers]
        if not names:
            raise ValueError("placement needs at least one tier")
        if len(set(names)) != len(names):
            raise ValueError(f"a tier appears twice: {[str(n) for n in names]}")
        if self.block_bytes < 1 or self.max_bytes_in_flight < self.block_bytes:
            raise ValueError("max_bytes_in_flight must hold at least one block")


class State(Enum):
    WRITING = "writing"
    READY = "ready"


@dataclass
class _Entry:
    slot: int
    state: State
    pins: int = 0


@dataclass(frozen=True)
class Write:
    """Copy block ``block_hash`` from ``src`` (slot ``src_slot``; for the device tier the
    device block id) into slot ``dst_slot`` of ``dst``, then ``commit(dst, block_hash, ok)``."""

    block_hash: int
    src: Tier
    src_slot: int
    dst: Tier
    dst_slot: int


@dataclass(frozen=True)
class Hit:
    """Block ``block_hash`` is ready in ``tier``, slot ``slot``."""

    block_hash: int
    tier: Tier
    slot: int


@dataclass
class TierCounters:
    """Per-tier counts since start (blocks): lookups answered by this tier, blocks written
    (committed ok), writes failed, writes dropped (cap or nothing evictable), evictions,
    entries forgotten as invalid."""

    hits: int = 0
    stored: int = 0
    failed: int = 0
    dropped: int = 0
    evicted: int = 0
    invalid: int = 0


@dataclass
class _TierState:
    config: TierConfig
    entries: dict[int, _Entry] = field(default_factory=dict)  # hash -> entry
    lru: OrderedDict[int, None] = field(default_factory=OrderedDict)  # ready hashes, LRU first
    free_slots: deque[int] = field(default_factory=deque)
    counters: TierCounters = field(default_factory=TierCounters)


class TierPlacement:
    """The placement of blocks in the lower tiers of one worker. Not thread-safe."""

    def __init__(self, config: PlacementConfig):
        self.config = config
        self._tiers: dict[Tier, _TierState] = {}
        for tc in config.tiers:
            self._tiers[tc.tier] = _TierState(tc, free_slots=deque(range(tc.num_blocks)))
        self._order = [tc.tier for tc in config.tiers]
        self.bytes_in_flight = 0
        # (tier, block hash, True: became ready / False: left) in order, for KV events;
        # the owner drains it (``take_changes``)
        self._changes: list[tuple[Tier, int, bool]] = []

    # ------------------------------------------------------------------ queries

    @property
    def tiers(self) -> list[Tier]:
        return list(self._order)

    def num_blocks(self, tier: Tier) -> int:
        return self._tiers[tier].config.num_blocks

    def num_used_blocks(self, tier: Tier) -> int:
        """Entries of the tier, writing or ready."""
        return len(self._tiers[tier].entries)

    def counters(self, tier: Tier) -> TierCounters:
        return self._tiers[tier].counters

    def contains(self, tier: Tier, block_hash: int) -> bool:
        """Whether ``block_hash`` is ready in ``tier``."""
        entry = self._tiers[tier].entries.get(block_hash)
        return entry is not None and entry.state is State.READY

    def hashes(self, tier: Tier) -> set[int]:
        """The ready hashes of a tier (for tests and state dumps)."""
        t = self._tiers[tier]
        return {h for h, e in t.entries.items() if e.state is State.READY}

    def lookup(self, block_hashes: Sequence[int]) -> list[Hit]:
        """The longest run of ``block_hashes`` from its start whose every block is ready in
        some tier; each block from the fastest tier holding it. Changes nothing (see
        ``touch`` and ``pin``)."""
        hits: list[Hit] = []
        for block_hash in block_hashes:
            hit = self._find(block_hash)
            if hit is None:
                break
            hits.append(hit)
        return hits

    def _find(self, block_hash: int) -> Hit | None:
        for tier in self._order:
            entry = self._tiers[tier].entries.get(block_hash)
            if entry is not None and entry.state is State.READY:
                return Hit(block_hash, tier, entry.slot)
        return None

    def take_changes(self) -> list[tuple[Tier, int, bool]]:
        """Entries that became ready (True) or left a tier (False) since the last call."""
        out, self._changes = self._changes, []
        return out

    def is_async(self, tier: Tier) -> bool:
        """Disk and remote transfers are asynchronous (they count in flight); host copies are
        memcpys done within the step."""
        return tier is not Tier.HOST

    # ------------------------------------------------------------------ reads (onboard)

    def reserve(self, num_bytes: int) -> bool:
        """Count ``num_bytes`` of an async transfer in flight; False (and nothing counted)
        if the cap would be exceeded while something is already in flight (a lone transfer
        larger than the cap is allowed, so it can never starve)."""
        if self.bytes_in_flight and self.bytes_in_flight + num_bytes > (
            self.config.max_bytes_in_flight
        ):
            return False
        self.bytes_in_flight += num_bytes
        return True

    def unreserve(self, num_bytes: int) -> None:
        if num_bytes > self.bytes_in_flight:
            raise ValueError("unreserve of more bytes than are in flight")
        self.bytes_in_flight -= num_bytes

    def pin(self, hits: Iterable[Hit]) -> None:
        """Keep the hit entries from eviction while they are read; counts a hit per block
        and makes each the most recently used of its tier (promotion: a block read back
        stays longest). Pin each at most once per read; ``unpin`` afterwards."""
        for hit in hits:
            t = self._tiers[hit.tier]
            entry = t.entries[hit.block_hash]
            if entry.state is not State.READY or entry.slot != hit.slot:
                raise KeyError(f"{hit} is not ready in {hit.tier}")
            entry.pins += 1
            t.lru.move_to_end(hit.block_hash)
            t.counters.hits += 1

    def unpin(self, hits: Iterable[Hit]) -> None:
        """Undo ``pin``; an entry forgotten meanwhile (``invalidate``) is skipped."""
        for hit in hits:
            entry = self._tiers[hit.tier].entries.get(hit.block_hash)
            if entry is not None and entry.slot == hit.slot and entry.pins > 0:
                entry.pins -= 1

    def invalidate(self, tier: Tier, block_hash: int) -> None:
        """Forget a ready entry whose bytes proved wrong (checksum, fingerprint, truncated
        file, missing in the store); its slot is free at once (the bytes are useless; a
        pending read of them fails its check too). An entry still being written is kept."""
        t = self._tiers[tier]
        entry = t.entries.get(block_hash)
        if entry is None or entry.state is not State.READY:
            return
        del t.entries[block_hash], t.lru[block_hash]
        t.free_slots.append(entry.slot)
        t.counters.invalid += 1
        self._changes.append((tier, block_hash, False))

    # ------------------------------------------------------------------ writes (offload)

    def offload(self, block_hash: int, device_block: int) -> list[Write]:
        """Plan the copies for device block ``device_block`` holding ``block_hash``, which
        the device pool is about to evict (write-back) or has just cached (write-through).
        Returns the writes to carry out in order; an empty list when the first tier has the
        block already (it becomes most recently used) or nothing can make room."""
        return self._store(self._order[0], block_hash, Tier.DEVICE, device_block)

    def adopt(self, tier: Tier, slot: int, block_hash: int) -> bool:
        """Take a block found valid in ``slot`` of ``tier`` (a restarted worker scanning its
        disk) as ready and most recently used; False if the slot is taken or the hash known."""
        t = self._tiers[tier]
        if block_hash in t.entries or slot not in t.free_slots:
            return False
        t.free_slots.remove(slot)
        t.entries[block_hash] = _Entry(slot, State.READY)
        t.lru[block_hash] = None
        self._changes.append((tier, block_hash, True))
        return True

    def commit(self, tier: Tier, block_hash: int, ok: bool) -> None:
        """A ``Write`` into an async ``tier`` finished: ``ok`` makes the entry ready (most
        recently used), else its slot is freed (a failed write is a miss later, never wrong
        data); its bytes in flight are released. Host writes need no commit: their entries
        are ready when planned. An unknown entry is a ValueError."""
        t = self._tiers[tier]
        entry = t.entries.get(block_hash)
        if entry is None or entry.state is not State.WRITING:
            raise ValueError(f"no write of {block_hash} in flight to {tier}")
        self.unreserve(self.config.block_bytes)
        if ok:
            entry.state = State.READY
            t.lru[block_hash] = None
            t.counters.stored += 1
            self._changes.append((tier, block_hash, True))
        else:
            del t.entries[block_hash]
            t.free_slots.append(entry.slot)
            t.counters.failed += 1

    def _store(self, tier: Tier, block_hash: int, src: Tier, src_slot: int) -> list[Write]:
        t = self._tiers[tier]
        if block_hash in t.entries:
            if t.entries[block_hash].state is State.READY:
                t.lru.move_to_end(block_hash)
            return []
        if self.is_async(tier) and not self.reserve(self.config.block_bytes):
            t.counters.dropped += 1
            return []
        writes: list[Write] = []
        slot = self._free_slot(tier, writes)
        if slot is None:
            if self.is_async(tier):
                self.unreserve(self.config.block_bytes)
            t.counters.dropped += 1
            return writes
        if self.is_async(tier):
            t.entries[block_hash] = _Entry(slot, State.WRITING)
        else:  # a host copy: done by the executor in write order, before anything reads it
            t.entries[block_hash] = _Entry(slot, State.READY)
            t.lru[block_hash] = None
            t.counters.stored += 1
            self._changes.append((tier, block_hash, True))
        writes.append(Write(block_hash, src, src_slot, tier, slot))
        nxt = self._next(tier)
        if self.config.write_through and nxt is not None:
            writes.extend(self._store(nxt, block_hash, tier, slot))
        return writes

    def _free_slot(self, tier: Tier, writes: list[Write]) -> int | None:
        """A free slot of ``tier``, evicting its least recently used unpinned ready entry if
        needed; the victim's demotion writes (write-back) go into ``writes`` first."""
        t = self._tiers[tier]
        if t.free_slots:
            return t.free_slots.popleft()
        victim = next((h for h in t.lru if t.entries[h].pins == 0), None)
        if victim is None:
            return None
        entry = t.entries.pop(victim)
        del t.lru[victim]
        t.counters.evicted += 1
        self._changes.append((tier, victim, False))
        nxt = self._next(tier)
        if nxt is not None and not self.config.write_through:
            writes.extend(self._store(nxt, victim, tier, entry.slot))
        return entry.slot

    def _next(self, tier: Tier) -> Tier | None:
        i = self._order.index(tier) + 1
        return self._order[i] if i < len(self._order) else None

    # ------------------------------------------------------------------ integrity

    def check_integrity(self) -> None:
        """Raise ``AssertionError`` unless, per tier: entries + free slots == capacity with
        every slot used once, the LRU holds exactly the ready entries, no negative pins; and
        the bytes in flight equal one block per async write in flight."""
        num_writing = 0
        for tier, t in self._tiers.items():
            slots = [e.slot for e in t.entries.values()] + list(t.free_slots)
            _ensure(sorted(slots) == list(range(t.config.num_blocks)), f"{tier}: slots")
            ready = {h for h, e in t.entries.items() if e.state is State.READY}
            _ensure(set(t.lru) == ready and len(t.lru) == len(ready), f"{tier}: lru")
            _ensure(all(e.pins >= 0 for e in t.entries.values()), f"{tier}: pins")
            _ensure(
                all(e.pins == 0 for e in t.entries.values() if e.state is State.WRITING),
                f"{tier}: a writing entry is pinned",
            )
            if self.is_async(tier):
                num_writing += len(t.entries) - len(ready)
        _ensure(self.bytes_in_flight >= num_writing * self.config.block_bytes, "bytes in flight")


def _ensure(ok: bool, message: str) -> None:
    if not ok:
        raise AssertionError(f"TierPlacement integrity: {message}")
