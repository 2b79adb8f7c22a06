"""Replay metrics: per-request records in, the report dict (JSON-ready) out.

TTFT, ITL, E2E, their mean/p50/p90/p99, goodput and ``kv_reuse_ratio`` are
``tokenmill.bench.metrics.summarize`` (the definitions ``tokenmill bench serve`` reports):
each record becomes a ``RequestTiming`` (virtual ms -> s; arrival = when the request reached
the router, so TTFT includes router queueing; the last token is the finish) and the
summary's values are rounded to 3 decimals (ratios and the goodput fraction to 4). No data
is None (JSON null), never 0.0, as in ``summarize``. A shed request is a failure with error
``"shed"``; it counts in ``num_requests`` and in the goodput fraction's denominator.

Replay-only keys: ``shed_requests``; ``router_queue_ms`` (time in the router queue, same
statistics); ``sim_duration_s`` (first arrival to last finish, the denominator of every rate);
``engine_prefix_hit_rate`` and ``num_preemptions`` from the schedulers; ``load_balance``:
requests, prompt tokens and computed prompt tokens per worker, with max/mean of each (1.0 is
perfectly even).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tokenmill.bench.metrics import RequestTiming, SlaConfig, distribution, summarize


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
    }


def _r(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else round(float(x), digits)


def _stats(dist: dict[str, float | None]) -> dict[str, float | None]:
    return {k: _r(v) for k, v in dist.items()}


def _balance(per_worker: list[int]) -> dict[str, Any]:
    mean = sum(per_worker) / len(per_worker) if per_worker else 0.0
    return {"per_worker": per_worker, "max_over_mean": _r(max(per_worker) / mean) if mean else None}


def _load_balance(done: list[RequestRecord], num_workers: int) -> dict[str, Any]:
    by_worker = [[r for r in done if r.worker == w] for w in range(num_workers)]
    return {
        "requests": _balance([len(b) for b in by_worker]),
        "prompt_tokens": _balance([sum(r.input_length for r in b) for b in by_worker]),
        "computed_prompt_tokens": _balance(
            [sum(r.input_length - r.num_cached_tokens for r in b) for b in by_worker]
        ),
    }


def build_report(
    cfg: Any, records: list[RequestRecord], worker_stats: list[Any], extra: dict
) -> dict:
    """The replay report (see the module docstring); ``cfg`` is the ``ReplayConfig``."""
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
        "load_balance": _load_balance(done, cfg.num_workers),
        **extra,
    }
