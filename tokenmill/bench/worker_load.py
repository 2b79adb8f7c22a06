"""Per-worker load from a server's Prometheus ``/metrics`` page, sampled during a benchmark.

A series counts as per-worker when it carries one of :data:`WORKER_LABELS` and its metric name
matches the pattern (default: names that look like load: active/running/in-flight requests, KV
usage, router decisions; tokenmill's frontend labels them ``worker``). Servers that expose no
such series (or no ``/metrics``) are skipped with a reason.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tokenmill.bench.client import HttpClient

WORKER_LABELS = ("worker_id", "worker", "instance_id", "worker_instance_id", "instance", "dp_rank")
DEFAULT_PATTERN = r"active|running|in_?flight|num_requests|usage|load|queue|decisions"


def parse_worker_gauges(text: str, pattern: str = DEFAULT_PATTERN) -> dict[str, dict[str, float]]:
    """``{metric_name: {worker: value}}`` for matching per-worker series. Several series of one
    metric and worker (other labels differ) are summed. Raises ValueError on unparsable text."""
    regex = re.compile(pattern)
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        if family.type not in ("gauge", "unknown", "untyped", "counter") or not regex.search(
            family.name
        ):
            continue
        for sample in family.samples:
            if sample.name.endswith("_created"):  # counters' creation timestamps, not load
                continue
            worker = next((sample.labels[k] for k in WORKER_LABELS if k in sample.labels), None)
            if worker is not None:
                series = out.setdefault(sample.name, {})
                series[worker] = series.get(worker, 0.0) + float(sample.value)
    return out


@dataclass
class WorkerLoadSampler:
    """Polls ``GET /metrics`` every ``interval_s`` until :meth:`stop`; gives up for good at the
    first HTTP or parse failure (``skipped`` says why); pages with no matching series are not
    recorded. ``samples`` holds ``(t_s, {metric: {worker: v}})`` with
    ``t_s`` relative to ``origin_s``."""

    client: HttpClient
    origin_s: float
    interval_s: float = 1.0
    pattern: str = DEFAULT_PATTERN
    samples: list[tuple[float, dict[str, dict[str, float]]]] = field(default_factory=list)
    skipped: str | None = None
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        while not self._stop.is_set():
            if not await self._sample_once():
                return
            try:
                await asyncio.wait_for(self._stop.wait(), self.interval_s)
            except TimeoutError:
                pass

    def stop(self) -> None:
        self._stop.set()

    async def _sample_once(self) -> bool:
        try:
            status, text = await self.client.get_text("/metrics", timeout_s=5.0)
            if status != 200:
                self.skipped = f"GET /metrics returned HTTP {status}"
                return False
            gauges = parse_worker_gauges(text, self.pattern)
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            self.skipped = f"GET /metrics failed: {e!r}"[:200]
            return False
        if not gauges:  # keep polling: workers may register their series later
            self.skipped = f"/metrics has no per-worker series matching {self.pattern!r}"
            return True
        self.samples.append((time.perf_counter() - self.origin_s, gauges))
        return True

    def report(self) -> dict:
        """JSON-ready: ``{"samples": [{"t_s", "metrics"}]}`` or ``{"skipped": reason}``."""
        if not self.samples:
            return {"skipped": self.skipped or "no samples taken"}
        return {"samples": [{"t_s": t, "metrics": m} for t, m in self.samples]}
