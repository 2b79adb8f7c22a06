"""KV block transfer between two processes by NIXL, against memcpy of the same size.

Both processes allocate the engine's own paged KV tensors (``PagedAttention``: per layer one
K and one V tensor ``[num_blocks, 16, 3, 64]``, SmolLM2-135M's shape, bf16: 6 KiB per block
per tensor, 360 KiB per block over its 30 layers' K and V) and register them with the
engine's ``NixlWorkerConnector``. The sender's connection info crosses over a pipe (in the
server it crosses the request plane). For each size (one block to 64 MiB), interleaved, in
the receiving process:

- ``nixl_read``: one READ of ``n`` consecutive blocks of every layer (what a decode worker
  issues), posted to done (polled); the sender polls its agent every 0.5 ms meanwhile, as a
  prefill engine's loop does while it holds blocks;
- ``nixl_load``: the same through the connector as the engine drives it (post, poll, then
  the per-block sample checksums checked);
- ``memcpy``: ``dst.copy_(src)`` of a contiguous buffer of the same byte count;
- ``block_copy``: the same blocks copied between two block ranges of every layer tensor
  (the paged access pattern, in one process).

Bandwidth = bytes / median seconds. Goal: NIXL READ >= 80% of memcpy at >= 16 MiB.

    python benchmarks/disagg_transfer.py [--repeats 15]

writes the ``transfer`` key of ``benchmarks/results/disagg.json`` (read-modify-write).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import time
from pathlib import Path

OUT = Path("benchmarks/results/disagg.json")
LAYERS, BLOCK, HEADS, HEAD_DIM = 30, 16, 3, 64
BLOCK_BYTES = 2 * LAYERS * BLOCK * HEADS * HEAD_DIM * 2  # K and V, every layer, bf16
SIZES_MIB = (None, 1, 4, 16, 32, 64)  # None: one block
NUM_BLOCKS = 2 * (64 * 2**20 // BLOCK_BYTES + 2)  # two 64 MiB ranges


def _layout():
    from tokenmill.core.kv_transfer import KvLayout

    return KvLayout(
        dtype="bfloat16", block_size=BLOCK, num_layers=LAYERS, num_kv_heads=HEADS, head_dim=HEAD_DIM
    )


def _side(name: str):
    import torch

    from tokenmill.engine.executor.nixl_connector import NixlWorkerConnector
    from tokenmill.engine.executor.paged_attention import PagedAttention

    attn = PagedAttention(LAYERS, NUM_BLOCKS, BLOCK, HEADS, HEAD_DIM, torch.bfloat16)
    for tensor in (*attn.k_cache, *attn.v_cache):
        tensor.normal_()
    connector = NixlWorkerConnector(name, _layout(), transfer_timeout_s=60.0)
    connector.register_kv_caches(attn.k_cache, attn.v_cache)
    return attn, connector


def sender(conn) -> None:
    """Holds blocks and answers ``(request id, block ids)`` with transfer parameters."""
    from tokenmill.core.kv_transfer import KvTransferParams

    _, connector = _side("bench-sender")
    while True:
        if not conn.poll(0.0005):  # as a prefill engine polls while it holds blocks
            connector.get_finished()
            continue
        message = conn.recv()
        if message is None:
            break
        rid, blocks = message
        params = KvTransferParams(
            do_remote_decode=True, remote_request_id=rid, remote_block_ids=blocks
        )
        conn.send(connector.complete_transfer_params(params).for_decode())
        connector.get_finished()  # drain the READs' notices
    connector.shutdown()


def _blocks_for(size_mib: int | None) -> int:
    return 1 if size_mib is None else max(1, size_mib * 2**20 // BLOCK_BYTES)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    import torch

    from tokenmill.kv.connector import ConnectorMetadata, KvLoad

    torch.set_num_threads(1)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=sender, args=(child,), daemon=True)
    proc.start()
    attn, connector = _side("bench-receiver")
    tensors = [t for pair in zip(attn.k_cache, attn.v_cache, strict=True) for t in pair]
    half = NUM_BLOCKS // 2
    results, counter = [], 0
    for size in SIZES_MIB:
        n = _blocks_for(size)
        num_bytes = n * BLOCK_BYTES
        src_flat = torch.empty(num_bytes, dtype=torch.uint8).random_(0, 255)
        dst_flat = torch.empty(num_bytes, dtype=torch.uint8)
        runs: dict[str, list[float]] = {
            k: [] for k in ("nixl_read", "nixl_load", "memcpy", "block_copy")
        }
        for r in range(args.repeats + 1):  # the first round warms up
            counter += 1
            rid = f"r{counter}"
            parent.send((rid, list(range(n))))
            source = parent.recv()
            load = KvLoad(
                request_id=rid,
                block_ids=list(range(half, half + n)),
                first_block=0,
                num_tokens=n * BLOCK,
                source=source,
            )
            t0 = time.perf_counter()
            connector._start_read(load)
            handle = connector._reads[rid].handle
            while connector.agent.check_xfer_state(handle) == "PROC":
                pass
            read_s = time.perf_counter() - t0
            connector._reads.pop(rid)
            connector.agent.release_xfer_handle(handle)
            counter += 1
            rid2 = f"r{counter}"
            parent.send((rid2, list(range(n))))
            source2 = parent.recv()
            load2 = KvLoad(
                request_id=rid2,
                block_ids=list(range(half, half + n)),
                first_block=0,
                num_tokens=n * BLOCK,
                source=source2,
            )
            t0 = time.perf_counter()
            connector.start_load_kv(ConnectorMetadata(loads=[load2]))
            while True:
                report = connector.get_finished()
                if report is not None and (report.finished_loads or report.failed_loads):
                    assert report.finished_loads == [rid2], report
                    break
            load_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            dst_flat.copy_(src_flat)
            copy_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            for tensor in tensors:
                tensor[half : half + n].copy_(tensor[:n])
            block_s = time.perf_counter() - t0
            if r:
                runs["nixl_read"].append(read_s)
                runs["nixl_load"].append(load_s)
                runs["memcpy"].append(copy_s)
                runs["block_copy"].append(block_s)
        row = {
            "size": "1 block" if size is None else f"{size} MiB",
            "blocks": n,
            "bytes": num_bytes,
        }
        for key, values in runs.items():
            median = statistics.median(values)
            row[f"{key}_ms"] = round(median * 1e3, 4)
            row[f"{key}_gbps"] = round(num_bytes / median / 1e9, 3)
        row["read_vs_memcpy"] = round(row["nixl_read_gbps"] / row["memcpy_gbps"], 3)
        row["load_vs_memcpy"] = round(row["nixl_load_gbps"] / row["memcpy_gbps"], 3)
        results.append(row)
        print(json.dumps(row), flush=True)
    parent.send(None)
    proc.join(10)
    connector.shutdown()
    big = [r for r in results if r["bytes"] >= 16 * 2**20]
    summary = {
        "what": "NIXL READ (UCX) of the engine's bf16 KV blocks (SmolLM2 shape) between two "
        "processes vs memcpy of the same bytes, medians of interleaved runs",
        "repeats": args.repeats,
        "bytes_per_block": BLOCK_BYTES,
        "one_block_latency_ms": results[0]["nixl_read_ms"],
        "one_block_load_ms": results[0]["nixl_load_ms"],
        "goal": "nixl_read >= 0.8 x memcpy at >= 16 MiB",
        "goal_met": all(r["read_vs_memcpy"] >= 0.8 for r in big),
        "min_read_vs_memcpy_at_16MiB_plus": min(r["read_vs_memcpy"] for r in big),
        "rows": results,
        "loadavg": os.getloadavg(),
        "note": "2 shared CPU cores, other work running; compare ratios, not absolute numbers",
    }
    data = json.loads(OUT.read_text()) if OUT.exists() else {}
    data["transfer"] = summary
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(data, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}, indent=2))


if __name__ == "__main__":
    main()
