"""Batched reads and writes of records at file offsets: the two ways the disk tier can move
bytes, chosen by name (``FILE_IO``; measured in ``benchmarks/kv_tiers_bandwidth.py``).

- ``posix``: one ``os.pwritev`` / ``os.preadv`` per record, in the calling thread.
- ``nixl``: NIXL's POSIX backend (the storage path Dynamo's KV block manager uses): the
  records are copied into a registered staging buffer and moved with one NIXL transfer of
  one descriptor per record; reads come back through the same staging rows. A record past
  the end of the file is read with ``preadv`` (NIXL has no short read), so truncated files
  read short either way.

Both are blocking and not thread-safe: the disk store calls one engine from one thread at a
time. Write errors raise ``OSError`` (``ENOSPC`` on a full disk).
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

Buf = bytes | bytearray | memoryview
_NIXL_POLL_S = 20e-6
_agent_ids = itertools.count()


class PosixFileIO:
    name = "posix"

    def __init__(self, fd: int, file_bytes: int, record_bytes: int):
        self.fd = fd

    def write(self, items: Sequence[tuple[int, Sequence[Buf]]]) -> None:
        """Write each item's buffers contiguously at its offset."""
        for offset, buffers in items:
            expected = sum(memoryview(b).nbytes for b in buffers)
            written = os.pwritev(self.fd, buffers, offset)
            if written != expected:
                raise OSError(f"short write of {written} of {expected} bytes at {offset}")

    def read(self, items: Sequence[tuple[int, bytearray]]) -> list[int]:
        """Fill each buffer from its offset; the bytes read for each (short past the end)."""
        return [os.preadv(self.fd, [buf], offset) for offset, buf in items]

    def close(self) -> None:
        pass


class NixlFileIO:
    """``staging_records`` rows of ``record_bytes`` registered with NIXL once."""

    name = "nixl"

    def __init__(self, fd: int, file_bytes: int, record_bytes: int, staging_records: int = 32):
        from nixl._api import nixl_agent, nixl_agent_config  # type: ignore[import-untyped]

        self.fd, self.file_bytes, self.record_bytes = fd, file_bytes, record_bytes
        self._name = f"tokenmill-kvdisk-{os.getpid()}-{next(_agent_ids)}"
        self._agent: Any = nixl_agent(self._name, nixl_agent_config(backends=[]))
        self._agent.create_backend("POSIX", {})
        self._staging = np.empty((staging_records, record_bytes), dtype=np.uint8)
        base = self._staging.ctypes.data
        self._agent.register_memory([(base, self._staging.nbytes, 0, "")], "DRAM")
        self._agent.register_memory([(0, file_bytes, fd, "")], "FILE")
        self._lock = threading.Lock()

    def write(self, items: Sequence[tuple[int, Sequence[Buf]]]) -> None:
        with self._lock:
            for chunk in _chunks(items, len(self._staging)):
                sizes = [self._stage(i, buffers) for i, (_, buffers) in enumerate(chunk)]
                self._transfer("WRITE", [off for off, _ in chunk], sizes)

    def _stage(self, row: int, buffers: Sequence[Buf]) -> int:
        pos = 0
        for b in buffers:
            view = np.frombuffer(b, dtype=np.uint8)
            self._staging[row, pos : pos + view.size] = view
            pos += view.size
        return pos

    def read(self, items: Sequence[tuple[int, bytearray]]) -> list[int]:
        size = os.fstat(self.fd).st_size
        out = [0] * len(items)
        whole = [i for i, (off, buf) in enumerate(items) if off + len(buf) <= size]
        with self._lock:
            for chunk in _chunks(whole, len(self._staging)):
                self._transfer(
                    "READ", [items[i][0] for i in chunk], [len(items[i][1]) for i in chunk]
                )
                for row, i in enumerate(chunk):
                    buf = items[i][1]
                    memoryview(buf)[:] = self._staging[row, : len(buf)].data  # one copy
                    out[i] = len(buf)
        for i in set(range(len(items))) - set(whole):  # past the end: a short read
            out[i] = os.preadv(self.fd, [items[i][1]], items[i][0])
        return out

    def _transfer(self, op: str, offsets: list[int], sizes: list[int]) -> None:
        agent, base, stride = self._agent, self._staging.ctypes.data, self.record_bytes
        local = agent.get_xfer_descs(
            [(base + i * stride, n, 0) for i, n in enumerate(sizes)], "DRAM"
        )
        remote = agent.get_xfer_descs(
            [(o, n, self.fd) for o, n in zip(offsets, sizes, strict=True)], "FILE"
        )
        handle = agent.initialize_xfer(op, local, remote, self._name)
        try:
            state = agent.transfer(handle)
            while state == "PROC":
                time.sleep(_NIXL_POLL_S)
                state = agent.check_xfer_state(handle)
        except Exception as exc:  # nixlBackendError: an I/O failed or completed short
            raise OSError(f"NIXL POSIX {op} of {len(offsets)} records failed: {exc}") from exc
        finally:
            handle.release()
        if state != "DONE":
            raise OSError(f"NIXL POSIX {op} of {len(offsets)} records failed ({state})")

    def close(self) -> None:
        self._agent = None


def _chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


FILE_IO = {"posix": PosixFileIO, "nixl": NixlFileIO}
