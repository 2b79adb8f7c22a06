"""A fixed pool of KV blocks with ref counts, an LRU free queue and a prefix cache.

Blocks are plain ints ``0..num_blocks-1``. Every block is in exactly one of three states::

    used          ref > 0      held by one or more requests (cached or not)
    free, plain   ref == 0     no hash: reused first, in the order it was freed (FIFO)
    free, cached  ref == 0     has a hash: reusable KV, evicted only when no plain block is
                               left, least recently freed first (LRU)

The prefix cache maps a chained block hash (``tokenmill.core.block_hash``; never hashed any
other way) to the one block holding it. A cached block stays cached while used and after its
ref count drops to 0, until it is evicted for reuse (``Removed``) or the pool is reset
(``Cleared``). ``Stored`` is emitted when full blocks enter the cache. Events go to the
``KvEventSink`` given at construction; numbering them is the sink's job.

Callers free a request's blocks in the order they should be evicted: the manager passes them
tail first, so a finished request's last block goes before its shared prefix.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from typing import cast

from tokenmill.core.events import Cleared, KvEventSink, Removed, Stored, StoredBlock, null_sink


class BlockPool:
    """Ref-counted KV blocks and the prefix cache over them. Not thread-safe."""

    def __init__(self, num_blocks: int, event_sink: KvEventSink = null_sink):
        if num_blocks < 1:
            raise ValueError("num_blocks must be at least 1")
        self.num_blocks = num_blocks
        self._sink = event_sink
        self._ref = [0] * num_blocks
        self._hash: list[int | None] = [None] * num_blocks
        self._free_plain: deque[int] = deque(range(num_blocks))
        self._free_cached: OrderedDict[int, None] = OrderedDict()  # block id, LRU first
        self._cache: dict[int, int] = {}  # block hash -> block id
        # called with (block ids, their hashes) as cached blocks are evicted for reuse, before
        # ``Removed``; the ids are handed out right after (a KV tier copies them out first)
        self.evict_hook: Callable[[list[int], list[int]], None] | None = None

    # ------------------------------------------------------------------ queries

    @property
    def num_free_blocks(self) -> int:
        """Blocks ``allocate`` can hand out now (plain free + cached free)."""
        return len(self._free_plain) + len(self._free_cached)

    @property
    def num_used_blocks(self) -> int:
        """Blocks referenced by at least one request."""
        return self.num_blocks - len(self._free_plain) - len(self._free_cached)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks in the prefix cache, used or free."""
        return len(self._cache)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by requests (cached-but-free blocks do not count)."""
        return self.num_used_blocks / self.num_blocks

    def ref_count(self, block_id: int) -> int:
        return self._ref[block_id]

    def block_hash(self, block_id: int) -> int | None:
        """The hash a block is cached under, None when it is not in the cache."""
        return self._hash[block_id]

    def get_cached_block(self, block_hash: int) -> int | None:
        """The block caching ``block_hash``, or None. Does not touch it."""
        return self._cache.get(block_hash)

    def cached_hashes(self) -> set[int]:
        """Every hash in the prefix cache (for tests and state dumps)."""
        return set(self._cache)

    def free_queue(self) -> list[int]:
        """Free blocks in the order ``allocate`` takes them (plain first, then LRU cached)."""
        return [*self._free_plain, *self._free_cached]

    # ------------------------------------------------------------------ mutations

    def allocate(self, num_blocks: int) -> list[int]:
        """Take ``num_blocks`` free blocks, each with ref count 1 and no hash.

        Plain free blocks go first; then cached free blocks are evicted in LRU order, which
        emits one ``Removed`` with their hashes. Raises ``ValueError`` if too few are free.
        """
        if num_blocks > self.num_free_blocks:
            raise ValueError(f"cannot allocate {num_blocks} blocks: {self.num_free_blocks} free")
        plain, ref = self._free_plain, self._ref
        out = [plain.popleft() for _ in range(min(num_blocks, len(plain)))]
        if len(out) < num_blocks:
            out.extend(self._evict(num_blocks - len(out)))
        for block_id in out:
            ref[block_id] = 1
        return out

    def _evict(self, num_blocks: int) -> list[int]:
        evicted: list[int] = []
        hashes: list[int] = []
        for _ in range(num_blocks):
            block_id, _ = self._free_cached.popitem(last=False)
            block_hash = cast(int, self._hash[block_id])  # a cached block always has a hash
            del self._cache[block_hash]
            self._hash[block_id] = None
            evicted.append(block_id)
            hashes.append(block_hash)
        if self.evict_hook is not None:
            self.evict_hook(evicted, hashes)
        self._sink(Removed(hashes))
        return evicted

    def touch(self, block_ids: Iterable[int]) -> None:
        """Add a reference to each block (a prefix-cache hit); free ones leave the free queue."""
        ref = self._ref
        for block_id in block_ids:
            if ref[block_id] == 0:
                del self._free_cached[block_id]  # a hit block is always cached
            ref[block_id] += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference from each block, in eviction order: a block whose count reaches
        0 joins the back of its free queue, so the first one given is reused first."""
        ref, hashes = self._ref, self._hash
        for block_id in block_ids:
            count = ref[block_id] - 1
            if count < 0:
                raise ValueError(f"block {block_id} freed more often than allocated")
            ref[block_id] = count
            if count == 0:
                if hashes[block_id] is None:
                    self._free_plain.append(block_id)
                else:
                    self._free_cached[block_id] = None

    def cache_blocks(
        self,
        block_ids: Sequence[int],
        block_hashes: Sequence[int],
        local_hashes: Sequence[int],
        parent_hash: int | None,
    ) -> None:
        """Enter full, used blocks into the prefix cache and emit ``Stored`` for them.

        ``block_hashes[i]`` is the chained hash of ``block_ids[i]``; consecutive blocks of one
        chain whose parent is ``parent_hash``. A hash already cached under another block is
        skipped (that block stays uncached and is reused without eviction when freed); each
        run of newly cached blocks is one ``Stored`` event carrying its own parent hash.
        """
        run: list[StoredBlock] = []
        run_parent = parent_hash
        for i, block_id in enumerate(block_ids):
            block_hash = block_hashes[i]
            if block_hash in self._cache or self._hash[block_id] is not None:
                self._emit_stored(run_parent, run)
                run, run_parent = [], block_hash
                continue
            self._cache[block_hash] = block_id
            self._hash[block_id] = block_hash
            run.append(StoredBlock(block_hash, local_hashes[i]))
        self._emit_stored(run_parent, run)

    def _emit_stored(self, parent_hash: int | None, blocks: list[StoredBlock]) -> None:
        if blocks:
            self._sink(Stored(parent_hash, blocks))

    def reset(self) -> None:
        """Empty the prefix cache and emit ``Cleared``. Used blocks stay allocated (uncached);
        cached free blocks become plain free blocks, in their LRU order."""
        for block_id in self._cache.values():
            self._hash[block_id] = None
        self._free_plain.extend(self._free_cached)
        self._free_cached.clear()
        self._cache.clear()
        self._sink(Cleared())

    # ------------------------------------------------------------------ integrity

    def check_integrity(self) -> None:
        """Raise ``AssertionError`` unless the pool's bookkeeping is consistent (O(num_blocks)):
        free + used == total, no negative ref counts, each free block in exactly one free queue
        with ref 0, plain free blocks uncached, cached free blocks cached, and the cache map and
        the per-block hashes agree both ways."""
        ref, hashes = self._ref, self._hash
        plain, cached = list(self._free_plain), list(self._free_cached)
        free = plain + cached
        _ensure(min(ref) >= 0, "negative ref count")
        _ensure(len(set(free)) == len(free), "a block is in the free queue twice")
        num_used = sum(1 for r in ref if r > 0)
        _ensure(num_used + len(free) == self.num_blocks, "free + used != total")
        _ensure(all(ref[b] == 0 for b in free), "a free block has references")
        _ensure(all(hashes[b] is None for b in plain), "a plain free block has a hash")
        _ensure(all(hashes[b] is not None for b in cached), "a cached free block has no hash")
        for block_hash, block_id in self._cache.items():
            _ensure(hashes[block_id] == block_hash, f"cache maps {block_hash} to a wrong block")
        num_hashed = sum(1 for h in hashes if h is not None)
        _ensure(num_hashed == len(self._cache), "a block has a hash the cache does not map")


def _ensure(ok: bool, message: str) -> None:
    if not ok:
        raise AssertionError(f"BlockPool integrity: {message}")
