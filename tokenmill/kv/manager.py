"""Per-request facade over the ``BlockPool``: block tables, prefix lookup, incremental caching.

Token position -> KV slot (B = block_size; the block table is ``get_block_ids(request_id)``)::

    positions   0 ......... B-1 | B ........ 2B-1 | 2B ...... 3B-1 | ...
    table idx          0        |        1        |        2        |
    block id       table[0]     |    table[1]     |    table[2]     |
    position p  ->  block table[p // B], offset p % B, flat slot table[p // B] * B + p % B

A request's table always covers ``num_computed_tokens + tokens scheduled this step``; its first
``num_cached_blocks`` entries are in the prefix cache (hits taken at admission, then every
block that became full once computed: prompt blocks during prefill and output blocks during
decode, so the next turn of a conversation hits them too).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from tokenmill.core.events import KvEventSink, null_sink
from tokenmill.kv.block_pool import BlockPool


class KVRequest(Protocol):
    """What the manager reads from a request (``tokenmill.engine.request.Request`` fits)."""

    request_id: str
    num_computed_tokens: int
    block_hashes: list[int]  # chained hash of each full block of the request's known tokens
    local_hashes: list[int]

    @property
    def num_tokens(self) -> int: ...


class KVCacheManager:
    """Allocates and frees the blocks of requests; owns the pool. Not thread-safe.

    With ``enable_caching=False`` nothing is looked up or cached (requests need no hashes).
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_caching: bool = True,
        event_sink: KvEventSink = null_sink,
    ):
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, event_sink)
        self._blocks: dict[str, list[int]] = {}  # request id -> block table
        self.block_tables: Mapping[str, list[int]] = self._blocks  # read-only, for hot loops
        self._num_cached: dict[str, int] = {}  # request id -> leading blocks in the cache
        self._held: dict[str, list[int]] = {}  # finished request id -> table held for a transfer

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.pool.num_used_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    def get_block_ids(self, request_id: str) -> list[int]:
        """The request's live block table (empty if it holds none). Do not mutate it."""
        return self._blocks.get(request_id, [])

    def get_computed_blocks(self, request: KVRequest) -> tuple[list[int], int]:
        """The longest cached prefix of a request that holds no blocks: ``(blocks, tokens)``.

        Never the whole sequence: at most ``num_tokens - 1`` tokens, so at least one is
        computed and the last position's logits exist. Takes no references (see
        ``allocate_slots``) and counts nothing.
        """
        if not self.enable_caching:
            return [], 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        cache_get = self.pool.get_cached_block
        blocks: list[int] = []
        for block_hash in request.block_hashes[:max_blocks]:
            block_id = cache_get(block_hash)
            if block_id is None:
                break
            blocks.append(block_id)
        return blocks, len(blocks) * self.block_size

    def allocate_slots(
        self,
        request: KVRequest,
        num_new_tokens: int,
        computed_blocks: Sequence[int] = (),
        num_reserved_blocks: int = 0,
    ) -> list[int] | None:
        """Grow the request's table to cover ``num_new_tokens`` more tokens; None if it cannot.

        ``computed_blocks`` (from ``get_computed_blocks``, only when the request holds no
        blocks yet) are prefix hits placed before the new tokens: the table then covers
        ``num_computed_tokens + len(computed_blocks) * B + num_new_tokens``. The call fails,
        changing nothing, unless ``num_reserved_blocks`` would stay free afterwards (the
        admission watermark). Returns the newly allocated blocks (maybe none).
        """
        table = self._blocks.get(request.request_id)
        num_held = len(table) if table else 0
        num_tokens = (
            request.num_computed_tokens + len(computed_blocks) * self.block_size + num_new_tokens
        )
        num_needed = -(-num_tokens // self.block_size) - num_held - len(computed_blocks)
        if num_needed <= 0 and not computed_blocks:
            return []
        pool = self.pool
        num_revived = sum(1 for b in computed_blocks if pool.ref_count(b) == 0)
        if max(num_needed, 0) + num_revived + num_reserved_blocks > pool.num_free_blocks:
            return None
        if table is None:
            table = self._blocks[request.request_id] = []
        if computed_blocks:
            pool.touch(computed_blocks)
            table.extend(computed_blocks)
            self._num_cached[request.request_id] = len(computed_blocks)
        new_blocks = pool.allocate(num_needed) if num_needed > 0 else []
        table.extend(new_blocks)
        return new_blocks

    def cache_full_blocks(self, request: KVRequest) -> None:
        """Cache the request's blocks made full by its computed tokens and not cached yet
        (one ``Stored`` event per call, or a few if another request cached some first).
        Call after advancing ``num_computed_tokens``; O(1) when no block became full."""
        if not self.enable_caching:
            return
        request_id = request.request_id
        num_full = request.num_computed_tokens // self.block_size
        start = self._num_cached.get(request_id, 0)
        if num_full <= start:
            return
        hashes = request.block_hashes
        self.pool.cache_blocks(
            self._blocks[request_id][start:num_full],
            hashes[start:num_full],
            request.local_hashes[start:num_full],
            hashes[start - 1] if start else None,
        )
        self._num_cached[request_id] = num_full

    def free(self, request_id: str) -> None:
        """Release every block of the request, tail first (its last block is evicted first,
        its shared prefix last). A request holding no blocks is a no-op."""
        table = self._blocks.pop(request_id, None)
        self._num_cached.pop(request_id, None)
        if table:
            self.pool.free(reversed(table))

    def hold(self, request_id: str) -> None:
        """Move the request's table to the held tables: its blocks stay referenced (not
        evictable, not reusable) until ``release``; the request holds no table any more, so
        ``get_block_ids`` is empty. Raises ``KeyError`` if it is already held."""
        if request_id in self._held:
            raise KeyError(f"blocks of request {request_id!r} are already held")
        table = self._blocks.pop(request_id, None)
        self._num_cached.pop(request_id, None)
        if table:
            self._held[request_id] = table

    def release(self, request_id: str) -> bool:
        """Free a held table as ``free`` would; False (a no-op) if none is held for the id."""
        table = self._held.pop(request_id, None)
        if table is None:
            return False
        self.pool.free(reversed(table))
        return True

    def is_held(self, request_id: str) -> bool:
        return request_id in self._held

    @property
    def held_request_ids(self) -> list[str]:
        return list(self._held)

    @property
    def num_held_blocks(self) -> int:
        """Blocks in held tables (a block shared by two tables counts twice)."""
        return sum(len(table) for table in self._held.values())

    @property
    def has_held(self) -> bool:
        return bool(self._held)

    def reset_prefix_cache(self) -> None:
        """Empty the prefix cache (``Cleared``); running requests keep their blocks and do
        not re-cache the blocks they already had cached."""
        self.pool.reset()

    def check_integrity(self) -> None:
        """The pool's check, plus: every used block's ref count equals the number of tables
        (requests' and held ones) that hold it."""
        self.pool.check_integrity()
        holders: dict[int, int] = {}
        for table in (*self._blocks.values(), *self._held.values()):
            for block_id in table:
                holders[block_id] = holders.get(block_id, 0) + 1
        for block_id, count in holders.items():
            if self.pool.ref_count(block_id) != count:
                raise AssertionError(f"KVCacheManager integrity: block {block_id} ref count")
        if self.pool.num_used_blocks != len(holders):
            raise AssertionError("KVCacheManager integrity: a used block belongs to no request")
