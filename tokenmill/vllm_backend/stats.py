"""Load figures from vLLM's scheduler stats, in the names ``worker.protocol`` reads.

vLLM hands each engine step's ``SchedulerStats`` (and ``IterationStats``) to its stat
loggers on the event loop that runs its output handler; ``stat_logger_factory`` makes a
logger that keeps them in a ``VllmStats``. ``step_time_ms`` is an EWMA of the time between
consecutive reports while requests run (vLLM reports once per engine step with outputs),
which is what our engine loop measures too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

STEP_EWMA = 0.2


class VllmStats:
    """The latest figures; written by vLLM's stat logger, read by ``VllmEngine.stats``."""

    def __init__(self, num_total_blocks: int, clock: Callable[[], float] = time.monotonic):
        self.num_total_blocks = num_total_blocks
        self.clock = clock
        self.num_running = 0
        self.num_waiting = 0
        self.kv_usage = 0.0
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0
        self.num_preemptions = 0
        self.step_time_ms = 0.0
        self._last_report: float | None = None

    def record(self, scheduler_stats: Any, iteration_stats: Any) -> None:
        now = self.clock()
        if scheduler_stats is not None:
            self.num_running = scheduler_stats.num_running_reqs
            self.num_waiting = scheduler_stats.num_waiting_reqs
            self.kv_usage = scheduler_stats.kv_cache_usage
            prefix = scheduler_stats.prefix_cache_stats
            if prefix is not None:
                self.num_queried_tokens += prefix.queries
                self.num_hit_tokens += prefix.hits
        if iteration_stats is not None:
            self.num_preemptions += getattr(iteration_stats, "num_preempted_reqs", 0)
        if self._last_report is not None and self.num_running:
            step_ms = (now - self._last_report) * 1000.0
            old = self.step_time_ms
            self.step_time_ms = step_ms if old == 0 else old + STEP_EWMA * (step_ms - old)
        self._last_report = now

    def snapshot(self) -> dict[str, float | int]:
        queried = self.num_queried_tokens
        return {
            "num_running_requests": self.num_running,
            "num_waiting_requests": self.num_waiting,
            "kv_usage": self.kv_usage,
            "prefix_hit_rate": self.num_hit_tokens / queried if queried else 0.0,
            "num_total_blocks": self.num_total_blocks,
            "step_time_ms": self.step_time_ms,
            "num_preemptions": self.num_preemptions,
        }


def stat_logger_factory(stats: VllmStats) -> Any:
    """A vLLM ``StatLoggerFactory`` whose loggers record into ``stats`` (imports vLLM)."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class _Logger(StatLoggerBase):  # type: ignore[misc]
        def __init__(self, vllm_config: Any, engine_index: int = 0):
            self.stats = stats

        def record(
            self,
            scheduler_stats: Any,
            iteration_stats: Any,
            mm_cache_stats: Any = None,
            engine_idx: int = 0,
        ) -> None:
            self.stats.record(scheduler_stats, iteration_stats)

        def log_engine_initialized(self) -> None:
            pass

    return _Logger
