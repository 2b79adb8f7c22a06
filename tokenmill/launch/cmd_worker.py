"""``tokenmill worker --nats URL --model ...``: one engine replica served over the NATS runtime
(discovery lease, TCP request plane), with its model card (``model_card.py``) in discovery and
its tokenizer in the NATS object store.

Prints ``tokenmill worker: ready <instance id>`` once registered. SIGTERM/SIGINT: deregister,
let in-flight requests finish for up to ``--drain-timeout`` seconds, evict the rest (their
frontends migrate them), shut the engine down, exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from tokenmill.launch import event_loop
from tokenmill.launch.cmd_serve import ENGINES
from tokenmill.launch.engine_args import ENGINE_DEFAULTS, add_engine_args, engine_settings
from tokenmill.launch.event_loop import add_event_loop_arg
from tokenmill.launch.gc_tuning import freeze_startup_heap


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("worker", help="serve one engine replica over NATS")
    p.add_argument("--nats", required=True, help="NATS server URL, e.g. nats://10.0.0.1:4222")
    p.add_argument("--engine", choices=ENGINES, default="real")
    add_engine_args(p)
    add_runtime_args(p)
    p.add_argument("--instance-id", default=None, help="default: a random id")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds, on SIGTERM")
    add_event_loop_arg(p, "uvloop")
    p.set_defaults(func=run)


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--namespace", default="tokenmill")
    p.add_argument("--listen-host", default="127.0.0.1", help="TCP request plane bind address")
    p.add_argument("--advertise-host", default=None, help="address others dial (multi-host)")
    p.add_argument("--plane-token", default="", help="shared token of the TCP request plane")
    p.add_argument("--request-plane", choices=("tcp", "nats"), default="tcp")


def runtime_config(args: argparse.Namespace):
    from tokenmill.runtime.nats_runtime import NatsRuntimeConfig

    return NatsRuntimeConfig(
        request_plane=args.request_plane,
        host=args.listen_host,
        advertise_host=args.advertise_host,
        token=args.plane_token,
    )


def run(args: argparse.Namespace) -> int:
    return event_loop.run(_main(args), args.event_loop)


async def _main(args: argparse.Namespace) -> int:
    from tokenmill.launch.cmd_serve import ENGINE_BUILDERS
    from tokenmill.runtime.nats_runtime import NatsRuntime
    from tokenmill.worker.kv_publisher import KvPublisher

    runtime = await NatsRuntime.connect(args.nats, runtime_config(args))
    publisher = KvPublisher(runtime, args.namespace, "backend")
    args.event_sink = publisher.sink if args.engine != "echo" else None
    engine, tokenizer, context, name = await asyncio.to_thread(ENGINE_BUILDERS[args.engine], args)
    try:
        kv = publisher if args.event_sink is not None else None
        worker = await start_worker(args, runtime, engine, tokenizer, context, name, kv)
        freeze_startup_heap()
        print(f"tokenmill worker: ready {worker.info.instance_id}", flush=True)
        await _wait_for_signal()
        aborted = await worker.stop(drain_timeout_s=args.drain_timeout)
        print(f"tokenmill worker: stopped ({aborted} requests evicted){_pacing(args, engine)}",
              flush=True)  # fmt: skip
    finally:
        from tokenmill.worker.protocol import maybe_await

        await runtime.shutdown()
        await maybe_await(engine.shutdown())
    return 0


def _pacing(args, engine) -> str:
    """How many of a live mocker's steps ran late (", mocker pacing: ..."); "" otherwise."""
    if args.engine != "mocker":
        return ""
    pacer = engine.core.executor.pacer
    return (f", mocker pacing: {pacer.num_steps} steps, {pacer.num_late} late, "
            f"{pacer.late_s:.3f} s late in total")  # fmt: skip


async def start_worker(args, runtime, engine, tokenizer, context: int, name: str, kv=None):
    """Publishes the tokenizer blob and starts a ``Worker`` whose metadata is the card (plus
    ``kv_events``: whether ``kv``, its ``KvPublisher``, puts KV events on the wire)."""
    from tokenmill.launch.model_card import ModelCard, tokenizer_blob
    from tokenmill.worker.worker import Worker, WorkerConfig

    digest, blob = tokenizer_blob(tokenizer)
    await runtime.put_blob(f"tokenizer-{digest}", blob)
    keeper = asyncio.create_task(_keep_blob(runtime, f"tokenizer-{digest}", blob))
    _BACKGROUND.add(keeper)  # lives as long as the process
    name = args.served_model_name or name
    from tokenmill.worker.protocol import load_from_stats

    blocks = load_from_stats("", engine.stats()).num_total_blocks
    block_size = engine_settings(args, ENGINE_DEFAULTS[args.engine]).block_size
    card = ModelCard(model=name, context_length=context, block_size=block_size,
                     kv_blocks=blocks, tokenizer=digest)  # fmt: skip
    config = WorkerConfig(
        namespace=args.namespace,
        instance_id=args.instance_id,
        model_name=name,
        drain_timeout_s=args.drain_timeout,
        metadata=(*card.metadata().items(), ("kv_events", "1" if kv is not None else "0")),
    )
    worker = Worker(engine, runtime, config, kv)
    await worker.start()
    return worker


_BACKGROUND: set[asyncio.Task[None]] = set()
BLOB_CHECK_S = 5.0


async def _keep_blob(runtime, name: str, blob: bytes) -> None:
    """Puts the blob back when the NATS server lost its store (a restart with a wiped
    JetStream directory), so frontends started afterwards can still load the tokenizer."""
    while True:
        await asyncio.sleep(BLOB_CHECK_S)
        try:
            if not await runtime.has_blob(name):  # metadata only: not the ~0.5 MB blob
                await runtime.put_blob(name, blob)
        except Exception:  # NATS down right now: the next round retries
            pass


async def _wait_for_signal() -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
