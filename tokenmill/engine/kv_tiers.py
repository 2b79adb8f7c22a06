"""Assembly of the KV tiers of one real engine: placement, stores, and both connector sides.

    tiers = build_tiers(TierSettings(host_bytes=..., disk_dir=..., remote=...), layout, model)
    core = build_real_core(..., connector=tiers.connector, worker_connector=tiers.worker)
    tiers.attach(core)           # the device pool's eviction hook
    ...
    tiers.stats()                # per tier: capacity, usage, hits, bytes and seconds moved

The placement's tiers are, fastest first, host memory (a ``HostStore`` arena; pinned when the
engine runs on CUDA), local disk (``DiskStore``: its valid blocks from an earlier run are
adopted), and the shared remote store (``NatsObjectStore`` or ``RedisStore``). With no tier
configured ``build_tiers`` returns None and the engine runs with the null connector.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from tokenmill.core.events import Tier
from tokenmill.core.kv_transfer import KvLayout
from tokenmill.kv.tier_connector import TierConnector, TierEventSink
from tokenmill.kv.tiers import PlacementConfig, TierConfig, TierPlacement
from tokenmill.kvstore import record
from tokenmill.kvstore.base import BlockStore
from tokenmill.kvstore.disk import DiskStore, num_slots_for
from tokenmill.kvstore.host import HostStore
from tokenmill.kvstore.io import TierIO
from tokenmill.kvstore.remote import NatsObjectStore, RedisStore

log = logging.getLogger(__name__)
GIB = 1 << 30
HOST_FREE_FRACTION = 0.25  # the default host tier: this much of the memory available at start
HOST_DEFAULT_CAP = 32 * GIB  # ... at most (pinned memory on CUDA is slow to allocate)
DEFAULT_REMOTE = "redis://127.0.0.1:6379"  # the faster remote backend (docs/kv_tiers.md)
REMOTE_NUM_BLOCKS = 1 << 16  # what one worker tracks of the shared store (it evicts itself)


@dataclass(frozen=True)
class TierSettings:
    """``host_bytes`` None: ``HOST_FREE_FRACTION`` of the free memory; 0: no host tier.
    ``remote``: None, ``"nats"`` (the deployment's server at ``nats_url``) or a
    ``redis://HOST:PORT`` URL."""

    host_bytes: int | None = None
    disk_dir: str | None = None
    disk_bytes: int = 10 * GIB
    remote: str | None = None
    nats_url: str | None = None
    write_through: bool = False
    max_bytes_in_flight: int = 256 << 20

    def __post_init__(self) -> None:
        if self.remote not in (None, "nats") and not str(self.remote).startswith("redis://"):
            raise ValueError(
                f"--kv-remote must be 'nats' or redis://HOST:PORT, got {self.remote!r}"
            )
        if self.remote == "nats" and not self.nats_url:
            raise ValueError(
                "--kv-remote nats needs the deployment's NATS (--nats URL or --workers N)"
            )


def fingerprint(layout: KvLayout, model: str) -> int:
    """The layout fingerprint stored with every disk and remote block of ``model``."""
    shape = (layout.num_layers, 2, layout.block_size, layout.num_kv_heads, layout.head_dim)
    return record.layout_fingerprint(model, layout.dtype, layout.block_size, shape)


class KvTiers:
    """The tiers of one engine: ``connector`` (scheduler side), ``worker`` (executor side)."""

    def __init__(
        self, connector: TierConnector, worker: Any, host: HostStore | None, io: TierIO | None
    ):
        self.connector = connector
        self.worker = worker
        self.host = host
        self.io = io

    def attach(self, core: Any) -> None:
        """Hook the device pool of ``core`` (an ``EngineCore``) so evictions offload."""
        self.connector.attach(core.scheduler.kv.pool)

    def stats(self) -> dict[str, dict[str, float]]:
        """Per tier: capacity and used blocks, hits, offloaded / onboarded bytes and seconds,
        misses, times unavailable."""
        placement, out = self.connector.placement, {}
        for tier in placement.tiers:
            c = placement.counters(tier)
            row: dict[str, float] = {
                "capacity_blocks": placement.num_blocks(tier),
                "used_blocks": placement.num_used_blocks(tier),
                "hits": c.hits,
                "stored": c.stored,
                "dropped": c.dropped,
                "evicted": c.evicted,
                "invalid": c.invalid,
            }
            io_stats = self.worker.host_stats if tier is Tier.HOST else self.io.stats[tier]  # type: ignore[union-attr]
            for name in (
                "offloaded_bytes",
                "offload_seconds",
                "onboarded_bytes",
                "onboard_seconds",
            ):
                row[name] = getattr(io_stats, name)
            if tier is not Tier.HOST:
                row["misses"] = sum(io_stats.misses.values())
                row["unavailable"] = io_stats.failures
            out[str(tier)] = row
        return out


def host_bytes_default() -> int:
    """``HOST_FREE_FRACTION`` of the memory available now, at most ``HOST_DEFAULT_CAP``
    (Linux; 0 where unknown). Several workers on one machine should each be given
    ``--kv-host-gib``: each one's default is taken from the same free memory."""
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0
    return min(int(free * HOST_FREE_FRACTION), HOST_DEFAULT_CAP)


def build_tiers(
    settings: TierSettings,
    layout: KvLayout,
    model: str,
    device: str = "cpu",
    tier_sink: TierEventSink | None = None,
) -> KvTiers | None:
    """The tiers ``settings`` name, started (a disk tier adopts what it finds; a store that
    cannot be reached starts down and is retried). None when no tier is configured.
    ``tier_sink`` gets the tiers' KV events (``Stored`` / ``Removed`` with their tier)."""
    from tokenmill.engine.executor.kv_tiers import TierWorker  # torch

    block_bytes = layout.bytes_per_block
    layout_fp = fingerprint(layout, model)
    host_bytes = host_bytes_default() if settings.host_bytes is None else settings.host_bytes
    configs: list[TierConfig] = []
    host = None
    if host_bytes >= block_bytes:
        host = HostStore(
            host_bytes // block_bytes,
            block_bytes,
            _host_buffer(host_bytes // block_bytes * block_bytes, device),
        )
        configs.append(TierConfig(Tier.HOST, host.num_blocks))
    stores: list[BlockStore] = []
    if settings.disk_dir:
        num_slots = num_slots_for(settings.disk_bytes, block_bytes)
        if num_slots >= 1:
            stores.append(DiskStore(settings.disk_dir, num_slots, block_bytes, layout_fp))
            configs.append(TierConfig(Tier.DISK, num_slots))
    if settings.remote:
        stores.append(_remote_store(settings, block_bytes, layout_fp))
        configs.append(TierConfig(Tier.REMOTE, REMOTE_NUM_BLOCKS))
    if not configs:
        return None
    placement = TierPlacement(
        PlacementConfig(
            tuple(configs),
            block_bytes,
            settings.write_through,
            max(settings.max_bytes_in_flight, block_bytes),
        )
    )
    io = None
    if stores:
        io = TierIO(stores)
        for tier, found in io.start().items():
            adopted = sum(placement.adopt(tier, slot, h) for slot, h in found)
            if adopted:
                log.info(
                    "KV %s tier: reusing %d blocks found in %s", tier, adopted, settings.disk_dir
                )
    connector = TierConnector(placement, layout.block_size, tier_sink)
    log.info(
        "KV tiers: %s (%d bytes a block)",
        ", ".join(f"{c.tier} {c.num_blocks} blocks" for c in configs),
        block_bytes,
    )
    return KvTiers(connector, TierWorker(host, io), host, io)


def _host_buffer(num_bytes: int, device: str) -> Any:
    """The host arena: pinned when the engine runs on CUDA (fast, async-capable copies),
    else lazily committed numpy memory (pages are touched only when a slot is written)."""
    if not str(device).startswith("cuda"):
        return None
    import torch

    return torch.empty(num_bytes, dtype=torch.uint8, pin_memory=True).numpy()


def _remote_store(settings: TierSettings, block_bytes: int, fingerprint: int) -> BlockStore:
    if settings.remote == "nats":
        assert settings.nats_url is not None
        return NatsObjectStore(settings.nats_url, block_bytes, fingerprint)
    return RedisStore(str(settings.remote), block_bytes, fingerprint)


def layout_of(loaded: Any, block_size: int) -> KvLayout:
    """The KV layout of a ``LoadedModel``'s cache with blocks of ``block_size`` tokens (the
    builder's ``kv_layout``, the one definition)."""
    from tokenmill.engine.builder import kv_layout

    return kv_layout(loaded.config, str(loaded.dtype).removeprefix("torch."), block_size)
