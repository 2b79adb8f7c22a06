"""Asynchronous block I/O for the disk and remote tiers, off the engine thread.

``TierIO`` owns one thread running an asyncio loop on which every ``BlockStore`` coroutine
runs (disk stores hand their blocking calls to their own thread pool). The engine thread
only submits (``put``, ``get``: they return at once) and collects finished operations with
``poll()`` (never blocks); ``notify`` is called from the I/O thread after each completion so
an idle engine loop can wake up for a parked request.

Health: a store that raises ``StoreUnavailable`` is marked down with one warning and a count;
while down, operations on it finish at once as skipped (a put: not stored; a get: a miss with
reason ``unavailable``), except one trial operation after a backoff (1 s, doubling to 30 s);
the first success marks it up again (logged), so a store that comes back is used again.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from tokenmill.core.events import Tier
from tokenmill.kvstore.base import BlockStore, StoreUnavailable
from tokenmill.kvstore.record import Miss

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Done:
    """A finished operation. ``ok``: a put stored the block / a get returned ``payload``
    (checked bytes, owned by the caller now); else ``miss`` says why."""

    op: str  # "put" | "get"
    tier: Tier
    slot: int
    block_hash: int
    ok: bool
    payload: memoryview | None = None
    miss: Miss | None = None
    tag: Any = None


@dataclass
class TierStats:
    """Counters of one tier since start, written by the I/O thread (read them anywhere)."""

    offloaded_bytes: int = 0
    offload_seconds: float = 0.0
    onboarded_bytes: int = 0
    onboard_seconds: float = 0.0
    misses: dict[str, int] = field(default_factory=dict)  # reason -> count
    failures: int = 0  # times the store went from up to down
    skipped: int = 0  # operations skipped while down


class StoreHealth:
    """Up, or down until ``retry_at`` (then one trial). ``clock`` is injected for tests."""

    def __init__(
        self,
        tier: Tier,
        clock: Callable[[], float] = time.monotonic,
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
    ):
        self.tier = tier
        self.up = True
        self._clock = clock
        self._initial = self._backoff = backoff_s
        self._max = max_backoff_s
        self._retry_at = 0.0

    def allow(self) -> bool:
        """Whether to try an operation now (consumes the trial while down)."""
        if self.up:
            return True
        now = self._clock()
        if now < self._retry_at:
            return False
        self._retry_at = now + self._backoff  # one trial per backoff period
        return True

    def failed(self, error: Exception, stats: TierStats) -> None:
        if self.up:
            log.warning(
                "KV %s tier unavailable, skipping it until it recovers: %s", self.tier, error
            )
            stats.failures += 1
        self.up = False
        self._retry_at = self._clock() + self._backoff
        self._backoff = min(self._backoff * 2, self._max)

    def succeeded(self) -> None:
        if not self.up:
            log.warning("KV %s tier is back", self.tier)
        self.up = True
        self._backoff = self._initial


class TierIO:
    """Runs the stores' I/O on its own thread. ``start`` before use, ``close`` at the end."""

    def __init__(
        self,
        stores: Sequence[BlockStore],
        notify: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.stores = {s.tier: s for s in stores}
        self.stats = {tier: TierStats() for tier in self.stores}
        self.health = {tier: StoreHealth(tier, clock) for tier in self.stores}
        self._notify = notify
        self._done: queue.SimpleQueue[Done] = queue.SimpleQueue()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="kv-tier-io", daemon=True
        )
        self._num_pending = 0
        self._lock = threading.Lock()

    def start(self, timeout_s: float = 30.0) -> dict[Tier, list[tuple[int, int]]]:
        """Starts the thread and every store; returns the blocks each found ``(slot, hash)``.
        A store that fails to start is marked down (one warning) and retried later."""
        self._thread.start()
        return self._submit_wait(self._start_all(), timeout_s)

    async def _start_all(self) -> dict[Tier, list[tuple[int, int]]]:
        found: dict[Tier, list[tuple[int, int]]] = {}
        for tier, store in self.stores.items():
            try:
                found[tier] = await store.start()
            except (StoreUnavailable, OSError) as exc:
                self.health[tier].failed(exc, self.stats[tier])
                found[tier] = []
        return found

    @property
    def num_pending(self) -> int:
        """Operations submitted and not yet collected by ``poll``."""
        return self._num_pending

    def put(
        self, tier: Tier, slot: int, block_hash: int, payload: memoryview, tag: Any = None
    ) -> None:
        """Store a block (``payload`` must stay unchanged until its ``Done``: pass a copy)."""
        coro = self._put(tier, slot, block_hash, payload, tag)
        self._submit(self._guard("put", tier, slot, block_hash, tag, coro))

    def get(self, tier: Tier, slot: int, block_hash: int, tag: Any = None) -> None:
        coro = self._get(tier, slot, block_hash, tag)
        self._submit(self._guard("get", tier, slot, block_hash, tag, coro))

    def poll(self) -> list[Done]:
        """Every operation finished since the last call (never blocks)."""
        out: list[Done] = []
        while True:
            try:
                out.append(self._done.get_nowait())
            except queue.Empty:
                break
        with self._lock:
            self._num_pending -= len(out)
        return out

    def wait(self, timeout_s: float) -> list[Done]:
        """Blocks until at least one operation finished or the timeout (tests, benchmarks)."""
        try:
            first = self._done.get(timeout=timeout_s)
        except queue.Empty:
            return []
        with self._lock:
            self._num_pending -= 1
        return [first, *self.poll()]

    def count_present(self, tier: Tier, block_hashes: Sequence[int], timeout_s: float) -> int:
        """Blocking probe of a shared tier (0 when down or on timeout); off the engine step."""
        if not self.health[tier].allow():
            return 0
        try:
            return self._submit_wait(self.stores[tier].count_present(block_hashes), timeout_s)
        except (StoreUnavailable, TimeoutError) as exc:
            self.health[tier].failed(exc, self.stats[tier])
            return 0

    def close(self, timeout_s: float = 10.0) -> None:
        """Closes every store and stops the thread; pending operations may be lost."""
        if not self._thread.is_alive():
            return
        try:
            self._submit_wait(self._close_all(), timeout_s)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout_s)
            self._loop.close()

    async def _close_all(self) -> None:
        for store in self.stores.values():
            try:
                await store.close()
            except Exception:  # noqa: BLE001 - closing must not stop the others
                log.exception("closing the KV %s tier", store.tier)

    # ------------------------------------------------------------------ on the I/O thread

    async def _guard(
        self, op: str, tier: Tier, slot: int, block_hash: int, tag: Any, coro: Any
    ) -> None:
        """Runs ``coro``; a bug in a store still finishes the operation (failed), so nothing
        waits forever on it."""
        try:
            await coro
        except Exception:  # noqa: BLE001 - reported as a failed operation
            log.exception("KV %s tier %s of block %016x failed", tier, op, block_hash)
            self._finish(Done(op, tier, slot, block_hash, False, None, Miss.UNAVAILABLE, tag))

    async def _put(
        self, tier: Tier, slot: int, block_hash: int, payload: memoryview, tag: Any
    ) -> None:
        stats, health = self.stats[tier], self.health[tier]
        if not health.allow():
            stats.skipped += 1
            return self._finish(
                Done("put", tier, slot, block_hash, False, None, Miss.UNAVAILABLE, tag)
            )
        t0 = time.perf_counter()
        try:
            await self.stores[tier].put(slot, block_hash, payload)
        except StoreUnavailable as exc:
            health.failed(exc, stats)
            return self._finish(
                Done("put", tier, slot, block_hash, False, None, Miss.UNAVAILABLE, tag)
            )
        health.succeeded()
        stats.offloaded_bytes += len(payload)
        stats.offload_seconds += time.perf_counter() - t0
        self._finish(Done("put", tier, slot, block_hash, True, tag=tag))

    async def _get(self, tier: Tier, slot: int, block_hash: int, tag: Any) -> None:
        stats, health = self.stats[tier], self.health[tier]
        result: memoryview | Miss
        if not health.allow():
            stats.skipped += 1
            result = Miss.UNAVAILABLE
        else:
            t0 = time.perf_counter()
            try:
                result = await self.stores[tier].get(slot, block_hash)
            except StoreUnavailable as exc:
                health.failed(exc, stats)
                result = Miss.UNAVAILABLE
            else:
                health.succeeded()
                if not isinstance(result, Miss):
                    stats.onboarded_bytes += len(result)
                    stats.onboard_seconds += time.perf_counter() - t0
        if isinstance(result, Miss):
            stats.misses[result.value] = stats.misses.get(result.value, 0) + 1
            return self._finish(Done("get", tier, slot, block_hash, False, None, result, tag))
        self._finish(Done("get", tier, slot, block_hash, True, result, tag=tag))

    def _finish(self, done: Done) -> None:
        self._done.put(done)
        if self._notify is not None:
            self._notify()

    def _submit(self, coro: Coroutine[Any, Any, None]) -> None:
        with self._lock:
            self._num_pending += 1
        asyncio.run_coroutine_threadsafe(coro, self._loop)

    def _submit_wait(self, coro: Coroutine[Any, Any, T], timeout_s: float) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout_s)
        except TimeoutError:
            future.cancel()
            raise
