"""One engine replica served over the NATS runtime (``tokenmill worker``): discovery lease,
TCP (or NATS) request plane, its model card (``model_card.py``) in the instance metadata and
its tokenizer in the NATS object store, KV events numbered by a ``KvPublisher``.

Prints ``tokenmill worker: ready <instance id>`` once registered. SIGTERM/SIGINT: deregister,
let in-flight requests finish for up to the drain time, evict the rest (their frontends
migrate them), shut the engine down.
"""

from __future__ import annotations

import asyncio
from typing import Any

from tokenmill.launch.engines import ENGINES, BuiltEngine, build_engine, pacing_note
from tokenmill.launch.gc_tuning import freeze_startup_heap
from tokenmill.launch.model_card import ModelCard, tokenizer_blob
from tokenmill.launch.signals import wait_for_signal
from tokenmill.launch.specs import WORKER_COMPONENT, EngineSpec, RuntimeSpec, WorkerSpec
from tokenmill.worker.protocol import load_from_stats, maybe_await

BLOB_CHECK_S = 5.0
_BACKGROUND: set[asyncio.Task[None]] = set()


async def serve_worker(engine: EngineSpec, runtime_spec: RuntimeSpec, spec: WorkerSpec) -> int:
    """Runs one worker until SIGINT/SIGTERM; returns 0 after a clean stop."""
    from tokenmill.core.events import null_sink
    from tokenmill.runtime.nats_runtime import NatsRuntime
    from tokenmill.worker.kv_publisher import KvPublisher

    runtime = await NatsRuntime.connect(runtime_spec.nats_url, runtime_spec.config())
    publisher = None
    if ENGINES[engine.kind].publishes_kv_events:
        publisher = KvPublisher(runtime, runtime_spec.namespace, WORKER_COMPONENT)
    sink = publisher.sink if publisher is not None else null_sink
    built = await asyncio.to_thread(build_engine, engine, sink)
    try:
        worker = await start_worker(runtime, built, runtime_spec.namespace, spec, publisher)
        freeze_startup_heap()
        print(f"tokenmill worker: ready {worker.info.instance_id}", flush=True)
        await wait_for_signal()
        aborted = await worker.stop(drain_timeout_s=spec.drain_timeout_s)
        print(
            f"tokenmill worker: stopped ({aborted} requests evicted){pacing_note(built.engine)}",
            flush=True,
        )
    finally:
        await runtime.shutdown()
        await maybe_await(built.engine.shutdown())
    return 0


async def start_worker(
    runtime: Any, built: BuiltEngine, namespace: str, spec: WorkerSpec, kv: Any = None
) -> Any:
    """Publishes the tokenizer blob and starts a ``Worker`` whose metadata is the model card
    (plus ``kv_events``: whether ``kv``, its ``KvPublisher``, puts KV events on the wire, and
    ``kv_layout`` of a real engine); a P/D role comes from the built engine's connector."""
    from tokenmill.worker.worker import Worker, WorkerConfig

    digest, blob = tokenizer_blob(built.tokenizer)
    await runtime.put_blob(f"tokenizer-{digest}", blob)
    keeper = asyncio.create_task(keep_blob(runtime, f"tokenizer-{digest}", blob))
    _BACKGROUND.add(keeper)  # lives as long as the process
    blocks = load_from_stats("", built.engine.stats()).num_total_blocks
    card = ModelCard(
        model=built.model_name,
        context_length=built.context_length,
        block_size=built.block_size,
        kv_blocks=blocks,
        tokenizer=digest,
    )
    metadata = [*card.metadata().items(), ("kv_events", "1" if kv is not None else "0")]
    if built.kv_layout is not None:  # the KV layout P/D pools must agree on
        from tokenmill.core.kv_transfer import encode_layout
        from tokenmill.routing.models import LAYOUT_KEY

        metadata.append((LAYOUT_KEY, encode_layout(built.kv_layout)))
    config = WorkerConfig(
        namespace=namespace,
        instance_id=spec.instance_id,
        model_name=built.model_name,
        drain_timeout_s=spec.drain_timeout_s,
        metadata=tuple(metadata),
        role=built.role,
    )
    worker = Worker(built.engine, runtime, config, kv)
    await worker.start()
    return worker


async def keep_blob(runtime: Any, name: str, blob: bytes) -> None:
    """Puts the blob back when the NATS server lost its store (a restart with a wiped
    JetStream directory), so frontends started afterwards can still load the tokenizer."""
    while True:
        await asyncio.sleep(BLOB_CHECK_S)
        try:
            if not await runtime.has_blob(name):  # metadata only: not the ~0.5 MB blob
                await runtime.put_blob(name, blob)
        except Exception:  # NATS down right now: the next round retries
            pass
