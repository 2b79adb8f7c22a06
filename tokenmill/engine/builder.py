"""The one place an engine is assembled: ``Scheduler`` + executor -> ``EngineCore``.

Every engine in tokenmill (the launcher's real and mocker engines, the offline ``LLM``, the
engine benchmark, the offline replay's workers, tests) is built by these functions:

- ``build_core``: any executor; the scheduler gets the cache, EOS ids and KV event sink.
  Every other builder ends here.
- ``build_real_core``: a ``LoadedModel`` (``engine.loader``) with the real ``ModelRunner``;
  the pool is sized from a memory budget unless a ``CacheConfig`` is given.
- ``build_mock_core``: the mocker (``MockExecutor``: simulated step times, deterministic
  tokens, no EOS); without a pacer it does not sleep (the replay reads ``last_step_ms``).
- ``build_async_engine``: the asyncio client (loop thread) over a core.

No torch at import time: only ``build_real_core`` imports it (through ``ModelRunner``), so
the mocker, the replay and the router's tests build engines without it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from tokenmill.core.events import KvEventSink, null_sink
from tokenmill.core.kv_transfer import KvLayout
from tokenmill.engine.async_engine import DEFAULT_OUTPUT_INTERVAL_S, AsyncEngine
from tokenmill.engine.config import CacheConfig, SchedulerConfig
from tokenmill.engine.core import Decode, EngineCore
from tokenmill.engine.executor.base import Executor
from tokenmill.engine.executor.kv_connector import WorkerConnector
from tokenmill.engine.mocker import MockExecutor, StepPacer, StepTiming, TokenSource
from tokenmill.engine.scheduler import Scheduler
from tokenmill.kv.connector import NULL_CONNECTOR, SchedulerConnector

DEFAULT_KV_CACHE_MEMORY = 1 << 30  # bytes of K and V for the whole pool (real engines)
Clock = Callable[[], float]


def build_core(
    executor: Executor,
    cache: CacheConfig,
    scheduler: SchedulerConfig,
    *,
    vocab_size: int,
    eos_token_ids: Sequence[int] = (),
    decode: Decode | None = None,
    event_sink: KvEventSink = null_sink,
    clock: Clock = time.monotonic,
    connector: SchedulerConnector = NULL_CONNECTOR,
    worker_connector: WorkerConnector | None = None,
) -> EngineCore:
    """``EngineCore(Scheduler(scheduler, cache, eos_token_ids, event_sink), executor)``.

    ``connector`` / ``worker_connector``: the two sides of a KV connector (``kv.connector``,
    ``engine.executor.kv_connector``); the worker side is handed to the executor, which
    registers its KV tensors with it. Defaults: the null connector, nothing registered.

    ``executor`` must hold ``cache.num_blocks`` blocks of ``cache.block_size`` (raises
    ``ValueError`` otherwise). ``decode`` None: outputs carry token ids only, no text and no
    stop strings. ``clock`` stamps requests that come without an ``arrival_time``."""
    if (executor.num_blocks, executor.block_size) != (cache.num_blocks, cache.block_size):
        raise ValueError(
            f"executor holds {executor.num_blocks} blocks of {executor.block_size} tokens, "
            f"the cache config {cache.num_blocks} of {cache.block_size}"
        )
    if worker_connector is not None:
        executor.set_kv_connector(worker_connector)
    sched = Scheduler(scheduler, cache, eos_token_ids, event_sink, connector)
    return EngineCore(sched, executor, vocab_size, decode, clock)


def build_real_core(
    loaded,
    scheduler: SchedulerConfig,
    *,
    cache: CacheConfig | None = None,
    block_size: int = 16,
    kv_cache_memory: int = DEFAULT_KV_CACHE_MEMORY,
    decode: bool = True,
    event_sink: KvEventSink = null_sink,
    clock: Clock = time.monotonic,
    connector: SchedulerConnector = NULL_CONNECTOR,
    worker_connector: WorkerConnector | None = None,
    **runner_kwargs,
) -> EngineCore:
    """A core over ``loaded`` (a ``LoadedModel``) with the real ``ModelRunner``.

    ``cache`` None: the largest pool of ``block_size`` blocks whose K and V fit
    ``kv_cache_memory`` bytes in the model's dtype. EOS ids are the tokenizer's, else the
    model config's. ``decode`` False: outputs carry token ids only (the server's frontend
    detokenizes). ``runner_kwargs`` go to ``ModelRunner`` (e.g. ``decode_group_size``)."""
    from tokenmill.engine.executor.model_runner import ModelRunner  # torch

    config = loaded.config
    if cache is None:
        itemsize = loaded.dtype.itemsize
        cache = CacheConfig.from_memory_budget(kv_cache_memory, config, itemsize, block_size)
    eos = loaded.tokenizer.eos_token_ids or config.eos_token_ids
    runner_kwargs.setdefault("grammars", _grammars(loaded.tokenizer, eos))
    runner = ModelRunner(
        loaded.model,
        config,
        cache.num_blocks,
        cache.block_size,
        loaded.dtype,
        loaded.device,
        eos_token_ids=eos,
        **runner_kwargs,
    )
    text = loaded.tokenizer.decode if decode else None
    return build_core(
        runner,
        cache,
        scheduler,
        vocab_size=config.vocab_size,
        eos_token_ids=eos,
        decode=text,
        event_sink=event_sink,
        clock=clock,
        connector=connector,
        worker_connector=worker_connector,
    )


def _grammars(tokenizer: Any, eos: Any) -> Any:
    """The structured-output compiler of a real engine (None: a tokenizer without the
    ``tokenizers`` JSON, so no constrained decoding)."""
    from tokenmill.engine.structured.grammar import GrammarCompiler

    if not hasattr(tokenizer, "to_json"):
        return None
    return GrammarCompiler(tokenizer.to_json(), tokenizer.vocab_size, eos)


def build_mock_core(
    cache: CacheConfig,
    scheduler: SchedulerConfig,
    *,
    timing: StepTiming | None = None,
    pacer: StepPacer | None = None,
    vocab_size: int = 32_000,
    seed: int = 0,
    event_sink: KvEventSink = null_sink,
    clock: Clock = time.monotonic,
    connector: SchedulerConnector = NULL_CONNECTOR,
    worker_connector: WorkerConnector | None = None,
) -> EngineCore:
    """The mocker: the real scheduler and block pool, a ``MockExecutor`` priced by ``timing``
    (None: ``PolynomialTiming``) whose tokens are ``TokenSource(vocab_size, seed)``. No EOS:
    lengths follow ``max_tokens``. ``pacer`` None: steps do not sleep (offline use)."""
    tokens = TokenSource(vocab_size, seed)
    executor = MockExecutor(cache.num_blocks, cache.block_size, timing, tokens, pacer)
    return build_core(
        executor,
        cache,
        scheduler,
        vocab_size=vocab_size,
        event_sink=event_sink,
        clock=clock,
        connector=connector,
        worker_connector=worker_connector,
    )


def kv_layout(model_config, dtype_name: str, block_size: int) -> KvLayout:
    """The KV layout of an engine over ``model_config`` (a ``ModelConfig``) in ``dtype_name``
    (``float32``, ``bfloat16``, ``float16``): what a prefill/decode pool must agree on."""
    return KvLayout(
        dtype=dtype_name,
        block_size=block_size,
        num_layers=model_config.num_layers,
        num_kv_heads=model_config.num_kv_heads,
        head_dim=model_config.head_dim,
    )


def build_pd_connectors(
    layout: KvLayout,
    transfer_timeout_s: float,
    agent_name: str | None = None,
    clock: Clock = time.monotonic,
) -> tuple[SchedulerConnector, WorkerConnector]:
    """The two sides of the disaggregation connector (``kv.pd_connector`` and
    ``engine.executor.nixl_connector``). Raises ``KvTransferUnavailableError`` where NIXL
    cannot load. ``agent_name`` None: a fresh unique name."""
    import uuid

    from tokenmill.engine.executor.nixl_connector import NixlWorkerConnector  # torch, NIXL
    from tokenmill.kv.pd_connector import PdSchedulerConnector

    name = agent_name or f"tokenmill-{uuid.uuid4().hex[:12]}"
    worker = NixlWorkerConnector(name, layout, transfer_timeout_s, clock)
    return PdSchedulerConnector(layout, transfer_timeout_s, clock), worker


def build_async_engine(
    core: EngineCore, output_interval_s: float = DEFAULT_OUTPUT_INTERVAL_S
) -> AsyncEngine:
    """An ``AsyncEngine`` that owns ``core`` (its loop thread starts now)."""
    return AsyncEngine(core, output_interval_s=output_interval_s)
