"""The scheduler side of the KV tier connector (pure: no I/O, no clock): prefix lookup past
the device tier, onboard plans, and offload plans on device eviction, all decided by one
``TierPlacement``. The bytes move in the worker side (``engine.executor.kv_tiers``).

Per step, in the engine loop's thread::

    schedule()   admission: get_num_new_matched_tokens -> the longest run of the request's
                 next full blocks ready in some lower tier (host, then disk, then remote);
                 all in host: a sync load (done before the forward), else async (parked)
                 update_state_after_alloc -> pin the hits (no eviction while read)
                 allocate() evicting device blocks -> the pool's evict hook queues them
    build_connector_meta()  -> ``TierMetadata``: the queued evictions become ordered
                 ``Write``s (write-back: device -> host, host victims -> disk -> remote), the
                 new loads with their ``Hit``s, and every tier's write results pending
    forward      (the worker side copied evicted blocks out and sync loads in, before it)
    update_connector_output(TierOutput)  <- writes committed or failed, entries found
                 invalid (checksum, truncated, absent), loads finished or failed: unpin

Evictions are planned at ``build_connector_meta``, not inside ``allocate``, so the placement
does not change between a request's lookup and its pinning; an evicted device block is only
overwritten by the step's forward or loads, which the worker side runs after its copies.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

from tokenmill.core.events import KvEventData, Removed, Stored, StoredBlock, Tier
from tokenmill.kv.block_pool import BlockPool
from tokenmill.kv.connector import (
    ConnectorMetadata,
    ConnectorOutput,
    ConnectorRequest,
    KvLoad,
    SchedulerConnector,
)
from tokenmill.kv.tiers import Hit, TierPlacement, Write

TierEventSink = Callable[[KvEventData, Tier], None]
"""Where the tiers' KV events go (``worker.kv_publisher.KvPublisher.sink`` takes the tier)."""


class TierMetadata(ConnectorMetadata, frozen=True, kw_only=True):
    """``writes``: carry out in order (see ``TierPlacement.offload``); ``hits``: per load in
    ``loads``, where each of its blocks is (``hits[i]`` for ``block_ids[i]``)."""

    writes: list[Write] = []
    hits: dict[str, list[Hit]] = {}


class TierOutput(ConnectorOutput, frozen=True, kw_only=True):
    """``written``: ``(tier, block_hash, ok)`` per finished disk or remote ``Write`` (host
    copies need no report); ``invalid``:
    ``(tier, block_hash)`` entries whose bytes proved wrong or gone."""

    written: list[tuple[Tier, int, bool]] = []
    invalid: list[tuple[Tier, int]] = []

    @property
    def is_empty(self) -> bool:
        return super().is_empty and not (self.written or self.invalid)


