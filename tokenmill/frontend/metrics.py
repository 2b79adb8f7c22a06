"""The frontend's Prometheus metrics (prefix ``tokenmill_``), in a registry of their own so
several apps (tests) coexist in one process.

Latencies are seconds. ``queue_time`` is the time from the HTTP request's arrival to its
first scheduling in the engine: parsing, chat template, tokenization, router queue, then the
engine's waiting queue (waiting for a batch slot or free KV blocks; the engine's first output
says how long: ``RequestOutput.queue_time_s``; an engine that does not say counts as 0).
Request metrics carry the served ``model``'s name (empty for a request that named no
served model). Worker gauges (running, waiting, KV usage, prefix hit rate) and the workers'
preemption counts are refreshed from their published load at scrape time.

The latency histograms are ``FastHistogram``s: plain bucket counts updated on the event loop
(no lock, one bisect, a count per call so a batch of tokens is one call) and rendered as
ordinary Prometheus histograms (``_bucket``/``_sum``/``_count``) at scrape time. A served
model's children are looked up once (``for_model``), not per token.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily
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
# token counts per request: 1, 2, 5, 10, ... 200k
_LENGTH_BUCKETS = tuple(m * 10**e for e in range(6) for m in (1, 2, 5))
_BYTES_BUCKETS = tuple(float(1 << e) for e in range(12, 31, 2))  # 4 KiB .. 1 GiB
_OVERHEAD_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 1e-2, 0.1, 1.0)


class Buckets:
    """One histogram's (or one labelled child's) counts. Not thread-safe for writers: only
    the event loop observes; a scrape from another thread may see a count one batch ahead
    of the sum."""

    def __init__(self, bounds: tuple[float, ...]):
        self._bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float, count: int = 1) -> None:
        """Records ``count`` observations of ``value``."""
        self.counts[bisect.bisect_left(self._bounds, value)] += count
        self.sum += value * count

    def cumulative(self) -> list[tuple[str, float]]:
        buckets, total = [], 0
        for bound, count in zip((*self._bounds, float("inf")), self.counts, strict=True):
            total += count
            buckets.append((floatToGoString(bound), total))
        return buckets


class FastHistogram:
    """A histogram, as ``prometheus_client.Histogram`` renders it, but cheap enough to update
    once per streamed token. ``buckets`` are the finite upper bounds, ascending (``+Inf`` is
    added). Without ``labelnames`` it observes itself; with them, ``labels(*values)`` gives
    the child to observe (keep it: the lookup is per call)."""

    def __init__(
        self,
        name: str,
        documentation: str,
        buckets: Sequence[float],
        registry: CollectorRegistry,
        labelnames: Sequence[str] = (),
    ):
        self.name, self.documentation = name, documentation
        self._bounds, self._labelnames = tuple(buckets), tuple(labelnames)
        self._children: dict[tuple[str, ...], Buckets] = {}
        self._default = None if self._labelnames else self.labels()
        registry.register(self)

    def observe(self, value: float, count: int = 1) -> None:
        """Records ``count`` observations of ``value`` (a histogram without labels)."""
        assert self._default is not None, f"{self.name} has labels: observe a child"
        self._default.observe(value, count)

    def labels(self, *values: str) -> Buckets:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self._labelnames):
                raise ValueError(f"{self.name}: labels {self._labelnames}, got {values}")
            child = self._children[values] = Buckets(self._bounds)
        return child

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self._labelnames)
        for values, child in list(self._children.items()):
            family.add_metric(list(values), child.cumulative(), child.sum)
        yield family


class ModelMetrics:
    """The request metrics of one served model: the children of ``FrontendMetrics``'
    labelled metrics for its name, looked up once."""

    def __init__(self, metrics: FrontendMetrics, model: str):
        self.model = model
        self.ttft = metrics.ttft.labels(model)
        self.itl = metrics.itl.labels(model)
        self.e2e = metrics.e2e.labels(model)
        self.queue_time = metrics.queue_time.labels(model)
        self.prompt_tokens = metrics.prompt_tokens.labels(model)
        self.generated_tokens = metrics.generated_tokens.labels(model)
        self.cached_tokens = metrics.cached_tokens.labels(model)
        self.prompt_length = metrics.prompt_length.labels(model)
        self.generation_length = metrics.generation_length.labels(model)
        self._finish = metrics.finish_reasons
        self._finishes: dict[str, Any] = {}  # reason -> its counter child
        self._disagg = metrics.disagg_decisions
        self._decisions: dict[tuple[bool, str], Any] = {}
        self.disagg_fallbacks = _Labelled(metrics.disagg_fallbacks, model)
        self.kv_releases = metrics.kv_releases.labels(model)
        self.kv_transfer_seconds = metrics.kv_transfer_seconds.labels(model)
        self.kv_transfer_bytes = metrics.kv_transfer_bytes.labels(model)

    def observe_disagg(self, remote: bool, reason: str) -> None:
        """One conditional-disaggregation decision (``router.disagg``)."""
        counter = self._decisions.get((remote, reason))
        if counter is None:
            where = "remote" if remote else "local"
            counter = self._decisions[(remote, reason)] = self._disagg.labels(
                self.model, where, reason
            )
        counter.inc()

    def observe_kv_transfer(self, report: Any) -> None:
        """One decode worker's KV load (``core.kv_transfer.KvTransferReport``)."""
        self.kv_transfer_seconds.observe(report.seconds)
        self.kv_transfer_bytes.observe(report.num_bytes)

    def finished(self, reason: str) -> None:
        """One choice ended with ``reason`` (stop, length, abort, error)."""
        counter = self._finishes.get(reason)
        if counter is None:
            counter = self._finishes[reason] = self._finish.labels(self.model, reason)
        counter.inc()


