"""What a worker needs from an engine (``AsyncEngine`` over a real executor or the mocker,
or a test fake), and how its statistics are read.

``generate`` streams ``RequestOutput``s; closing or cancelling the iterator aborts the request
and frees its blocks. ``abort`` and ``shutdown`` may be sync or async (the worker awaits
whatever they return when it is awaitable).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol, runtime_checkable

from tokenmill.core.request import EngineRequest, RequestOutput
from tokenmill.runtime.wire import WorkerLoad


@runtime_checkable
class EngineClient(Protocol):
    def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]: ...

    def abort(self, request_id: str) -> Any: ...

    def is_healthy(self) -> bool: ...

    def stats(self) -> Any: ...

    def shutdown(self) -> Any: ...


# Field names engines use for the same figure, first match wins.
_STAT_NAMES = {
    "num_running_requests": ("num_running_requests", "num_running", "running"),
    "num_waiting_requests": ("num_waiting_requests", "num_waiting", "waiting"),
    "kv_usage": ("kv_usage", "kv_cache_usage", "kv_usage_fraction", "gpu_cache_usage"),
    "prefix_hit_rate": ("prefix_hit_rate", "prefix_cache_hit_rate", "cache_hit_rate"),
    "num_total_blocks": ("num_total_blocks", "num_blocks", "total_blocks"),
    "step_time_ms": ("step_time_ms",),
    "num_waiting_prefill_tokens": ("num_waiting_prefill_tokens",),
    "num_preemptions": ("num_preemptions",),
    "num_held_kv_blocks": ("num_held_blocks",),
    "num_kv_load_failures": ("num_kv_load_failures",),
}


def _lookup(stats: Any, names: tuple[str, ...]) -> Any:
    for name in names:
        value = stats.get(name) if isinstance(stats, Mapping) else getattr(stats, name, None)
        if value is not None:
            return value
    return 0


def load_from_stats(instance_id: str, stats: Any) -> WorkerLoad:
    """A ``WorkerLoad`` from an engine's ``stats()`` (a mapping or an object); missing → 0."""
    values = {key: _lookup(stats, names) for key, names in _STAT_NAMES.items()}
    return WorkerLoad(
        instance_id=instance_id,
        num_running_requests=int(values["num_running_requests"]),
        num_waiting_requests=int(values["num_waiting_requests"]),
        kv_usage=float(values["kv_usage"]),
        prefix_hit_rate=float(values["prefix_hit_rate"]),
        num_total_blocks=int(values["num_total_blocks"]),
        step_time_ms=float(values["step_time_ms"]),
        num_waiting_prefill_tokens=int(values["num_waiting_prefill_tokens"]),
        num_preemptions=int(values["num_preemptions"]),
        num_held_kv_blocks=int(values["num_held_kv_blocks"]),
        num_kv_load_failures=int(values["num_kv_load_failures"]),
    )


async def maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value
