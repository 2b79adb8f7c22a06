"""Active sequences: what the router has sent to each worker and not yet seen finish.

Per worker it tracks
- active blocks: the distinct KV blocks of its in-flight prompts, ref counted by sequence hash
  (two requests sharing a prefix on one worker count its blocks once, as the engine's prefix
  cache does); a trailing partial block is private to its request;
- active prefill tokens: tokens each request still had to compute when routed, counted until
  its first token (``mark_prefill_done``);
- active requests.

Blocks count until ``mark_finished``. A request whose end was never reported (lost worker
message) expires ``ttl_s`` after it was last touched, on the clock value the caller passes in;
nothing here reads a clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class _Request:
    worker_id: int
    keys: list[object]
    num_prefill_tokens: int
    deadline: float


@dataclass
class _Worker:
    block_refs: dict[object, int] = field(default_factory=dict)
    num_prefill_tokens: int = 0
    num_requests: int = 0


class ActiveSequences:
    """In-flight load per worker. ``add_request``/``mark_prefill_done``/``mark_finished`` are
    idempotent per request id (unknown ids are ignored)."""

    def __init__(self, block_size: int, ttl_s: float = 300.0):
        self.block_size = block_size
        self.ttl_s = ttl_s
        self._workers: dict[int, _Worker] = {}
        self._requests: dict[str, _Request] = {}  # ordered by last touch: expiry pops the front

    def add_worker(self, worker_id: int) -> None:
        self._workers.setdefault(worker_id, _Worker())

    def remove_worker(self, worker_id: int) -> list[str]:
        """Forget ``worker_id`` and return the ids of its in-flight requests."""
        self._workers.pop(worker_id, None)
        gone = [rid for rid, r in self._requests.items() if r.worker_id == worker_id]
        for rid in gone:
            del self._requests[rid]
        return gone

    # ---- queries -------------------------------------------------------------------------
    def active_blocks(self, worker_id: int) -> int:
        return len(self._workers[worker_id].block_refs)

    def active_prefill_tokens(self, worker_id: int) -> int:
        return self._workers[worker_id].num_prefill_tokens

    def num_requests(self, worker_id: int) -> int:
        return self._workers[worker_id].num_requests

    def new_blocks(
        self, worker_id: int, block_hashes: Sequence[int], num_prompt_tokens: int
    ) -> int:
        """Blocks of a prompt that would be added to ``worker_id``'s active blocks (its full
        blocks not active there, plus its partial tail block)."""
        refs = self._workers[worker_id].block_refs
        present = sum(map(refs.__contains__, block_hashes))
        return len(block_hashes) - present + (1 if num_prompt_tokens % self.block_size else 0)

    # ---- updates -------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        worker_id: int,
        block_hashes: Sequence[int],
        num_prompt_tokens: int,
        num_prefill_tokens: int,
        now: float,
    ) -> None:
        """Count a request routed to ``worker_id`` that still has ``num_prefill_tokens`` to
        compute. ``block_hashes`` are its full prompt blocks' sequence hashes."""
        if request_id in self._requests:
            return
        keys: list[object] = list(block_hashes)
        if num_prompt_tokens % self.block_size:
            keys.append(("tail", request_id))
        worker = self._workers[worker_id]
        refs = worker.block_refs
        for k in keys:
            refs[k] = refs.get(k, 0) + 1
        worker.num_prefill_tokens += num_prefill_tokens
        worker.num_requests += 1
        self._requests[request_id] = _Request(worker_id, keys, num_prefill_tokens, now + self.ttl_s)

    def mark_prefill_done(self, request_id: str, now: float) -> None:
        """The request produced its first token: its prefill tokens stop counting."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return
        worker = self._workers.get(req.worker_id)
        if worker is not None:
            worker.num_prefill_tokens -= req.num_prefill_tokens
        req.num_prefill_tokens = 0
        req.deadline = now + self.ttl_s
        self._requests[request_id] = req

    def mark_finished(self, request_id: str) -> None:
        """The request ended (finished, aborted or failed): release everything it counted."""
        req = self._requests.pop(request_id, None)
        if req is not None:
            self._release(req)

    def expire(self, now: float) -> list[str]:
        """Drop requests untouched for ``ttl_s`` before ``now``; return their ids."""
        expired: list[str] = []
        while self._requests:
            rid, req = next(iter(self._requests.items()))
            if req.deadline > now:
                break
            del self._requests[rid]
            self._release(req)
            expired.append(rid)
        return expired

    def _release(self, req: _Request) -> None:
        worker = self._workers.get(req.worker_id)
        if worker is None:
            return
        refs = worker.block_refs
        for k in req.keys:
            n = refs[k] - 1
            if n:
                refs[k] = n
            else:
                del refs[k]
        worker.num_prefill_tokens -= req.num_prefill_tokens
        worker.num_requests -= 1

    def check_integrity(self) -> None:
        """Per-worker totals equal the sums over live requests (AssertionError otherwise)."""
        for wid, worker in self._workers.items():
            reqs = [r for r in self._requests.values() if r.worker_id == wid]
            assert worker.num_requests == len(reqs), wid
            assert worker.num_prefill_tokens == sum(r.num_prefill_tokens for r in reqs), wid
            refs: dict[object, int] = {}
            for r in reqs:
                for k in r.keys:
                    refs[k] = refs.get(k, 0) + 1
            assert refs == worker.block_refs, wid