class TierConnector(SchedulerConnector):
    """Lookup, onboard and offload over ``placement`` for a pool of ``block_size`` blocks.
    ``attach(pool)`` before the first step (the eviction hook)."""

    def __init__(
        self, placement: TierPlacement, block_size: int, tier_sink: TierEventSink | None = None
    ):
        self.placement = placement
        self.block_size = block_size
        self._tier_sink = tier_sink
        self._evicted: list[tuple[int, int]] = []  # (device block id, hash), eviction order
        self._new_loads: list[KvLoad] = []
        self._new_hits: dict[str, list[Hit]] = {}
        self._reading: dict[str, tuple[list[Hit], int]] = {}  # request id -> hits, bytes reserved
        self._num_writes_in_flight = 0
        self._held: set[str] = set()  # finished while its load runs: blocks held until it ends
        self._releasable: list[str] = []
        self.num_onboarded_blocks = 0
        self.num_failed_loads = 0

    def attach(self, pool: BlockPool) -> None:
        pool.evict_hook = self._on_evict

    def _on_evict(self, block_ids: Sequence[int], block_hashes: Sequence[int]) -> None:
        self._evicted.extend(zip(block_ids, block_hashes, strict=True))

    # ------------------------------------------------------------------ loading

    def get_num_new_matched_tokens(
        self, request: ConnectorRequest, num_computed_tokens: int
    ) -> tuple[int, bool]:
        hits = self._lookup(request, num_computed_tokens)
        if not hits:
            return 0, False
        is_async = any(self.placement.is_async(h.tier) for h in hits)
        return len(hits) * self.block_size, is_async

    def _lookup(self, request: ConnectorRequest, num_computed_tokens: int) -> list[Hit]:
        first = num_computed_tokens // self.block_size
        last = (request.num_tokens - 1) // self.block_size  # the last token is computed here
        if first >= last:
            return []
        return self.placement.lookup(request.block_hashes[first:last])

    def update_state_after_alloc(
        self,
        request: ConnectorRequest,
        block_ids: Sequence[int],
        num_computed_tokens: int,
        num_external_tokens: int,
    ) -> None:
        num_blocks = num_external_tokens // self.block_size
        hits = self._lookup(request, num_computed_tokens)[:num_blocks]
        if len(hits) != num_blocks:  # nothing changed the placement since the lookup
            raise AssertionError("tier hits changed between lookup and allocation")
        first = num_computed_tokens // self.block_size
        self.placement.pin(hits)
        num_bytes = sum(
            self.placement.config.block_bytes for h in hits if self.placement.is_async(h.tier)
        )
        self.placement.bytes_in_flight += num_bytes  # counted, never refused: already promised
        is_async = num_bytes > 0
        self._reading[request.request_id] = (hits, num_bytes)
        self._new_hits[request.request_id] = hits
        self._new_loads.append(
            KvLoad(
                request_id=request.request_id,
                block_ids=list(block_ids[first : first + num_blocks]),
                first_block=first,
                num_tokens=num_external_tokens,
                block_hashes=[h.block_hash for h in hits],
                is_async=is_async,
            )
        )

    # ------------------------------------------------------------------ each step

    def build_connector_meta(self) -> ConnectorMetadata | None:
        writes: list[Write] = []
        evicted, self._evicted = self._evicted, []
        for block_id, block_hash in evicted:
            writes.extend(self.placement.offload(block_hash, block_id))
        self._num_writes_in_flight += sum(1 for w in writes if self.placement.is_async(w.dst))
        loads, self._new_loads = self._new_loads, []
        hits, self._new_hits = self._new_hits, {}
        self._emit()
        if not (writes or loads or self.has_pending()):
            return None
        return TierMetadata(loads=loads, writes=writes, hits=hits)

    def _emit(self) -> None:
        """KV events for the tiers' changes: ``Stored`` / ``Removed`` with the tier, runs of
        one kind grouped. Lower-tier ``Stored`` blocks carry the chained hash only (parent
        None, local hash 0): the placement keys by it, and routers index by it."""
        changes = self.placement.take_changes()
        if not changes or self._tier_sink is None:
            return
        for (tier, stored), group in itertools.groupby(changes, key=lambda c: (c[0], c[2])):
            hashes = [h for _, h, _ in group]
            data: KvEventData = (
                Stored(None, [StoredBlock(h, 0) for h in hashes]) if stored else Removed(hashes)
            )
            self._tier_sink(data, tier)

    def update_connector_output(self, output: ConnectorOutput) -> None:
        if isinstance(output, TierOutput):
            for tier, block_hash, ok in output.written:
                self.placement.commit(tier, block_hash, ok)
            self._num_writes_in_flight -= len(output.written)
            for tier, block_hash in output.invalid:
                self.placement.invalidate(tier, block_hash)
        for request_id in output.finished_loads:
            self._end_read(request_id, ok=True)
        for request_id in output.failed_loads:
            self._end_read(request_id, ok=False)
        self._emit()

    def _end_read(self, request_id: str, ok: bool) -> None:
        entry = self._reading.pop(request_id, None)
        if request_id in self._held:
            self._held.discard(request_id)
            self._releasable.append(request_id)
        if entry is None:
            return
        hits, num_bytes = entry
        self.placement.unpin(hits)
        self.placement.unreserve(num_bytes)
        if ok:
            self.num_onboarded_blocks += len(hits)
        else:
            self.num_failed_loads += 1

    def has_pending(self) -> bool:
        return bool(self._reading or self._num_writes_in_flight or self._evicted or self._held)

    # ------------------------------------------------------------------ finishing

    def request_finished(self, request: ConnectorRequest, block_ids: Sequence[int]) -> bool:
        """Hold the blocks of a request whose onboard is still running (bytes may still land
        in them); offloads never hold: they copy at eviction, before the blocks are reused."""
        if request.request_id in self._reading:
            self._held.add(request.request_id)
            return True
        return False

    def take_releasable(self) -> list[str]:
        out, self._releasable = self._releasable, []
        return out

    def check_integrity(self) -> None:
        self.placement.check_integrity()
        if self._num_writes_in_flight < 0:
            raise AssertionError("TierConnector integrity: more writes finished than planned")
