"""Approximate KV index for workers that publish no KV events.

After routing a prompt to a worker we assume that worker now holds the prompt's blocks. The
assumption ages out: entries expire ``ttl_s`` after they were last routed, and each worker
keeps at most ``max_blocks`` assumed blocks (least recently routed dropped first). Lookups go
through the same ``KvIndexer``, so policies cannot tell the difference.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from tokenmill.router.indexer import KvIndexer


@dataclass(frozen=True)
class ApproxConfig:
    ttl_s: float = 120.0
    max_blocks: int = 16_384  # per worker


class ApproxIndexer:
    """Predicted cache contents; ``record_route`` and ``expire`` take the caller's clock value."""

    def __init__(self, index: KvIndexer, config: ApproxConfig):
        self.index = index
        self.config = config
        self._seen: dict[int, OrderedDict[int, float]] = {}  # worker -> hash -> expiry

    def record_route(self, worker_id: int, block_hashes: Sequence[int], now: float) -> None:
        """``worker_id`` will hold ``block_hashes`` from ``now`` on."""
        seen = self._seen.setdefault(worker_id, OrderedDict())
        deadline = now + self.config.ttl_s
        for h in block_hashes:
            seen[h] = deadline
            seen.move_to_end(h)
        self.index.store(worker_id, block_hashes)
        excess = len(seen) - self.config.max_blocks
        if excess > 0:
            self.index.remove(worker_id, [seen.popitem(last=False)[0] for _ in range(excess)])

    def expire(self, now: float) -> None:
        for worker_id, seen in self._seen.items():
            gone = []
            while seen:
                h, deadline = next(iter(seen.items()))
                if deadline > now:
                    break
                seen.popitem(last=False)
                gone.append(h)
            self.index.remove(worker_id, gone)

    def remove_worker(self, worker_id: int) -> None:
        self._seen.pop(worker_id, None)
