"""The contract of an asynchronous block store (disk, remote), used from the tier I/O loop.

A store keeps whole blocks in the ``record`` format (header with block hash, layout
fingerprint and checksum). ``put`` either stores the block or raises ``StoreUnavailable``
(full disk, unreachable server: the caller skips offload for a while and tries again later);
``get`` returns the payload or a ``Miss`` (absent, truncated, wrong block or layout, bad
checksum), never unchecked bytes; it raises ``StoreUnavailable`` only when the store cannot be
asked at all.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

from tokenmill.core.events import Tier
from tokenmill.kvstore.record import Miss


class StoreUnavailable(Exception):
    """The store cannot take or serve blocks right now (full, unreachable, closed)."""


class BlockStore(abc.ABC):
    """One async tier. Coroutines run on one event loop (the tier I/O thread's); a store may
    run blocking calls in its own thread pool but never blocks that loop."""

    tier: Tier

    @abc.abstractmethod
    async def start(self) -> list[tuple[int, int]]:
        """Open or connect. Returns ``(slot, block_hash)`` of valid blocks already stored that
        the placement may adopt (a disk directory left by an earlier run), else []."""

    @abc.abstractmethod
    async def put(self, slot: int, block_hash: int, payload: memoryview) -> None:
        """Store ``payload`` as block ``block_hash`` in ``slot`` (keyed by hash for remote)."""

    @abc.abstractmethod
    async def get(self, slot: int, block_hash: int) -> memoryview | Miss:
        """The payload stored for ``block_hash`` in ``slot``, checked, or why not."""

    async def count_present(self, block_hashes: Sequence[int]) -> int:
        """How many of ``block_hashes``, from the start, the store holds (a probe for blocks
        other workers stored in a shared tier; local stores answer 0)."""
        return 0

    @abc.abstractmethod
    async def close(self) -> None:
        """Release files and connections; idempotent."""
