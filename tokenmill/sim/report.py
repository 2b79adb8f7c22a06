"""Replay metrics: per-request records in, the report dict (JSON-ready) out.

- ``ttft``: first token time - arrival (router queueing included), ms.
- ``itl``: per request, the mean gap between its output tokens ((finish - first token) /
  (output tokens - 1)), then mean and percentiles over requests with at least 2 tokens.
- ``e2e``: finish - arrival, ms.
- percentiles by linear interpolation between order statistics (numpy's default).
- ``kv_reuse_ratio``: prompt tokens found in the prefix cache at admission / prompt tokens.
- ``goodput``: requests meeting TTFT <= sla_ttft_ms and ITL <= sla_itl_ms (count, fraction, req/s).
- ``load_balance``: requests, prompt tokens and computed prompt tokens per worker, with
  max/mean of each (1.0 is perfectly even).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


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
    pending_tokens: list[int] | None = None  # prompt of a request waiting in the router queue

    @property
    def done(self) -> bool:
        return self.finish_ms >= 0

    @property
    def itl_ms(self) -> float | None:
        if self.num_output_tokens < 2:
            return None
        return (self.finish_ms - self.first_token_ms) / (self.num_output_tokens - 1)


def stats_ms(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0}
    arr = np.asarray(values, dtype=np.float64)
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return {"mean": _r(arr.mean()), "p50": _r(p50), "p90": _r(p90), "p99": _r(p99)}


def _r(x: float) -> float:
    return round(float(x), 3)


def _balance(per_worker: list[int]) -> dict[str, Any]:
    mean = sum(per_worker) / len(per_worker) if per_worker else 0.0
    return {"per_worker": per_worker, "max_over_mean": _r(max(per_worker) / mean) if mean else 0.0}


def build_report(
    cfg: Any, records: list[RequestRecord], worker_stats: list[Any], extra: dict
) -> dict:
    """The replay report (see the module docstring); ``cfg`` is the ``ReplayConfig``."""
    done = [r for r in records if r.done]
    ttft = [r.first_token_ms - r.arrival_ms for r in done]
    itl = [x for r in done if (x := r.itl_ms) is not None]
    e2e = [r.finish_ms - r.arrival_ms for r in done]
    out_tokens = sum(r.num_output_tokens for r in done)
    start = min((r.arrival_ms for r in records), default=0.0)
    end = max((r.finish_ms for r in done), default=start)
    duration_s = (end - start) / 1000.0
    prompt = sum(r.input_length for r in done)
    cached = sum(r.num_cached_tokens for r in done)
    good = sum(
        1
        for r in done
        if r.first_token_ms - r.arrival_ms <= cfg.sla_ttft_ms
        and (r.itl_ms is None or r.itl_ms <= cfg.sla_itl_ms)
    )
    n = cfg.num_workers
    by_worker = [[r for r in done if r.worker == w] for w in range(n)]
    return {
        "num_requests": len(records),
        "completed": len(done),
        "shed_requests": sum(1 for r in records if r.shed),
        "ttft": stats_ms(ttft),
        "itl": stats_ms(itl),
        "e2e": stats_ms(e2e),
        "router_queue_ms": stats_ms([r.queued_ms for r in done]),
        "output_tokens": out_tokens,
        "output_tokens_per_s": _r(out_tokens / duration_s) if duration_s else 0.0,
        "requests_per_s": _r(len(done) / duration_s) if duration_s else 0.0,
        "sim_duration_s": _r(duration_s),
        "kv_reuse_ratio": round(cached / prompt, 4) if prompt else 0.0,
        "engine_prefix_hit_rate": [round(s.prefix_hit_rate, 4) for s in worker_stats],
        "num_preemptions": sum(s.num_preemptions for s in worker_stats),
        "goodput": {
            "sla_ttft_ms": cfg.sla_ttft_ms,
            "sla_itl_ms": cfg.sla_itl_ms,
            "requests": good,
            "fraction": round(good / len(records), 4) if records else 0.0,
            "requests_per_s": _r(good / duration_s) if duration_s else 0.0,
        },
        "load_balance": {
            "requests": _balance([len(b) for b in by_worker]),
            "prompt_tokens": _balance([sum(r.input_length for r in b) for b in by_worker]),
            "computed_prompt_tokens": _balance(
                [sum(r.input_length - r.num_cached_tokens for r in b) for b in by_worker]
            ),
        },
        **extra,
    }
