"""Any trace ``tokenmill replay`` takes, as replay ``TraceRequest``s: Mooncake JSONL (with its
prefix hash ids), an Azure LLM inference CSV (``TIMESTAMP,ContextTokens,GeneratedTokens``) or
an AIBrix JSONL (``{"timestamp", "requests": [...]}``). Azure and AIBrix rows carry no prefix
information: each request gets hash ids of its own (no prefix shared with any other), one
per ``trace_block_size`` tokens. Parsing is ``tokenmill.bench.traces``'s; arrivals are
divided by ``arrival_speed``; every request has at least one output token."""

from __future__ import annotations

import json
from pathlib import Path

from tokenmill.bench import traces
from tokenmill.sim.trace import TraceRequest, read_mooncake


def trace_format(path: str | Path) -> str:
    """``mooncake``, ``azure`` or ``aibrix`` from the file's first line."""
    with open(path) as f:
        first = f.readline().strip()
    if first.upper().startswith("TIMESTAMP"):
        return "azure"
    try:
        row = json.loads(first)
    except ValueError:
        raise traces.TraceError(f"{path}:1: neither a CSV header nor a JSON line") from None
    return "aibrix" if isinstance(row, dict) and "requests" in row else "mooncake"


def read_trace(
    path: str | Path,
    max_requests: int | None = None,
    arrival_speed: float = 1.0,
    trace_block_size: int = 512,
) -> list[TraceRequest]:
    if arrival_speed <= 0:
        raise ValueError("arrival_speed must be > 0")
    kind = trace_format(path)
    if kind == "mooncake":
        return read_mooncake(path, max_requests, arrival_speed)
    rows = traces.read_azure(path) if kind == "azure" else traces.read_aibrix(path)
    out, next_id = [], 0
    for i, r in enumerate(rows[:max_requests] if max_requests is not None else rows):
        n = max(1, -(-r.num_input_tokens // trace_block_size))
        out.append(
            TraceRequest(
                f"req-{i}",
                r.arrival_ms / arrival_speed,
                max(1, r.num_input_tokens),
                max(1, r.num_output_tokens),
                tuple(range(next_id, next_id + n)),
            )
        )
        next_id += n
    return out