class _Labelled:
    """A counter's children for one model, by one more label."""

    def __init__(self, counter: Counter, model: str):
        self._counter, self._model = counter, model

    def labels(self, value: str) -> Any:
        return self._counter.labels(self._model, value)


class _Preemptions:
    """``tokenmill_num_preemptions_total{worker}``: each live worker's own cumulative count
    (from its load), so a restarted worker reads as a counter reset."""

    def __init__(self, registry: CollectorRegistry):
        self.loads: list[WorkerLoad] = []
        registry.register(self)

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "tokenmill_num_preemptions",
            "requests preempted by each worker's engine",
            labels=["worker"],
        )
        for load in self.loads:
            family.add_metric([load.instance_id], load.num_preemptions)
        yield family
        failures = CounterMetricFamily(
            "tokenmill_kv_load_failures",
            "KV loads from a prefill worker that failed and were recomputed, by worker",
            labels=["worker"],
        )
        for load in self.loads:
            failures.add_metric([load.instance_id], load.num_kv_load_failures)
        yield failures


class FrontendMetrics:
    def __init__(self) -> None:
        prometheus_client.disable_created_metrics()  # no *_created series (process-wide)
        self.registry = r = CollectorRegistry()
        self._models: dict[str, ModelMetrics] = {}
        self.requests = Counter(
            "tokenmill_requests",
            "HTTP requests by endpoint, status and model",
            ["endpoint", "status", "model"],
            registry=r,
        )
        model = ["model"]
        self.ttft = FastHistogram(
            "tokenmill_time_to_first_token_seconds", "TTFT", _LATENCY_BUCKETS, r, model
        )
        self.itl = FastHistogram(
            "tokenmill_inter_token_latency_seconds", "ITL per token", _LATENCY_BUCKETS, r, model
        )
        self.e2e = FastHistogram(
            "tokenmill_e2e_request_latency_seconds", "E2E per choice", _LATENCY_BUCKETS, r, model
        )
        self.queue_time = FastHistogram(
            "tokenmill_queue_time_seconds",
            "arrival to first scheduled in the engine",
            _LATENCY_BUCKETS,
            r,
            model,
        )
        self.prompt_length = FastHistogram(
            "tokenmill_request_prompt_tokens",
            "prompt tokens per request",
            _LENGTH_BUCKETS,
            r,
            model,
        )
        self.generation_length = FastHistogram(
            "tokenmill_request_generation_tokens",
            "generated tokens per request (all choices)",
            _LENGTH_BUCKETS,
            r,
            model,
        )
        self.finish_reasons = Counter(
            "tokenmill_request_finish",
            "choices ended, by finish reason (stop, length, abort, error)",
            ["model", "finish_reason"],
            registry=r,
        )
        self.prompt_tokens = Counter("tokenmill_prompt_tokens", "prompt tokens", model, registry=r)
        self.generated_tokens = Counter(
            "tokenmill_generation_tokens", "generated tokens", model, registry=r
        )
        self.cached_tokens = Counter(
            "tokenmill_cached_tokens", "prompt tokens served from cache", model, registry=r
        )
        self._preemptions = _Preemptions(r)
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
        self.disagg_decisions = Counter(
            "tokenmill_disagg_decisions",
            "where requests prefilled (remote on a prefill worker, or local), by reason",
            ["model", "prefill", "reason"],
            registry=r,
        )
        self.disagg_fallbacks = Counter(
            "tokenmill_disagg_fallbacks",
            "remote prefills that failed and prefilled locally instead, by cause",
            ["model", "cause"],
            registry=r,
        )
        self.kv_releases = Counter(
            "tokenmill_kv_transfer_releases",
            "prefill workers' held blocks freed at once by the frontend (decode leg failed, "
            "rejected or the client left)",
            model,
            registry=r,
        )
        self.kv_transfer_seconds = FastHistogram(
            "tokenmill_kv_transfer_seconds",
            "KV READ of one request by its decode worker (start to checked)",
            _LATENCY_BUCKETS,
            r,
            model,
        )
        self.kv_transfer_bytes = FastHistogram(
            "tokenmill_kv_transfer_bytes", "KV bytes moved per request", _BYTES_BUCKETS, r, model
        )
        self.kv_held_blocks = Gauge(
            "tokenmill_kv_held_blocks",
            "KV blocks a worker holds for transfers of finished requests",
            ["worker"],
            registry=r,
        )
        self.router_overhead = FastHistogram(
            "tokenmill_router_overhead_seconds", "time to pick a worker", _OVERHEAD_BUCKETS, r
        )

    def observe_route(self, instance_id: str, seconds: float) -> None:
        self.router_decisions.labels(instance_id).inc()
        self.router_overhead.observe(seconds)

    def for_model(self, model: str) -> ModelMetrics:
        """The metrics of ``model`` (made once per name)."""
        found = self._models.get(model)
        if found is None:
            found = self._models[model] = ModelMetrics(self, model)
        return found

    def observe_usage(
        self, model: str, num_prompt: int, num_generated: int, num_cached: int
    ) -> None:
        """One request that completed: its token counts."""
        m = self.for_model(model)
        m.prompt_tokens.inc(num_prompt)
        m.generated_tokens.inc(num_generated)
        m.cached_tokens.inc(num_cached)
        m.prompt_length.observe(num_prompt)
        m.generation_length.observe(num_generated)

    def render(self, loads: Iterable[WorkerLoad]) -> bytes:
        loads = self._preemptions.loads = list(loads)
        self.running.set(sum(load.num_running_requests for load in loads))
        self.waiting.set(sum(load.num_waiting_requests for load in loads))
        for load in loads:
            self.kv_usage.labels(load.instance_id).set(load.kv_usage)
            self.hit_rate.labels(load.instance_id).set(load.prefix_hit_rate)
            self.kv_held_blocks.labels(load.instance_id).set(load.num_held_kv_blocks)
        return generate_latest(self.registry)
