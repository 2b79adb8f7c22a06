"""DiskStore: slots in one file, checked reads, adoption after a restart, and truncated,
corrupted or foreign files read as misses."""

from __future__ import annotations

import asyncio
import os
import resource

import numpy as np
import pytest

from tokenmill.kvstore import record
from tokenmill.kvstore.base import StoreUnavailable
from tokenmill.kvstore.disk import FILE_NAME, DiskStore, slot_bytes_for
from tokenmill.kvstore.file_io import FILE_IO
from tokenmill.kvstore.record import HEADER_BYTES, Miss

BLOCK = 5000
FP = record.layout_fingerprint("m", "float32", 16, (2, 2, 16, 1, 16))


def payload(seed: int) -> memoryview:
    return memoryview(np.random.default_rng(seed).integers(0, 256, BLOCK, dtype=np.uint8))


@pytest.fixture(params=sorted(FILE_IO))
def file_io(request) -> str:
    return request.param


@pytest.fixture
def started(file_io):
    async def start(path, fingerprint=FP, num_blocks=8) -> tuple[DiskStore, list]:
        store = DiskStore(str(path), num_blocks, BLOCK, fingerprint, file_io)
        return store, await store.start()

    return start


async def test_put_get_round_trip_in_page_aligned_slots(tmp_path, started):
    store, found = await started(tmp_path)
    assert found == [] and store.slot_bytes == 8192 == slot_bytes_for(BLOCK)
    await store.put(3, 33, payload(3))
    await store.put(0, 10, payload(0))
    assert bytes(await store.get(3, 33)) == bytes(payload(3))
    assert bytes(await store.get(0, 10)) == bytes(payload(0))
    assert await store.get(0, 33) is Miss.WRONG_BLOCK  # slot 0 holds another block
    assert await store.get(5, 55) is Miss.TRUNCATED  # never written, beyond the end
    assert await store.get(1, 11) is Miss.BAD_HEADER  # a hole: zeros
    await store.close()
    with pytest.raises(StoreUnavailable):
        await store.get(3, 33)


async def test_restart_adopts_valid_blocks_and_checks_them_on_read(tmp_path, started):
    store, _ = await started(tmp_path)
    for slot, h in [(0, 100), (2, 102), (4, 104)]:
        await store.put(slot, h, payload(h))
    await store.close()
    with open(tmp_path / FILE_NAME, "r+b") as f:  # flip a payload byte of slot 2
        f.seek(2 * store.slot_bytes + HEADER_BYTES + 17)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    again, found = await started(tmp_path)
    assert found == [(0, 100), (2, 102), (4, 104)]  # headers only at the scan
    assert bytes(await again.get(0, 100)) == bytes(payload(100))
    assert await again.get(2, 102) is Miss.CHECKSUM
    await again.close()


async def test_truncated_file_and_other_layouts_are_misses(tmp_path, started):
    store, _ = await started(tmp_path)
    await store.put(0, 100, payload(100))
    await store.put(1, 101, payload(101))
    await store.close()
    os.truncate(tmp_path / FILE_NAME, store.slot_bytes + 100)  # slot 1 cut short
    again, found = await started(tmp_path)
    assert found == [(0, 100)]
    assert await again.get(1, 101) is Miss.TRUNCATED
    await again.close()
    other, found = await started(tmp_path, fingerprint=FP + 1)
    assert found == []  # another model's blocks are not adopted
    assert await other.get(0, 100) is Miss.WRONG_LAYOUT
    await other.close()


async def test_concurrent_puts_and_gets_are_batched_and_all_answered(tmp_path, started):
    store, _ = await started(tmp_path)
    await asyncio.gather(*(store.put(i, 100 + i, payload(i)) for i in range(8)))
    got = await asyncio.gather(*(store.get(i, 100 + i) for i in range(8)))
    assert [bytes(g) for g in got] == [bytes(payload(i)) for i in range(8)]
    await store.close()


async def test_a_full_disk_raises_store_unavailable_and_recovers(
    tmp_path, started, file_size_limit
):
    store, _ = await started(tmp_path)
    await store.put(0, 1, payload(1))
    file_size_limit(2 * store.slot_bytes)
    with pytest.raises(StoreUnavailable, match="write failed"):
        await store.put(5, 6, payload(6))
    await store.put(1, 2, payload(2))  # within the limit
    file_size_limit(resource.RLIM_INFINITY)  # space again
    await store.put(5, 6, payload(6))
    assert bytes(await store.get(5, 6)) == bytes(payload(6))
    await store.close()
