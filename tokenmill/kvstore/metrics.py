"""Prometheus metrics of the KV tiers, read from a stats callable at scrape time.

``TierCollector(stats)``, where ``stats()`` returns ``{tier: {name: value}}`` (as
``engine.kv_tiers.KvTiers.stats`` does), exposes per tier (label ``tier``):

    tokenmill_kv_tier_capacity_blocks, tokenmill_kv_tier_used_blocks          gauges
    tokenmill_kv_tier_hits_total, ..._offloaded_bytes_total, ..._offload_seconds_total,
    ..._onboarded_bytes_total, ..._onboard_seconds_total, ..._stored_total,
    ..._dropped_total, ..._evicted_total, ..._invalid_total, ..._misses_total,
    ..._unavailable_total                                                     counters
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

GAUGES = {"capacity_blocks": "blocks the tier can hold", "used_blocks": "blocks in the tier"}
COUNTERS = {
    "hits": "blocks onboarded from the tier",
    "stored": "blocks written into the tier",
    "dropped": "blocks not written (bytes-in-flight cap, nothing evictable)",
    "evicted": "blocks evicted from the tier",
    "invalid": "stored blocks found wrong or gone (checksum, layout, truncated)",
    "offloaded_bytes": "bytes written into the tier",
    "offload_seconds": "seconds spent writing into the tier",
    "onboarded_bytes": "bytes read back from the tier",
    "onboard_seconds": "seconds spent reading from the tier",
    "misses": "reads that returned no block",
    "unavailable": "times the tier's store became unreachable or full",
}


class TierCollector:
    def __init__(self, stats: Callable[[], dict[str, dict[str, float]]]):
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        for name, doc in GAUGES.items():
            family = GaugeMetricFamily(f"tokenmill_kv_tier_{name}", doc, labels=["tier"])
            for tier, row in stats.items():
                family.add_metric([tier], row.get(name, 0))
            yield family
        for name, doc in COUNTERS.items():
            counter = CounterMetricFamily(f"tokenmill_kv_tier_{name}", doc, labels=["tier"])
            for tier, row in stats.items():
                if name in row:
                    counter.add_metric([tier], row[name])
            yield counter
