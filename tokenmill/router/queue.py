"""The router's admission queue: when every worker is busy, requests wait here; beyond a hard
limit they are shed (the frontend answers HTTP 503 with Retry-After).

Order is FCFS or shortest-prefill-first (fewest tokens still to compute; FCFS among equals).
Pure data structure: the router decides when a worker is busy and when to pop.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")

ORDERS = ("fcfs", "spf")


@dataclass(frozen=True)
class QueueConfig:
    """``busy_prefill_tokens``: a worker is busy while its active prefill tokens exceed it
    (None: never queue). ``max_queued``: the hard limit; a request arriving with this many
    already waiting is shed. ``order``: ``fcfs`` or ``spf`` (shortest prefill first)."""

    busy_prefill_tokens: int | None = None
    max_queued: int = 1024
    order: str = "fcfs"

    def __post_init__(self) -> None:
        if self.order not in ORDERS:
            raise ValueError(f"queue order must be one of {ORDERS}, got {self.order!r}")
        if self.max_queued < 0:
            raise ValueError("max_queued must be >= 0")


class RequestQueue(Generic[T]):
    """Priority queue of waiting items; ``push`` refuses (returns False) when full."""

    def __init__(self, config: QueueConfig):
        self.config = config
        self._heap: list[tuple[int, int, T]] = []
        self._seq = 0

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, item: T, num_prefill_tokens: int) -> bool:
        """Enqueue ``item``; False (nothing enqueued) if ``max_queued`` items already wait."""
        if len(self._heap) >= self.config.max_queued:
            return False
        key = num_prefill_tokens if self.config.order == "spf" else 0
        heapq.heappush(self._heap, (key, self._seq, item))
        self._seq += 1
        return True

    def peek(self) -> T | None:
        return self._heap[0][2] if self._heap else None

    def pop(self) -> T | None:
        """The next item in queue order, or None when empty."""
        return heapq.heappop(self._heap)[2] if self._heap else None
