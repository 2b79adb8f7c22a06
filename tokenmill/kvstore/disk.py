"""The local-disk tier: one sparse file of fixed slots in a directory.

    file  <dir>/kv-blocks.bin
    slot  i at offset i * slot_bytes:  [record header (40 B)] [payload (block_bytes)] [pad]
          slot_bytes = header + payload rounded up to 4 KiB (page-aligned slots)

Puts and gets that arrive while the file engine is busy are coalesced: one thread call
writes (or reads) every pending record in one batch, so a burst of evictions costs one hop to
the I/O thread, not one per block. The engine (``file_io.FILE_IO``: ``posix`` preadv/pwritev,
or ``nixl``, NIXL's POSIX backend) is chosen by name; ``DEFAULT_FILE_IO`` is the one measured
faster (benchmarks/kv_tiers_bandwidth.py, docs/kv_tiers.md).

A slot is valid only if its header names the block asked for, this layout's fingerprint, the
expected length, and the payload's checksum matches; a torn or truncated slot, another
model's file, or a slot overwritten since is a miss. ``start`` scans the headers (not the
payloads) so a restarted worker adopts the blocks it left; their checksums are checked when
read. A full disk (``ENOSPC``) or any other I/O error raises ``StoreUnavailable`` for every
record of the failed batch: the caller skips offload for a while and tries again.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

from tokenmill.core.events import Tier
from tokenmill.kvstore import record
from tokenmill.kvstore.base import BlockStore, StoreUnavailable
from tokenmill.kvstore.file_io import FILE_IO
from tokenmill.kvstore.record import HEADER_BYTES, Miss

T = TypeVar("T")
FILE_NAME = "kv-blocks.bin"
ALIGN = 4096
DEFAULT_FILE_IO = "posix"  # measured faster at the tier (docs/kv_tiers.md)


def slot_bytes_for(block_bytes: int) -> int:
    return -(-(HEADER_BYTES + block_bytes) // ALIGN) * ALIGN


def num_slots_for(capacity_bytes: int, block_bytes: int) -> int:
    return capacity_bytes // slot_bytes_for(block_bytes)


class DiskStore(BlockStore):
    tier = Tier.DISK

    def __init__(
        self,
        directory: str,
        num_blocks: int,
        block_bytes: int,
        fingerprint: int,
        file_io: str = DEFAULT_FILE_IO,
    ):
        if file_io not in FILE_IO:
            raise ValueError(f"file_io must be one of {sorted(FILE_IO)}: {file_io!r}")
        self.directory = directory
        self.num_blocks = num_blocks
        self.block_bytes = block_bytes
        self.fingerprint = fingerprint
        self.file_io_name = file_io
        self.slot_bytes = slot_bytes_for(block_bytes)
        self.path = os.path.join(directory, FILE_NAME)
        self._engine: Any = None
        self._closed = False
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kv-disk")
        self._writes: list[tuple[int, list[Any], asyncio.Future[None]]] = []
        self._reads: list[tuple[int, int, asyncio.Future[memoryview | Miss]]] = []
        self._flushing = False

    async def start(self) -> list[tuple[int, int]]:
        return await self._run(self._open_and_scan)

    def _open_and_scan(self) -> list[tuple[int, int]]:
        os.makedirs(self.directory, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        record_bytes = HEADER_BYTES + self.block_bytes
        self._engine = FILE_IO[self.file_io_name](
            fd, self.num_blocks * self.slot_bytes, record_bytes
        )
        size = os.fstat(fd).st_size
        num_whole = (size - record_bytes) // self.slot_bytes + 1 if size >= record_bytes else 0
        found = []
        for slot in range(min(self.num_blocks, num_whole)):  # records the file holds entirely
            fields = record.parse_header(os.pread(fd, HEADER_BYTES, slot * self.slot_bytes))
            if isinstance(fields, Miss):
                continue
            block_hash, fingerprint, length, _ = fields
            if fingerprint == self.fingerprint and length == self.block_bytes:
                found.append((slot, block_hash))
        return found

    async def put(self, slot: int, block_hash: int, payload: memoryview) -> None:
        header = record.encode_header(block_hash, self.fingerprint, payload)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._writes.append((slot * self.slot_bytes, [header, payload], future))
        self._kick()
        await future

    async def get(self, slot: int, block_hash: int) -> memoryview | Miss:
        future: asyncio.Future[memoryview | Miss] = asyncio.get_running_loop().create_future()
        self._reads.append((slot, block_hash, future))
        self._kick()
        return await future

    def _kick(self) -> None:
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        """Runs batches until nothing is pending; writes before reads (a read after a write
        of the same slot sees the new record)."""
        try:
            while self._writes or self._reads:
                writes, self._writes = self._writes, []
                if writes:
                    await self._settle(writes, self._run(self._write_batch, writes))
                reads, self._reads = self._reads, []
                if reads:
                    await self._settle(reads, self._run(self._read_batch, reads))
        finally:
            self._flushing = False

    async def _settle(self, batch: list[Any], work: Any) -> None:
        try:
            results = await work
        except Exception as exc:  # noqa: BLE001 - every waiter of the batch gets it
            results = [exc] * len(batch)
        for item, result in zip(batch, results, strict=True):
            future = item[-1]
            if future.done():
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    def _write_batch(self, batch: list[tuple[int, list[Any], Any]]) -> list[None]:
        engine = self._require_engine()
        try:
            engine.write([(offset, buffers) for offset, buffers, _ in batch])
        except OSError as exc:
            raise StoreUnavailable(f"disk tier write failed: {exc}") from exc
        return [None] * len(batch)

    def _read_batch(self, batch: list[tuple[int, int, Any]]) -> list[memoryview | Miss]:
        engine = self._require_engine()
        bufs = [bytearray(HEADER_BYTES + self.block_bytes) for _ in batch]
        try:
            num_read = engine.read(
                [(slot * self.slot_bytes, b) for (slot, _, _), b in zip(batch, bufs, strict=True)]
            )
        except OSError as exc:
            raise StoreUnavailable(f"disk tier read failed: {exc}") from exc
        out: list[memoryview | Miss] = []
        for (_, block_hash, _), buf, n in zip(batch, bufs, num_read, strict=True):
            if n < len(buf):
                out.append(Miss.TRUNCATED)
            else:
                out.append(
                    record.decode(memoryview(buf), block_hash, self.fingerprint, self.block_bytes)
                )
        return out

    def _require_engine(self) -> Any:
        if self._engine is None:
            raise StoreUnavailable("disk tier is not open")
        return self._engine

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._closed:
            raise StoreUnavailable("disk tier is closed")
        return await asyncio.get_running_loop().run_in_executor(self._pool, partial(fn, *args))

    async def close(self) -> None:
        """Waits for reads and writes in progress, then closes the file."""
        self._closed = True
        await asyncio.get_running_loop().run_in_executor(None, self._pool.shutdown, True)
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.close()
            os.close(engine.fd)
