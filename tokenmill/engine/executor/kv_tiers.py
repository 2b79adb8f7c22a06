"""The worker side of the KV tier connector: moves the bytes ``kv.tier_connector`` planned.

``start_load_kv(TierMetadata)``, before the step's forward, in the engine loop's thread:

1. ``writes`` in order. Device -> host copies are gathered into one ``BlockCopier.save_to``
   batch (flushed before anything reads a host slot the batch writes); a write into an async
   tier takes a snapshot of its source at once (a host slot, or the device block when there
   is no host tier) and goes to ``TierIO``; disk -> remote demotions read the disk slot first
   and put it when the read lands. Host writes are done when this returns.
2. ``loads``: host hits are copied into their device blocks at once (all of a sync load is);
   disk and remote hits are read through ``TierIO`` and copied in when they land.

``get_finished`` (never blocks) collects I/O results: async puts become ``written``; a read that
missed (checksum, truncated, absent, unavailable) fails its load (the scheduler recomputes
it) and marks the entry ``invalid`` (except ``unavailable``: the bytes may be fine); a load
whose blocks all landed is finished. Nothing here touches the placement: the scheduler side
applies the ``TierOutput``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tokenmill.core.events import Tier
from tokenmill.engine.executor.kv_blocks import BlockCopier
from tokenmill.engine.executor.kv_connector import WorkerConnector
from tokenmill.kv.connector import ConnectorMetadata, KvLoad
from tokenmill.kv.tier_connector import TierMetadata, TierOutput
from tokenmill.kv.tiers import Hit, Write
from tokenmill.kvstore.host import HostStore
from tokenmill.kvstore.io import Done, TierIO
from tokenmill.kvstore.record import Miss

log = logging.getLogger(__name__)


@dataclass
class HostStats:
    """The host tier's copies (the async tiers' are ``TierIO.stats``)."""

    offloaded_bytes: int = 0
    offload_seconds: float = 0.0
    onboarded_bytes: int = 0
    onboard_seconds: float = 0.0


@dataclass
class _Load:
    load: KvLoad
    waiting: set[int] = field(default_factory=set)  # device block ids still to land
    failed: bool = False


class TierWorker(WorkerConnector):
    """``host``: the host arena (None: no host tier); ``io``: the async tiers (started)."""

    def __init__(self, host: HostStore | None, io: TierIO | None):
        self.host = host
        self.io = io
        self.copier: BlockCopier | None = None
        self._arena: torch.Tensor | None = None
        if host is not None:
            self._arena = torch.from_numpy(host.arena)  # [num_slots, block_bytes] uint8
        self.host_stats = HostStats()
        self._loads: dict[str, _Load] = {}
        self._written: list[tuple[Tier, int, bool]] = []
        self._invalid: list[tuple[Tier, int]] = []
        self._finished: list[str] = []
        self._failed: list[str] = []

    def register_kv_caches(self, k_caches: Sequence[Any], v_caches: Sequence[Any]) -> None:
        self.copier = BlockCopier(k_caches, v_caches)
        if self.host is not None and self.host.block_bytes != self.copier.block_bytes:
            raise ValueError(
                f"host tier slots of {self.host.block_bytes} bytes, blocks of {self.copier.block_bytes}"
            )

    # ------------------------------------------------------------------ before the forward

    def start_load_kv(self, metadata: ConnectorMetadata) -> None:
        if not isinstance(metadata, TierMetadata):
            return
        self._run_writes(metadata.writes)
        for load in metadata.loads:
            self._start_load(load, metadata.hits[load.request_id])

    def _run_writes(self, writes: Sequence[Write]) -> None:
        batch: list[Write] = []  # device -> host, not yet copied
        for w in writes:
            if w.src is Tier.DEVICE and w.dst is Tier.HOST:
                # a slot written twice in one plan (its first block evicted again at once):
                # only the last copy is live, and one index_copy_ must not see both
                batch = [b for b in batch if b.dst_slot != w.dst_slot]
                batch.append(w)
                continue
            if w.src is Tier.HOST and any(b.dst_slot == w.src_slot for b in batch):
                self._flush_host(batch)
                batch = []
            self._write_async(w)
        self._flush_host(batch)

    def _flush_host(self, batch: list[Write]) -> None:
        if not batch:
            return
        copier, host, arena = self._require_copier(), self.host, self._arena
        assert host is not None and arena is not None
        t0 = time.perf_counter()
        copier.save_to([w.src_slot for w in batch], arena, [w.dst_slot for w in batch])
        for w in batch:
            host.mark(w.dst_slot, w.block_hash)  # ready in the placement since planned
        self.host_stats.offload_seconds += time.perf_counter() - t0
        self.host_stats.offloaded_bytes += len(batch) * copier.block_bytes

    def _write_async(self, w: Write) -> None:
        io = self.io
        if io is None:
            raise RuntimeError(f"a write to {w.dst} without async tiers")
        if w.src is Tier.HOST:
            assert self.host is not None
            payload = self.host.read(w.src_slot, w.block_hash)
            if isinstance(payload, Miss):  # the slot changed under the plan: a lost demotion
                self._written.append((w.dst, w.block_hash, False))
                return
            io.put(w.dst, w.dst_slot, w.block_hash, memoryview(payload.copy()), tag=("put", w))
        elif w.src is Tier.DEVICE:
            data = self._require_copier().save([w.src_slot])  # [1, block_bytes], a copy
            io.put(w.dst, w.dst_slot, w.block_hash, memoryview(data.numpy()[0]), tag=("put", w))
        else:  # disk -> remote: read the source slot, put it when it lands
            io.get(w.src, w.src_slot, w.block_hash, tag=("demote", w))

    def _start_load(self, load: KvLoad, hits: list[Hit]) -> None:
        state = self._loads[load.request_id] = _Load(load)
        host_ids, host_slots = [], []
        for block_id, hit in zip(load.block_ids, hits, strict=True):
            if hit.tier is Tier.HOST:
                host_ids.append(block_id)
                host_slots.append(hit.slot)
            else:
                assert self.io is not None
                state.waiting.add(block_id)
                self.io.get(
                    hit.tier, hit.slot, hit.block_hash, tag=("load", load.request_id, block_id)
                )
        if host_ids:
            self._load_host(host_ids, host_slots, hits)
        if not state.waiting:
            self._end_load(load.request_id)

    def _load_host(self, block_ids: list[int], slots: list[int], hits: list[Hit]) -> None:
        copier, arena = self._require_copier(), self._arena
        assert arena is not None
        t0 = time.perf_counter()
        copier.load_from(block_ids, arena, slots)
        self.host_stats.onboard_seconds += time.perf_counter() - t0
        self.host_stats.onboarded_bytes += len(block_ids) * copier.block_bytes

    # ------------------------------------------------------------------ after the step

    def get_finished(self) -> TierOutput | None:
        if self.io is not None:
            for done in self.io.poll():
                self._collect(done)
        if not (self._written or self._invalid or self._finished or self._failed):
            return None
        out = TierOutput(
            finished_loads=self._finished,
            failed_loads=self._failed,
            written=self._written,
            invalid=self._invalid,
        )
        self._finished, self._failed, self._written, self._invalid = [], [], [], []
        return out

    def _collect(self, done: Done) -> None:
        kind = done.tag[0]
        if kind == "put":
            self._written.append((done.tier, done.block_hash, done.ok))
        elif kind == "demote":
            w: Write = done.tag[1]
            if done.ok and done.payload is not None and self.io is not None:
                self.io.put(w.dst, w.dst_slot, w.block_hash, done.payload, tag=("put", w))
            else:
                self._written.append((w.dst, w.block_hash, False))
                self._note_miss(done)
        else:
            self._land(done.tag[1], done.tag[2], done)

    def _land(self, request_id: str, block_id: int, done: Done) -> None:
        state = self._loads.get(request_id)
        if state is None:
            return
        state.waiting.discard(block_id)
        if done.ok and done.payload is not None and not state.failed:
            array = np.frombuffer(done.payload, dtype=np.uint8)
            if not array.flags.writeable:  # bytes from a remote store: torch wants writable
                array = array.copy()
            self._require_copier().load([block_id], torch.from_numpy(array).view(1, -1))
        elif not done.ok:
            state.failed = True
            self._note_miss(done)
        if not state.waiting:
            self._end_load(request_id)

    def _note_miss(self, done: Done) -> None:
        if done.miss is not Miss.UNAVAILABLE:
            self._invalid.append((done.tier, done.block_hash))
        log.debug("KV %s tier miss for block %016x: %s", done.tier, done.block_hash, done.miss)

    def _end_load(self, request_id: str) -> None:
        state = self._loads.pop(request_id)
        (self._failed if state.failed else self._finished).append(request_id)

    def _require_copier(self) -> BlockCopier:
        if self.copier is None:
            raise RuntimeError("the KV caches were never registered")
        return self.copier

    def shutdown(self) -> None:
        if self.io is not None:
            self.io.close()
