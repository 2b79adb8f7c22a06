"""The engine registry: engine kind name -> builder of a ready engine from an ``EngineSpec``.

Kinds: ``real`` (the model, ``engine.builder.build_real_core``), ``mocker`` (the real scheduler
and block pool with simulated step times, paced to wall time), ``echo`` (a zero-cost engine for
serving-path tests and benchmarks), ``vllm`` (vLLM's ``AsyncLLM``, ``vllm_backend``; needs the
``tokenmill[vllm]`` extra). A later backend registers itself with ``@register``.
Builders block (loading weights): call ``build_engine`` off the event loop. Heavy imports
(torch) stay inside the builders, so registering and parsing flags stays cheap.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenmill.core.events import KvEventSink, null_sink
from tokenmill.launch.specs import EngineSettings, EngineSpec

log = logging.getLogger(__name__)

MOCKER_MIN_CONTEXT = 131_072  # mocker workers take real traces' long prompts


@dataclass(frozen=True)
class BuiltEngine:
    """A ready engine (``worker.protocol.EngineClient``) and what its worker advertises."""

    engine: Any
    tokenizer: Any  # engine.tokenizer.Tokenizer
    context_length: int
    model_name: str  # the name clients use (``--served-model-name`` or the model's)
    block_size: int  # KV block size: the router hashes prompts with it
    kv_layout: Any = None  # core.kv_transfer.KvLayout of a real engine (its model card)
    role: str = "both"  # the disaggregation role its KV connector serves
    kv_tiers: Any = None  # engine.kv_tiers.KvTiers when lower KV tiers are configured


@dataclass(frozen=True)
class EngineKind:
    build: Callable[[EngineSpec, KvEventSink], BuiltEngine]
    publishes_kv_events: bool  # False: the engine has no KV cache (routers get no events)


ENGINES: dict[str, EngineKind] = {}


def register(name: str, *, publishes_kv_events: bool = True):
    """Decorator: ``build(spec, event_sink) -> BuiltEngine`` becomes engine kind ``name``."""

    def add(build: Callable[[EngineSpec, KvEventSink], BuiltEngine]):
        ENGINES[name] = EngineKind(build, publishes_kv_events)
        return build

    return add


def build_engine(spec: EngineSpec, event_sink: KvEventSink = null_sink) -> BuiltEngine:
    """The engine ``spec`` describes; its block pool's KV events go to ``event_sink`` (from
    the engine thread). Raises ``ModelLoadError`` naming the file for a bad model."""
    built = ENGINES[spec.kind].build(spec, event_sink)
    if spec.served_model_name is None:
        return built
    return dataclasses.replace(built, model_name=spec.served_model_name)


def scheduler_config(settings: EngineSettings, context_length: int) -> Any:
    """The ``SchedulerConfig`` of ``settings`` for ``context_length``."""
    from tokenmill.engine.config import SchedulerConfig

    return SchedulerConfig(
        max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        max_model_len=context_length,
        watermark=settings.watermark,
    )


@register("real")
def _real(spec: EngineSpec, event_sink: KvEventSink) -> BuiltEngine:
    from tokenmill.engine.builder import (
        build_async_engine,
        build_pd_connectors,
        build_real_core,
        kv_layout,
    )
    from tokenmill.engine.config import CacheConfig
    from tokenmill.engine.loader import load_model

    s = spec.settings
    loaded = load_model(spec.model, dtype=spec.dtype, device=spec.device)
    layout = kv_layout(loaded.config, str(loaded.dtype).removeprefix("torch."), s.block_size)
    # One connector per engine: P/D roles move KV blocks over NIXL (a clear error if it does
    # not load); an aggregated engine gets the lower KV tiers. A P/D worker runs without
    # tiers until a connector that composes both exists (said once in the log).
    connectors: dict[str, Any] = {}
    tiers = None
    if spec.role != "both":
        sched_side, worker_side = build_pd_connectors(layout, spec.kv_transfer_timeout_s)
        connectors = {"connector": sched_side, "worker_connector": worker_side}
        t = spec.kv_tiers
        if t.disk_dir or t.remote or (t.host_gib or 0) > 0:
            log.warning("--role %s: lower KV tiers are off on P/D workers", spec.role)
    else:
        tiers = _kv_tiers(spec, layout, loaded.name, str(loaded.device), event_sink)
        if tiers is not None:
            connectors = {"connector": tiers.connector, "worker_connector": tiers.worker}
    cache = None if s.num_blocks is None else CacheConfig(s.block_size, s.num_blocks)
    context = spec.context_length or loaded.config.max_position_embeddings
    # decode=False: outputs carry token ids only; the frontend detokenizes and applies stop
    # strings, so the engine thread does not do it too.
    core = build_real_core(
        loaded,
        scheduler_config(s, context),
        cache=cache,
        block_size=s.block_size,
        decode=False,
        event_sink=event_sink,
        **connectors,
    )
    if tiers is not None:
        tiers.attach(core)
    engine = build_async_engine(core, spec.stream_interval_s)
    return BuiltEngine(
        engine,
        loaded.tokenizer,
        core.max_model_len,
        loaded.name,
        s.block_size,
        layout,
        spec.role,
        kv_tiers=tiers,
    )


def _kv_tiers(
    spec: EngineSpec, layout: Any, model: str, device: str, event_sink: KvEventSink
) -> Any:
    """The engine's KV tiers from ``spec.kv_tiers`` (None: none configured). A sink that
    takes a tier (the worker's ``KvPublisher.sink``) also gets the tiers' events."""
    import inspect

    from tokenmill.engine.kv_tiers import GIB, TierSettings, build_tiers

    t = spec.kv_tiers
    settings = TierSettings(
        host_bytes=None if t.host_gib is None else int(t.host_gib * GIB),
        disk_dir=t.disk_dir,
        disk_bytes=int(t.disk_gib * GIB),
        remote=t.remote,
        nats_url=t.nats_url,
        write_through=t.write_through,
    )
    takes_tier = len(inspect.signature(event_sink).parameters) >= 2
    tier_sink = event_sink if takes_tier else None
    return build_tiers(settings, layout, model, device, tier_sink)


@register("mocker")
def _mocker(spec: EngineSpec, event_sink: KvEventSink) -> BuiltEngine:
    from tokenmill.engine.builder import build_async_engine, build_mock_core
    from tokenmill.engine.config import CacheConfig
    from tokenmill.engine.mocker import StepPacer

    s = spec.settings
    assert s.num_blocks is not None, "the mocker's pool size has a default"
    tokenizer, context, name = read_tokenizer(spec.model)
    context = spec.context_length or max(context, MOCKER_MIN_CONTEXT)
    # The mocker's tokens are arbitrary ids: no EOS, so lengths follow max_tokens.
    core = build_mock_core(
        CacheConfig(s.block_size, s.num_blocks),
        scheduler_config(s, context),
        pacer=StepPacer(spec.mocker_speedup),
        vocab_size=tokenizer.vocab_size,
        event_sink=event_sink,
    )
    engine = build_async_engine(core, spec.stream_interval_s)
    return BuiltEngine(engine, tokenizer, core.max_model_len, name, s.block_size)


@register("echo", publishes_kv_events=False)
def _echo(spec: EngineSpec, event_sink: KvEventSink) -> BuiltEngine:
    from tokenmill.worker.echo_engine import EchoConfig, EchoEngine

    tokenizer, context, name = read_tokenizer(spec.model)
    config = EchoConfig(token_delay_s=spec.echo_delay_s, eos_token_ids=tokenizer.eos_token_ids)
    context = spec.context_length or context
    return BuiltEngine(EchoEngine(config), tokenizer, context, name, spec.settings.block_size)


@register("vllm")
def _vllm(spec: EngineSpec, event_sink: KvEventSink) -> BuiltEngine:
    from tokenmill.vllm_backend.builder import VllmBackendConfig, build_vllm_engine

    s = spec.settings
    config = VllmBackendConfig(
        model=spec.model,
        block_size=s.block_size,
        num_blocks=s.num_blocks,
        max_num_seqs=s.max_num_seqs,
        max_num_batched_tokens=s.max_num_batched_tokens,
        context_length=spec.context_length,
        dtype=spec.dtype,
        vllm_args=spec.vllm_args,
        publish_kv_events=event_sink is not null_sink,
    )
    b = build_vllm_engine(config, event_sink)
    return BuiltEngine(b.engine, b.tokenizer, b.context_length, b.model_name, b.block_size)


def read_tokenizer(model: str | None) -> tuple[Any, int, str]:
    """(tokenizer, context length, name) of a model without loading its weights."""
    from tokenmill.engine.default_model import DEFAULT_MODEL_NAME, default_model_path
    from tokenmill.engine.tokenizer import Tokenizer

    path = default_model_path() if model is None else Path(model).expanduser()
    name = DEFAULT_MODEL_NAME if model is None else path.name
    if path.is_dir():
        from tokenmill.engine.models.hf_loader import read_hf_config

        return Tokenizer.from_hf_dir(path), read_hf_config(path).max_position_embeddings, name
    from tokenmill.engine.models.gguf_loader import read_gguf_meta

    meta = read_gguf_meta(path)
    context = int(meta.fields.get(f"{meta.architecture}.context_length", 2048))
    return Tokenizer.from_gguf(meta), context, name


def pacing_note(engine: Any) -> str:
    """How many of a live mocker's steps ran late (", mocker pacing: ..."); "" for other
    engines."""
    pacer = getattr(getattr(getattr(engine, "core", None), "executor", None), "pacer", None)
    if pacer is None:
        return ""
    return (
        f", mocker pacing: {pacer.num_steps} steps, {pacer.num_late} late, "
        f"{pacer.late_s:.3f} s late in total"
    )
