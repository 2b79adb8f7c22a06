"""Mooncake JSONL traces as token-level requests for the replay.

Parsing and the hash-id -> tokens mapping are ``tokenmill bench serve``'s
(``tokenmill.bench.traces.read_mooncake`` and ``mooncake_tokens``), so online and offline runs
see the same prompts. Each trace hash id stands for one block of ``trace_block_size`` tokens;
a prompt is its blocks concatenated, the last one cut to ``input_length``. Requests that
share a timestamp arrive together (the trace's ~3 s buckets fire as bursts); arrival times
are ``(timestamp - first timestamp) / arrival_speed`` ms.

The engine's block hashes (``core.block_hash``, ``block_size`` tokens; sequence and local) of
a prompt are assembled from a per-(parent, hash id) cache, so each trace block is hashed once
per run; the replay hands them to its engines, which then do not hash prompts again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tokenmill.bench.traces import mooncake_tokens
from tokenmill.bench.traces import read_mooncake as read_mooncake_rows
from tokenmill.core.block_hash import chain_hashes, local_block_hashes


@dataclass(frozen=True)
class TraceRequest:
    request_id: str
    arrival_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


def read_mooncake(
    path: str | Path, max_requests: int | None = None, arrival_speed: float = 1.0
) -> list[TraceRequest]:
    """The first ``max_requests`` requests of the trace in file order (stable for equal
    timestamps), ids ``req-<i>``, arrivals divided by ``arrival_speed``, at least 1 output
    token each. Rows are parsed and validated by ``tokenmill.bench.traces.read_mooncake``
    (a malformed row raises its ``TraceError``)."""
    if arrival_speed <= 0:
        raise ValueError("arrival_speed must be > 0")
    return [
        TraceRequest(
            f"req-{i}",
            r.arrival_ms / arrival_speed,
            r.num_input_tokens,
            max(1, r.num_output_tokens),
            r.hash_ids,
        )
        for i, r in enumerate(read_mooncake_rows(path, max_requests))
    ]


class TraceTokens:
    """Token ids and engine block hashes of trace prompts."""

    def __init__(self, trace_block_size: int = 512, block_size: int = 64, vocab_size: int = 32_000):
        if trace_block_size % block_size:
            raise ValueError("trace_block_size must be a multiple of block_size")
        self.trace_block_size = trace_block_size
        self.block_size = block_size
        self.vocab_size = vocab_size
        # (parent sequence hash, trace hash id) -> the block's sequence hashes, then its local
        # hashes: one list, not two in a tuple (two objects more for the GC to track, per
        # trace block of the run, made the replay's collections twice as frequent)
        self._hashes: dict[tuple[int | None, int], list[int]] = {}

    def prompt(self, req: TraceRequest) -> tuple[list[int], list[int]]:
        """``(token ids, sequence hashes of its full block_size blocks)`` of a prompt."""
        tokens, hashes, _ = self.prompt_blocks(req)
        return tokens, hashes

    def prompt_blocks(self, req: TraceRequest) -> tuple[list[int], list[int], list[int]]:
        """``(token ids, sequence hashes, local hashes)``: the hashes of the prompt's full
        ``block_size`` blocks as the router looks them up and as an engine's scheduler would
        compute them (``Scheduler.add_request``'s ``prompt_hashes``)."""
        ids = np.array(req.hash_ids, dtype=np.uint64)
        blocks = mooncake_tokens(ids, self.trace_block_size, self.vocab_size)  # [n, tbs]
        tokens = blocks.ravel()[: req.input_length].tolist()
        return (tokens, *self._hashes_of(req, blocks))

    def prompt_tokens(self, req: TraceRequest) -> list[int]:
        return self.prompt(req)[0]

    def prompt_hashes(self, req: TraceRequest) -> list[int]:
        """Sequence hashes of the prompt's full ``block_size`` blocks (what the engine caches)."""
        return self.prompt(req)[1]

    def _hashes_of(self, req: TraceRequest, blocks: np.ndarray) -> tuple[list[int], list[int]]:
        seq: list[int] = []
        local: list[int] = []
        parent: int | None = None
        cache, per_block = self._hashes, self.trace_block_size // self.block_size
        for i, h in enumerate(req.hash_ids):
            key = (parent, h)
            chunk = cache.get(key)
            if chunk is None:
                new_local = local_block_hashes(blocks[i], self.block_size)
                chunk = cache[key] = chain_hashes(new_local, parent) + new_local
            seq += chunk[:per_block]
            local += chunk[per_block:]
            parent = chunk[per_block - 1]
        num_full = req.input_length // self.block_size
        return seq[:num_full], local[:num_full]


def scaled_copies(
    requests: list[TraceRequest], num_requests: int, shift_ms: float
) -> list[TraceRequest]:
    """``num_requests`` requests from copies of ``requests``: copy k has its hash ids moved
    past every id of the copies before it (no prefix is shared across copies) and its
    arrivals shifted by ``k * shift_ms`` (a small shift overlaps the copies: k copies are k
    times the load)."""
    span = 1 + max((h for r in requests for h in r.hash_ids), default=0)
    out: list[TraceRequest] = []
    k = 0
    while len(out) < num_requests and requests:
        for r in requests[: num_requests - len(out)]:
            ids = tuple(h + k * span for h in r.hash_ids)
            out.append(
                TraceRequest(
                    f"{r.request_id}-c{k}",
                    r.arrival_ms + k * shift_ms,
                    r.input_length,
                    r.output_length,
                    ids,
                )
            )
        k += 1
    return sorted(out, key=lambda r: r.arrival_ms)
