"""What the planner sees of one pool over the last observation window, and what it decides.

A pool is the set of workers of one role (``both``: aggregated, ``prefill``, ``decode``).
Traffic figures (``num_requests``, ``mean_isl``, ``mean_osl``) are the frontend's over the
window; latency figures are of requests that got their first token (TTFT) or finished (ITL)
in it, in ms, None when no request did (no data is not 0). Worker figures are a snapshot at
the window's end; ``workers`` holds the per-worker ones of the workers that are up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

POOL_ROLES = ("both", "prefill", "decode")


@dataclass(frozen=True)
class WorkerObservation:
    """One live worker: running requests, requests waiting in its scheduler, prompt tokens
    not yet prefilled (waiting and partially prefilled requests), share of KV blocks used."""

    num_running: int = 0
    num_waiting: int = 0
    waiting_prefill_tokens: int = 0
    kv_usage: float = 0.0
    num_kv_tokens: int = 0  # tokens held by running requests


@dataclass(frozen=True)
class PoolObservation:
    window_s: float
    num_requests: int = 0  # arrivals in the window
    mean_isl: float = 0.0
    mean_osl: float = 0.0
    prefix_hit: float = 0.0  # share of prompt tokens found cached, over the window
    ttft_mean_ms: float | None = None
    ttft_p90_ms: float | None = None
    itl_mean_ms: float | None = None
    itl_p90_ms: float | None = None
    mean_request_s: float | None = None  # arrival to finish of requests finished in the window
    router_queue: int = 0  # requests held in the router's queue (no worker could take them)
    num_up: int = 0
    num_starting: int = 0
    num_draining: int = 0
    workers: tuple[WorkerObservation, ...] = field(default_factory=tuple)

    @property
    def request_rate(self) -> float:
        return self.num_requests / self.window_s if self.window_s > 0 else 0.0

    @property
    def queue_depth(self) -> int:
        return self.router_queue + sum(w.num_waiting for w in self.workers)

    @property
    def waiting_prefill_tokens(self) -> int:
        return sum(w.waiting_prefill_tokens for w in self.workers)

    @property
    def kv_usage(self) -> float:
        """Mean KV usage over the workers that are up (0 with none)."""
        return sum(w.kv_usage for w in self.workers) / len(self.workers) if self.workers else 0.0

    @property
    def num_provisioned(self) -> int:
        """Workers that count toward the pool's size: up or starting (draining ones leave)."""
        return self.num_up + self.num_starting

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "workers"}
        d.update(
            request_rate=round(self.request_rate, 4),
            queue_depth=self.queue_depth,
            waiting_prefill_tokens=self.waiting_prefill_tokens,
            kv_usage=round(self.kv_usage, 4),
        )
        return d


@dataclass(frozen=True)
class PoolLimits:
    min_replicas: int = 1
    max_replicas: int = 8

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"need 0 <= min <= max replicas, got {self}")

    def clamp(self, n: int) -> int:
        return max(self.min_replicas, min(self.max_replicas, n))


@dataclass(frozen=True)
class PoolDecision:
    """The planner's target for one pool. ``drain``: whether removed workers drain first
    (every tokenmill policy; the ``dynamo`` control removes them at once, as Dynamo does).
    ``inputs``: what the decision was computed from (logged and exported as metrics)."""

    pool: str
    current: int
    target: int
    reason: str
    drain: bool = True
    inputs: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "pool": self.pool,
            "current": self.current,
            "target": self.target,
            "reason": self.reason,
            "drain": self.drain,
            **self.inputs,
        }
