"""DiskStore: slots in one file, checked reads, adoption after a restart, and truncated,
corrupted or foreign files read as misses."""

from __future__ import annotations

import os

import numpy as np
import pytest

from tokenmill.kvstore import record
from tokenmill.kvstore.base import StoreUnavailable
from tokenmill.kvstore.disk import FILE_NAME, DiskStore, slot_bytes_for
from tokenmill.kvstore.record import HEADER_BYTES, Miss

BLOCK = 5000
FP = record.layout_fingerprint("m", "float32", 16, (2, 2, 16, 1, 16))


def payload(seed: int) -> memoryview:
    return memoryview(np.random.default_rng(seed).integers(0, 256, BLOCK, dtype=np.uint8))


async def started(path, fingerprint=FP, num_blocks=8) -> tuple[DiskStore, list]:
    store = DiskStore(str(path), num_blocks, BLOCK, fingerprint)
    return store, await store.start()


async def test_put_get_round_trip_in_page_aligned_slots(tmp_path):
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


async def test_restart_adopts_valid_blocks_and_checks_them_on_read(tmp_path):
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


async def test_truncated_file_and_other_layouts_are_misses(tmp_path):
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


async def test_a_full_disk_raises_store_unavailable(tmp_path, monkeypatch):
    store, _ = await started(tmp_path)

    def enospc(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "pwritev", enospc)
    with pytest.raises(StoreUnavailable, match="No space left"):
        await store.put(0, 1, payload(1))
    await store.close()
