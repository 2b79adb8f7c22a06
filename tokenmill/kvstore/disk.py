"""The local-disk tier: one sparse file of fixed slots in a directory, read and written with
``os.preadv`` / ``os.pwritev`` in a small thread pool (measured against NIXL's POSIX backend
in ``benchmarks/kv_tiers_bandwidth.py``: see docs/kv_tiers.md for why this path).

    file  <dir>/kv-blocks.bin
    slot  i at offset i * slot_bytes:  [record header (40 B)] [payload (block_bytes)] [pad]
          slot_bytes = header + payload rounded up to 4 KiB (page-aligned slots)

A slot is valid only if its header names the block asked for, this layout's fingerprint, the
expected length, and the payload's checksum matches; a torn or truncated slot, another
model's file, or a slot overwritten since is a miss. ``start`` scans the headers (not the
payloads) so a restarted worker adopts the blocks it left; their checksums are checked when
read. A full disk (``ENOSPC``) or any other write error raises ``StoreUnavailable``: the
caller skips offload for a while and tries again.
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

from tokenmill.core.events import Tier
from tokenmill.kvstore import record
from tokenmill.kvstore.base import BlockStore, StoreUnavailable
from tokenmill.kvstore.record import HEADER_BYTES, Miss

T = TypeVar("T")
FILE_NAME = "kv-blocks.bin"
ALIGN = 4096


def slot_bytes_for(block_bytes: int) -> int:
    return -(-(HEADER_BYTES + block_bytes) // ALIGN) * ALIGN


def num_slots_for(capacity_bytes: int, block_bytes: int) -> int:
    return capacity_bytes // slot_bytes_for(block_bytes)


class DiskStore(BlockStore):
    tier = Tier.DISK

    def __init__(
        self, directory: str, num_blocks: int, block_bytes: int, fingerprint: int, threads: int = 2
    ):
        self.directory = directory
        self.num_blocks = num_blocks
        self.block_bytes = block_bytes
        self.fingerprint = fingerprint
        self.slot_bytes = slot_bytes_for(block_bytes)
        self.path = os.path.join(directory, FILE_NAME)
        self._fd: int | None = None
        self._closed = False
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="kv-disk")

    async def start(self) -> list[tuple[int, int]]:
        return await self._run(self._open_and_scan)

    def _open_and_scan(self) -> list[tuple[int, int]]:
        os.makedirs(self.directory, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        size = os.fstat(self._fd).st_size
        found = []
        record_bytes = HEADER_BYTES + self.block_bytes
        num_whole = (size - record_bytes) // self.slot_bytes + 1 if size >= record_bytes else 0
        for slot in range(min(self.num_blocks, num_whole)):  # records the file holds entirely
            fields = record.parse_header(os.pread(self._fd, HEADER_BYTES, slot * self.slot_bytes))
            if isinstance(fields, Miss):
                continue
            block_hash, fingerprint, length, _ = fields
            if fingerprint == self.fingerprint and length == self.block_bytes:
                found.append((slot, block_hash))
        return found

    async def put(self, slot: int, block_hash: int, payload: memoryview) -> None:
        header = record.encode_header(block_hash, self.fingerprint, payload)
        await self._run(self._write, slot, header, payload)

    def _write(self, slot: int, header: bytes, payload: memoryview) -> None:
        fd = self._require_fd()
        try:
            written = os.pwritev(fd, [header, payload], slot * self.slot_bytes)
        except OSError as exc:
            raise StoreUnavailable(f"disk tier write failed: {exc}") from exc
        if written != len(header) + len(payload):
            raise StoreUnavailable(f"disk tier short write ({written} bytes)")

    async def get(self, slot: int, block_hash: int) -> memoryview | Miss:
        return await self._run(self._read, slot, block_hash)

    def _read(self, slot: int, block_hash: int) -> memoryview | Miss:
        fd = self._require_fd()
        buf = bytearray(HEADER_BYTES + self.block_bytes)
        try:
            num_read = os.preadv(fd, [buf], slot * self.slot_bytes)
        except OSError as exc:
            raise StoreUnavailable(f"disk tier read failed: {exc}") from exc
        if num_read < len(buf):
            return Miss.TRUNCATED
        return record.decode(memoryview(buf), block_hash, self.fingerprint, self.block_bytes)

    def _require_fd(self) -> int:
        if self._fd is None:
            raise StoreUnavailable("disk tier is closed")
        return self._fd

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._closed:
            raise StoreUnavailable("disk tier is closed")
        return await asyncio.get_running_loop().run_in_executor(self._pool, partial(fn, *args))

    async def close(self) -> None:
        """Waits for reads and writes in progress, then closes the file."""
        self._closed = True
        await asyncio.get_running_loop().run_in_executor(None, self._pool.shutdown, True)
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
