"""The frontend's Prometheus metrics (prefix ``tokenmill_``), in a registry of their own so
several apps (tests) coexist in one process.

Latencies are seconds. ``queue_time`` is the time from the HTTP request's arrival to its
stream being opened on a worker (parsing, chat template, tokenization, router queue); time
queued inside the engine shows in TTFT. Worker gauges (running, waiting, KV usage, prefix hit
rate) are refreshed from the workers' published load at scrape time.

The latency histograms are ``FastHistogram``s: plain bucket counts updated on the event loop
(no lock, one bisect, a count per call so a batch of tokens is one call) and rendered as
ordinary Prometheus histograms (``_bucket``/``_sum``/``_count``) at scrape time.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Sequence

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.metrics_core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from tokenmill.runtime.wire import WorkerLoad

_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
_OVERHEAD_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 1e-2, 0.1, 1.0)


class FastHistogram:
    """A histogram without labels, as ``prometheus_client.Histogram`` renders it, but cheap
    enough to update once per streamed token. Not thread-safe for writers: only the event
    loop observes; a scrape from another thread may see a count one batch ahead of the sum.
    ``buckets`` are the finite upper bounds, ascending (``+Inf`` is added)."""

    def __init__(self, name: str, documentation: str, buckets: Sequence[float],
                 registry: CollectorRegistry):  # fmt: skip
        self.name, self.documentation = name, documentation
        self._bounds = tuple(buckets)
        self._counts = [0] * (len(self._bounds) + 1)  # the last one is +Inf
        self._sum = 0.0
        registry.register(self)

    def observe(self, value: float, count: int = 1) -> None:
        """Records ``count`` observations of ``value``."""
        self._counts[bisect.bisect_left(self._bounds, value)] += count
        self._sum += value * count

    def collect(self) -> Iterator[HistogramMetricFamily]:
        buckets, total = [], 0
        for bound, count in zip((*self._bounds, float("inf")), self._counts, strict=True):
            total += count
            buckets.append((floatToGoString(bound), total))
        yield HistogramMetricFamily(self.name, self.documentation, buckets, self._sum)


class FrontendMetrics:
    def __init__(self) -> None:
        prometheus_client.disable_created_metrics()  # no *_created series (process-wide)
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "tokenmill_requests",
            "HTTP requests by endpoint and status",
            ["endpoint", "status"],
            registry=r,
        )
        self.ttft = FastHistogram(
            "tokenmill_time_to_first_token_seconds", "TTFT", _LATENCY_BUCKETS, r
        )
        self.itl = FastHistogram(
            "tokenmill_inter_token_latency_seconds", "ITL per token", _LATENCY_BUCKETS, r
        )
        self.e2e = FastHistogram(
            "tokenmill_e2e_request_latency_seconds", "E2E per choice", _LATENCY_BUCKETS, r
        )
        self.queue_time = FastHistogram(
            "tokenmill_queue_time_seconds", "arrival to worker stream open", _LATENCY_BUCKETS, r
        )
        self.prompt_tokens = Counter("tokenmill_prompt_tokens", "prompt tokens", registry=r)
        self.generated_tokens = Counter(
            "tokenmill_generation_tokens", "generated tokens", registry=r
        )
        self.cached_tokens = Counter(
            "tokenmill_cached_tokens", "prompt tokens served from cache", registry=r
        )
        self.inflight = Gauge(
            "tokenmill_frontend_inflight_requests", "HTTP requests in flight", registry=r
        )
        self.running = Gauge(
            "tokenmill_num_requests_running", "engine requests running", registry=r
        )
        self.waiting = Gauge(
            "tokenmill_num_requests_waiting", "engine requests waiting", registry=r
        )
        self.kv_usage = Gauge(
            "tokenmill_kv_cache_usage", "KV blocks in use, 0..1", ["worker"], registry=r
        )
        self.hit_rate = Gauge(
            "tokenmill_prefix_cache_hit_rate", "cached/prompt tokens", ["worker"], registry=r
        )
        self.router_decisions = Counter(
            "tokenmill_router_decisions", "routing decisions by worker", ["worker"], registry=r
        )
        self.router_overhead = FastHistogram(
            "tokenmill_router_overhead_seconds", "time to pick a worker", _OVERHEAD_BUCKETS, r
        )

    def observe_route(self, instance_id: str, seconds: float) -> None:
        self.router_decisions.labels(instance_id).inc()
        self.router_overhead.observe(seconds)

    def observe_usage(self, num_prompt: int, num_generated: int, num_cached: int) -> None:
        self.prompt_tokens.inc(num_prompt)
        self.generated_tokens.inc(num_generated)
        self.cached_tokens.inc(num_cached)

    def render(self, loads: Iterable[WorkerLoad]) -> bytes:
        loads = list(loads)
        self.running.set(sum(load.num_running_requests for load in loads))
        self.waiting.set(sum(load.num_waiting_requests for load in loads))
        for load in loads:
            self.kv_usage.labels(load.instance_id).set(load.kv_usage)
            self.hit_rate.labels(load.instance_id).set(load.prefix_hit_rate)
        return generate_latest(self.registry)
