"""Replay metrics: per-request records in, the report dict (JSON-ready) out.

TTFT, ITL, E2E, their mean/p50/p90/p99, goodput and ``kv_reuse_ratio`` are
``tokenmill.bench.metrics.summarize`` (the definitions ``tokenmill bench serve`` reports):
each record becomes a ``RequestTiming`` (virtual ms -> s; arrival = when the request reached
the router, so TTFT includes router queueing; the last token is the finish) and the
summary's values are rounded to 3 decimals (ratios and the goodput fraction to 4). No data
is None (JSON null), never 0.0, as in ``summarize``. A shed request is a failure with error
``"shed"``; it counts in ``num_requests`` and in the goodput fraction's denominator.

``itl_gaps``: Dynamo's replay ITL, over every inter-token gap of every request (not one mean
per request): ``mean`` is token-weighted, ``p50/p90/p99`` are over all gaps (``GapStats``).
``itl`` (one mean per request, as ``bench serve`` defines it) stays: its p99 is "ITL p99 over
requests". In a P/D split a gap is what the client sees: the gap between the prefill
worker's first token and the decode worker's next one (transfer and wait included) is one.

Split runs add ``disagg``: remote and local prefills with per-reason counts
(``router.disagg.Reason``), and ``transfer``: count, bytes and tokens moved, and transfer
time (mean/p50/p90/p99 ms) plus the time a decode request waited for its KV (transfer
queueing included).

Replay-only keys: ``shed_requests``; ``router_queue_ms`` (time in the router queue, same
statistics); ``sim_duration_s`` (first arrival to last finish, the denominator of every rate);
``engine_prefix_hit_rate`` and ``num_preemptions`` from the schedulers; ``load_balance``:
requests, prompt tokens and computed prompt tokens per worker, with max/mean of each (1.0 is
perfectly even).
"""

from __future__ import annotations

from array import array
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from tokenmill.bench.metrics import PERCENTILES, RequestTiming, SlaConfig, distribution, summarize


@dataclass(slots=True)
class RequestRecord:
    request_id: str
    arrival_ms: float
    input_length: int
    output_length: int
    worker: int = -1
    first_token_ms: float = -1.0
    finish_ms: float = -1.0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    queued_ms: float = 0.0
    shed: bool = False
    # a request waiting in the router queue: its prompt as ``TraceTokens.prompt_blocks`` gives it
    pending_prompt: tuple[list[int], list[int], list[int]] | None = None
    last_token_ms: float = -1.0  # the latest token the client got (for ``itl_gaps``)
    # P/D split: where it prefilled, why, and its transfer (-1 / None: not applicable)
    prefill_worker: int = -1
    reason: str | None = None
    transfer_bytes: int = 0
    transfer_tokens: int = 0
    transfer_ms: float = -1.0  # on the wire
    kv_wait_ms: float = -1.0  # prefill end -> KV on the decode worker (link queue included)
    decode_first_ms: float = -1.0  # the decode worker's first token

    @property
    def done(self) -> bool:
        return self.finish_ms >= 0


def to_timing(r: RequestRecord) -> RequestTiming:
    """The record as ``bench.metrics`` sees it (seconds); unfinished records are failures."""
    if not r.done:
        error = "shed" if r.shed else "unfinished"
        return RequestTiming(r.arrival_ms / 1e3, None, None, r.arrival_ms / 1e3, 0, error=error)
    first, finish = r.first_token_ms / 1e3, r.finish_ms / 1e3
    return RequestTiming(
        r.arrival_ms / 1e3,
        first,
        finish,
        finish,
        r.num_output_tokens,
        r.input_length,
        r.num_cached_tokens,
    )


def request_json(r: RequestRecord) -> dict[str, Any]:
    """One record for ``replay --save-requests`` (virtual ms; -1 for "never")."""
    return {
        "request_id": r.request_id,
        "arrival_ms": _r(r.arrival_ms),
        "worker": r.worker,
        "first_token_ms": _r(r.first_token_ms),
        "finish_ms": _r(r.finish_ms),
        "queued_ms": _r(r.queued_ms),
        "input_length": r.input_length,
        "num_output_tokens": r.num_output_tokens,
        "num_cached_tokens": r.num_cached_tokens,
        "shed": r.shed,
        "prefill_worker": r.prefill_worker,
        "reason": r.reason,
        "transfer_bytes": r.transfer_bytes,
        "transfer_ms": _r(r.transfer_ms),
        "decode_first_ms": _r(r.decode_first_ms),
    }


