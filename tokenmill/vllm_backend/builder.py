"""Builds a ``VllmEngine``: vLLM's engine arguments from our settings plus the user's own
vLLM flags, its KV event publisher on a private IPC socket, our tokenizer checked against
vLLM's.

Who sets what: tokenmill's flags own what the router and the worker must know
(``--model``, ``--block-size``, ``--num-blocks`` (vLLM's ``num_gpu_blocks_override``),
``--max-num-seqs``, ``--max-num-batched-tokens``, ``--context-length`` (``max_model_len``),
``--dtype``), prefix caching is always on and the KV event config is ours; every other vLLM
engine flag passes through ``--vllm-args "..."``, parsed by vLLM's own argument parser (an
unknown flag exits with vLLM's message). Giving one of ours there is a ``ModelLoadError``
that names our flag. The block size must be one vLLM's attention backend takes (a multiple of
32 on CPU): vLLM refuses others at start-up with its own message.

Blocks (loading weights, starting vLLM's engine process): call off the event loop.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenmill.core.errors import ModelLoadError
from tokenmill.core.events import KvEventSink
from tokenmill.vllm_backend.agreement import check_agreement
from tokenmill.vllm_backend.engine import VllmEngine
from tokenmill.vllm_backend.kv_events import KvEventSubscriber, KvEventTranslator
from tokenmill.vllm_backend.model_dir import resolve_model_dir
from tokenmill.vllm_backend.stats import VllmStats, stat_logger_factory

log = logging.getLogger(__name__)

OWNED_FLAGS = {
    "--model": "--model",
    "--block-size": "--block-size",
    "--num-gpu-blocks-override": "--num-blocks",
    "--max-num-seqs": "--max-num-seqs",
    "--max-num-batched-tokens": "--max-num-batched-tokens",
    "--max-model-len": "--context-length",
    "--dtype": "--dtype",
    "--kv-events-config": "(set by the worker)",
    "--enable-prefix-caching": "(always on)",
    "--no-enable-prefix-caching": "(always on)",
    "--served-model-name": "--served-model-name",
}
DTYPES = {"auto": "auto", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
CPU_ENV_DEFAULTS = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}


@dataclass(frozen=True)
class VllmBackendConfig:
    """What tokenmill decides about a vLLM engine (see the module docstring)."""

    model: str | None
    block_size: int
    num_blocks: int | None
    max_num_seqs: int
    max_num_batched_tokens: int
    context_length: int | None
    dtype: str = "auto"
    vllm_args: tuple[str, ...] = ()
    publish_kv_events: bool = True


@dataclass(frozen=True)
class BuiltVllm:
    engine: VllmEngine
    tokenizer: Any  # our engine.tokenizer.Tokenizer, checked against vLLM's
    context_length: int
    model_name: str
    block_size: int


def build_vllm_engine(config: VllmBackendConfig, event_sink: KvEventSink) -> BuiltVllm:
    """A running ``VllmEngine``; its KV events go to ``event_sink`` (from a thread).
    Raises ``ModelLoadError`` for a bad model directory, an owned flag in ``vllm_args``,
    or a tokenizer that disagrees with vLLM's."""
    from tokenmill.engine.tokenizer import Tokenizer

    require_vllm()
    for key, value in CPU_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    model_dir = resolve_model_dir(config.model)
    tokenizer = Tokenizer.from_hf_dir(model_dir)
    endpoint = replay = None
    if config.publish_kv_events:
        base = Path(tempfile.gettempdir()) / f"tokenmill-vllm-kv-{uuid.uuid4().hex[:12]}"
        endpoint, replay = f"ipc://{base}.pub", f"ipc://{base}.replay"
    args = engine_args(config, model_dir, endpoint, replay)
    from vllm.v1.engine.async_llm import AsyncLLM

    stats = VllmStats(num_total_blocks=0)
    llm = AsyncLLM.from_engine_args(args, stat_loggers=[stat_logger_factory(stats)])
    try:
        cache = llm.vllm_config.cache_config
        stats.num_total_blocks = int(cache.num_gpu_blocks or 0)
        if cache.block_size != config.block_size:
            raise ModelLoadError(
                f"vLLM runs with block size {cache.block_size}, tokenmill's is "
                f"{config.block_size}: the router would hash prompts differently"
            )
        check_agreement(tokenizer, llm.get_tokenizer(), vllm_eos_ids(llm), str(model_dir))
        subscriber = None
        if endpoint is not None:
            translator = KvEventTranslator(config.block_size)
            subscriber = KvEventSubscriber(endpoint, replay, translator, event_sink).start()
        engine = VllmEngine(llm, stats, tokenizer.vocab_size, subscriber)
    except BaseException:
        llm.shutdown()
        raise
    name = model_dir.name.removesuffix("-hf")
    return BuiltVllm(engine, tokenizer, engine.max_model_len, name, config.block_size)


def require_vllm() -> None:
    """``ModelLoadError`` with the install command when vLLM cannot be imported."""
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        raise ModelLoadError(
            f"--engine vllm needs vLLM: pip install 'tokenmill[vllm]' ({e})"
        ) from None


def engine_args(
    config: VllmBackendConfig, model_dir: Path, endpoint: str | None, replay: str | None
) -> Any:
    """vLLM's ``AsyncEngineArgs``: ``config.vllm_args`` parsed by vLLM's parser, then ours."""
    from vllm.config import KVEventsConfig
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    for arg in config.vllm_args:
        flag = arg.split("=", 1)[0]
        if flag in OWNED_FLAGS:
            raise ModelLoadError(
                f"--vllm-args: {flag} is tokenmill's to set (use {OWNED_FLAGS[flag]})"
            )
    if config.dtype not in DTYPES:
        raise ModelLoadError(f"--dtype {config.dtype}: the vLLM engine takes {sorted(DTYPES)}")
    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser(prog="--vllm-args"))
    parsed = AsyncEngineArgs.from_cli_args(parser.parse_args(list(config.vllm_args)))
    events = None
    if endpoint is not None:
        events = KVEventsConfig(
            enable_kv_cache_events=True,
            publisher="zmq",
            endpoint=endpoint,
            replay_endpoint=replay,
        )
    return dataclasses.replace(
        parsed,
        model=str(model_dir),
        tokenizer=str(model_dir),
        block_size=config.block_size,
        num_gpu_blocks_override=config.num_blocks,
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
        max_model_len=config.context_length,
        dtype=DTYPES[config.dtype],
        enable_prefix_caching=True,
        kv_events_config=events,
        disable_log_stats=True,  # vLLM's own log lines; our stat logger still records
    )


def vllm_eos_ids(llm: Any) -> set[int]:
    """The ids vLLM ends a request on: the tokenizer's EOS and generation_config's."""
    ids: set[int] = set()
    eos = llm.get_tokenizer().eos_token_id
    if eos is not None:
        ids.add(int(eos))
    generation = llm.model_config.try_get_generation_config() or {}
    extra = generation.get("eos_token_id")
    if extra is not None:
        ids.update([extra] if isinstance(extra, int) else extra)
    return ids
