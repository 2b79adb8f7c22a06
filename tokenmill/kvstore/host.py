"""The host-memory tier: a fixed arena of ``num_blocks`` slots of ``block_bytes`` each.

The executor copies a device block straight into ``slot_view(slot)`` and out of it (on CUDA
the arena is pinned memory it allocates itself and passes in; on the CPU a plain numpy
buffer). Copies are synchronous memcpys on the engine thread, in the order the placement's
writes give them. Each slot records the block hash it holds; a read of a slot that holds
another block is a miss. Memory of this process neither truncates nor goes stale, so the
host tier carries no checksum or fingerprint (disk and remote records do).
"""

from __future__ import annotations

import numpy as np

from tokenmill.kvstore.record import Miss

EMPTY = -1


class HostStore:
    """``buffer``: a writable uint8 array of ``num_blocks * block_bytes`` (None: allocate)."""

    def __init__(self, num_blocks: int, block_bytes: int, buffer: np.ndarray | None = None):
        if buffer is None:
            buffer = np.empty(num_blocks * block_bytes, dtype=np.uint8)
        if buffer.dtype != np.uint8 or buffer.size != num_blocks * block_bytes:
            raise ValueError("host buffer must be uint8 of num_blocks * block_bytes")
        self.num_blocks = num_blocks
        self.block_bytes = block_bytes
        self.arena = buffer.reshape(num_blocks, block_bytes)  # [num_blocks, block_bytes]
        self._hashes = [EMPTY] * num_blocks

    @property
    def num_bytes(self) -> int:
        return self.num_blocks * self.block_bytes

    def slot_view(self, slot: int) -> np.ndarray:
        """The slot's bytes ([block_bytes] uint8), to copy a block into or out of."""
        view: np.ndarray = self.arena[slot]
        return view

    def mark(self, slot: int, block_hash: int) -> None:
        """Record that ``slot`` now holds ``block_hash`` (after the copy into it)."""
        self._hashes[slot] = block_hash

    def write(self, slot: int, block_hash: int, payload: memoryview | np.ndarray) -> None:
        self.arena[slot] = np.frombuffer(payload, dtype=np.uint8)
        self._hashes[slot] = block_hash

    def read(self, slot: int, block_hash: int) -> np.ndarray | Miss:
        """The slot's bytes if it holds ``block_hash`` (a view: copy before the slot is reused)."""
        if self._hashes[slot] != block_hash:
            return Miss.WRONG_BLOCK
        view: np.ndarray = self.arena[slot]
        return view