class GapStats:
    """Every inter-token gap of every request, as (value, multiplicity) pairs (a fast-forwarded
    run of k decode steps adds k values, each counted once per decoding request)."""

    def __init__(self) -> None:
        self.values = array("d")
        self.weights = array("q")

    def add(self, gap_ms: float, weight: int = 1) -> None:
        self.values.append(gap_ms)
        self.weights.append(weight)

    @property
    def count(self) -> int:
        return int(sum(self.weights))

    def summary(self) -> dict[str, float | None]:
        """Token-weighted mean and p50/p90/p99 over the expanded list of gaps (linear
        interpolation between closest ranks, numpy's default); None for no gaps."""
        if not self.values:
            return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
        v = np.frombuffer(self.values, dtype=np.float64)
        w = np.frombuffer(self.weights, dtype=np.int64)
        order = np.argsort(v, kind="stable")
        v, w = v[order], w[order]
        ends = np.cumsum(w)  # the expanded index of each value's last copy, plus one
        n = int(ends[-1])
        out: dict[str, float | None] = {"mean": float(np.dot(v, w) / n)}
        for p in PERCENTILES:
            rank = p / 100.0 * (n - 1)
            lo = int(np.floor(rank))
            a = v[np.searchsorted(ends, lo, side="right")]
            b = v[np.searchsorted(ends, min(lo + 1, n - 1), side="right")]
            out[f"p{p}"] = float(a + (b - a) * (rank - lo))
        return out


def _r(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else round(float(x), digits)


def _stats(dist: dict[str, float | None]) -> dict[str, float | None]:
    return {k: _r(v) for k, v in dist.items()}


def _balance(per_worker: list[int]) -> dict[str, Any]:
    mean = sum(per_worker) / len(per_worker) if per_worker else 0.0
    return {"per_worker": per_worker, "max_over_mean": _r(max(per_worker) / mean) if mean else None}


def _load_balance(done: list[RequestRecord], worker_ids: list[int]) -> dict[str, Any]:
    by_worker = [[r for r in done if r.worker == w] for w in worker_ids]
    return {
        "requests": _balance([len(b) for b in by_worker]),
        "prompt_tokens": _balance([sum(r.input_length for r in b) for b in by_worker]),
        "computed_prompt_tokens": _balance(
            [sum(r.input_length - r.num_cached_tokens for r in b) for b in by_worker]
        ),
    }


def disagg_report(records: list[RequestRecord]) -> dict[str, Any]:
    """Remote and local prefills by reason, and transfer statistics, of a split run."""
    reasons = Counter(r.reason for r in records if r.reason is not None)
    remote = [r for r in records if r.prefill_worker >= 0]
    moved = [r for r in remote if r.transfer_ms >= 0]
    return {
        "remote_prefills": len(remote),
        "local_prefills": sum(1 for r in records if r.reason is not None) - len(remote),
        "by_reason": dict(sorted(reasons.items())),
        "transfer": {
            "count": len(moved),
            "bytes": sum(r.transfer_bytes for r in moved),
            "tokens": sum(r.transfer_tokens for r in moved),
            "mean_bytes": _r(sum(r.transfer_bytes for r in moved) / len(moved)) if moved else None,
            "ms": _stats(distribution(r.transfer_ms for r in moved)),
            "kv_wait_ms": _stats(distribution(r.kv_wait_ms for r in moved if r.kv_wait_ms >= 0)),
        },
    }


def build_report(
    cfg: Any,
    records: list[RequestRecord],
    worker_stats: list[Any],
    extra: dict,
    gaps: GapStats | None = None,
    worker_ids: list[int] | None = None,
) -> dict:
    """The replay report (see the module docstring); ``cfg`` is the ``ReplayConfig``;
    ``worker_ids``: the workers ``load_balance`` lists (default ``range(cfg.num_workers)``)."""
    done = [r for r in records if r.done]
    start = min((r.arrival_ms for r in records), default=0.0)
    duration_s = (max((r.finish_ms for r in done), default=start) - start) / 1000.0
    sla = SlaConfig(cfg.sla_ttft_ms, cfg.sla_itl_ms)
    s = summarize([to_timing(r) for r in records], duration_s, sla)
    good = s["goodput"]
    return {
        "num_requests": s["num_requests"],
        "completed": s["completed"],
        "shed_requests": sum(1 for r in records if r.shed),
        "ttft": _stats(s["ttft"]),
        "itl": _stats(s["itl"]),
        "itl_gaps": _stats(gaps.summary()) if gaps is not None else None,
        "e2e": _stats(s["e2e"]),
        "router_queue_ms": _stats(distribution(r.queued_ms for r in done)),
        "output_tokens": s["output_tokens"],
        "output_tokens_per_s": _r(s["output_tokens_per_s"]),
        "requests_per_s": _r(s["requests_per_s"]),
        "sim_duration_s": _r(duration_s),
        "kv_reuse_ratio": _r(s["kv_reuse_ratio"], 4),
        "engine_prefix_hit_rate": [round(w.prefix_hit_rate, 4) for w in worker_stats],
        "num_preemptions": sum(w.num_preemptions for w in worker_stats),
        "goodput": {
            **good,
            "fraction": _r(good["fraction"], 4),
            "requests_per_s": _r(good["requests_per_s"]),
        },
        "load_balance": _load_balance(
            done, worker_ids if worker_ids is not None else list(range(cfg.num_workers))
        ),
        **extra,
    }
