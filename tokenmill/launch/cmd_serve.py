"""``tokenmill serve``: frontend + router + one worker in one process, on uvicorn (httptools,
the event loop of ``--event-loop``), over the in-process runtime.

SIGINT/SIGTERM: stop accepting connections, let in-flight streams finish for up to
``--shutdown-timeout`` seconds, cancel (abort) what is left, shut the engine down, exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenmill.launch import event_loop
from tokenmill.launch.engine_args import (
    ENGINE_DEFAULTS,
    MOCKER_DEFAULTS,
    REAL_DEFAULTS,
    add_engine_args,
    engine_settings,
)
from tokenmill.launch.event_loop import EVENT_LOOPS, add_event_loop_arg
from tokenmill.launch.gc_tuning import freeze_startup_heap
from tokenmill.router.router import ROUTER_MODES

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
ENGINES = ("real", "mocker", "echo")
MOCKER_MIN_CONTEXT = 131_072  # mocker workers take real traces' long prompts
# Longer than the idle timeout of common client pools (aiohttp 15 s, httpx 5 s, load
# balancers 60 s): the client closes an idle connection first. With uvicorn's 5 s a client
# could reuse a connection the server was closing, and that request failed
# (``connection_dropped`` in tokenmill bench serve).
KEEP_ALIVE_S = 65.0
SHUTDOWN_BACKSTOP_S = 5.0  # after the drain: how long uvicorn waits before cancelling


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="serve a model over the OpenAI API")
    p.add_argument("--host", default=DEFAULT_HOST)
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--engine", choices=ENGINES, default="real",
                   help="real model, simulated (mocker), or zero-cost echo")  # fmt: skip
    add_engine_args(p)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    p.add_argument("--router-mode", choices=ROUTER_MODES, default="round-robin")
    p.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024)
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds; 504 after")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, help="drain time on exit")
    p.add_argument("--workers", type=int, default=0,
                   help="N > 0: N worker processes over NATS (see cmd_frontend)")  # fmt: skip
    p.add_argument("--nats", default=None, help="with --workers: an existing NATS server URL")
    p.add_argument("--migration-limit", type=int, default=3, help="migrations per request")
    p.add_argument("--allow-pinning", action="store_true",
                   help="honour a request's router.worker_id (pin to an instance)")  # fmt: skip
    add_http_server_args(p)
    p.add_argument("--worker-event-loop", choices=EVENT_LOOPS, default="uvloop",
                   help="with --workers: the worker processes' event loop")  # fmt: skip
    p.set_defaults(func=run)


def add_http_server_args(p: argparse.ArgumentParser) -> None:
    """The flags ``make_server`` reads besides host and port (``serve`` and ``frontend``)."""
    add_event_loop_arg(p, "asyncio")
    p.add_argument("--timeout-keep-alive", type=float, default=KEEP_ALIVE_S,
                   help="seconds an idle HTTP connection stays open")  # fmt: skip
    p.add_argument("--request-log", metavar="PATH", default=None,
                   help="append one JSON line per completion request: its stage times "
                   "(body read, routed, first token, first write, end), status, token "
                   "counts and workers")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    if args.workers > 0:
        from tokenmill.launch.cmd_frontend import run_with_workers

        return run_with_workers(args)

    start = time.monotonic()
    return event_loop.run(_serve(args, start), args.event_loop)


async def _serve(args: argparse.Namespace, start: float) -> int:
    import asyncio

    stack = await build_stack(args)
    server = make_server(stack.app, args, stack.drain)
    task = asyncio.create_task(server.serve())
    while not server.started and not task.done():
        await asyncio.sleep(0.01)
    if server.started:
        freeze_startup_heap()
        url = f"http://{args.host}:{args.port}/v1"
        print(f"tokenmill: serving {stack.model.name!r} at {url} "
              f"(started in {time.monotonic() - start:.2f} s)", flush=True)  # fmt: skip
    await task
    await stack.close()
    return 0 if server.started else 1


@dataclass
class Stack:
    """Everything ``serve`` runs in one process; ``close()`` stops it in dependency order."""

    app: Any
    model: Any  # frontend.preprocess.ServedModel
    engine: Any
    runtime: Any
    worker: Any
    loads: Any

    async def drain(self, timeout_s: float) -> None:
        """No new requests; in-flight ones get ``timeout_s`` to finish, the rest are aborted
        (their streams end with an error event, their blocks are freed)."""
        await self.worker.stop(drain_timeout_s=timeout_s)

    async def close(self) -> None:
        from tokenmill.worker.protocol import maybe_await

        await self.worker.stop(drain_timeout_s=0.0)
        await self.loads.stop()
        await self.runtime.shutdown()
        await maybe_await(self.engine.shutdown())


async def build_stack(args: argparse.Namespace) -> Stack:
    """Loads the engine (in a thread, off the event loop), then ``assemble_stack``."""
    import asyncio

    from tokenmill.frontend.app import FrontendConfig
    from tokenmill.frontend.preprocess import ServedModel

    engine, tokenizer, context, name = await asyncio.to_thread(ENGINE_BUILDERS[args.engine], args)
    name = args.served_model_name or name
    model = ServedModel(name, tokenizer, context, int(time.time()))
    config = FrontendConfig(
        api_key=args.api_key,
        max_body_bytes=args.max_body_bytes,
        request_timeout_s=args.request_timeout,
        migration_limit=getattr(args, "migration_limit", 3),
        allow_pinning=getattr(args, "allow_pinning", False),
        request_log=args.request_log,
    )
    return await assemble_stack(engine, model, config, _route_policy(args))


async def assemble_stack(engine: Any, model: Any, config: Any, policy: Any = None) -> Stack:
    """Worker over ``engine`` on a fresh in-process runtime, dispatcher, load tracker, app.
    Call inside the event loop that will serve it."""
    from tokenmill.frontend.app import build_app
    from tokenmill.frontend.loads import LoadTracker
    from tokenmill.routing.dispatch import Dispatcher
    from tokenmill.runtime.inprocess import InProcessRuntime
    from tokenmill.worker.worker import Worker, WorkerConfig

    runtime = InProcessRuntime()
    worker = Worker(engine, runtime, WorkerConfig(model_name=model.name))
    await worker.start()
    client = runtime.client(worker.config.endpoint)
    loads = LoadTracker(runtime, client)
    loads.start()
    app = build_app(model, Dispatcher(client, policy), config, loads.loads)
    return Stack(app, model, engine, runtime, worker, loads)


def _route_policy(args: argparse.Namespace):
    from tokenmill.routing.dispatch import RoundRobinPolicy

    if args.router_mode == "round-robin":
        return RoundRobinPolicy()
    from tokenmill.routing.kv_policy import KvRouterPolicy

    block_size = engine_settings(args, ENGINE_DEFAULTS[args.engine]).block_size
    return KvRouterPolicy.create(args.router_mode, block_size)


# ---- engines: (engine, tokenizer, context length, model name) ---------------------------


def _real_engine(args: argparse.Namespace):
    from tokenmill.engine.config import CacheConfig
    from tokenmill.engine.executor.model_runner import ModelRunner
    from tokenmill.engine.llm import DEFAULT_KV_CACHE_MEMORY
    from tokenmill.engine.loader import load_model

    settings = engine_settings(args, REAL_DEFAULTS)
    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    config, tokenizer = loaded.config, loaded.tokenizer
    if settings.num_blocks is None:
        cache = CacheConfig.from_memory_budget(
            DEFAULT_KV_CACHE_MEMORY, config, loaded.dtype.itemsize, settings.block_size
        )
    else:
        cache = CacheConfig(settings.block_size, settings.num_blocks)
    context = args.context_length or config.max_position_embeddings
    eos = tokenizer.eos_token_ids or config.eos_token_ids
    runner = ModelRunner(loaded.model, config, cache.num_blocks, cache.block_size,
                         loaded.dtype, loaded.device, eos_token_ids=eos)  # fmt: skip
    scheduler = scheduler_config(settings, context)
    engine = _async_engine(runner, cache, scheduler, eos, config.vocab_size, _sink(args),
                           _interval_s(args))
    return engine, tokenizer, engine.core.max_model_len, loaded.name


def _mocker_engine(args: argparse.Namespace):
    from tokenmill.engine.config import CacheConfig
    from tokenmill.engine.mocker import MockExecutor, StepPacer, TokenSource

    settings = engine_settings(args, MOCKER_DEFAULTS)
    tokenizer, context, name = read_tokenizer(args.model)
    context = args.context_length or max(context, MOCKER_MIN_CONTEXT)
    cache = CacheConfig(settings.block_size, settings.num_blocks)
    tokens = TokenSource(vocab_size=tokenizer.vocab_size)
    executor = MockExecutor(cache.num_blocks, cache.block_size, tokens=tokens,
                            pacer=StepPacer(args.mocker_speedup))  # fmt: skip
    # The mocker's tokens are arbitrary ids: no EOS, so lengths follow max_tokens.
    scheduler = scheduler_config(settings, context)
    engine = _async_engine(executor, cache, scheduler, (), tokenizer.vocab_size, _sink(args),
                           _interval_s(args))
    return engine, tokenizer, engine.core.max_model_len, name


def scheduler_config(settings, context: int):
    """The ``SchedulerConfig`` of ``settings`` (an ``EngineSettings``) for ``context``."""
    from tokenmill.engine.config import SchedulerConfig

    return SchedulerConfig(
        max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        max_model_len=context,
        watermark=settings.watermark,
    )


def _sink(args: argparse.Namespace):
    """The KV event sink a worker put in ``args.event_sink`` (None: events are dropped)."""
    from tokenmill.core.events import null_sink

    return getattr(args, "event_sink", None) or null_sink


def _interval_s(args: argparse.Namespace) -> float:
    """``--stream-interval-ms`` in seconds (``AsyncEngine.output_interval_s``)."""
    from tokenmill.engine.async_engine import DEFAULT_OUTPUT_INTERVAL_S

    ms = getattr(args, "stream_interval_ms", None)
    return DEFAULT_OUTPUT_INTERVAL_S if ms is None else ms / 1000.0


def _async_engine(executor, cache, config, eos, vocab_size: int, event_sink,
                  output_interval_s: float):  # fmt: skip
    """AsyncEngine over ``executor`` whose outputs carry token ids only (``decode=None``): the
    frontend detokenizes and applies stop strings, so the engine thread does not do it too.
    ``config`` is the ``SchedulerConfig``; ``event_sink`` receives the block pool's KV events
    (from the engine thread); ``output_interval_s``: ``AsyncEngine``'s (``_interval_s``)."""
    from tokenmill.core.events import null_sink
    from tokenmill.engine.async_engine import AsyncEngine
    from tokenmill.engine.core import EngineCore
    from tokenmill.engine.scheduler import Scheduler

    scheduler = Scheduler(config, cache, eos_token_ids=eos,
                          event_sink=event_sink or null_sink)  # fmt: skip
    core = EngineCore(scheduler, executor, vocab_size, decode=None)
    return AsyncEngine(core, output_interval_s=output_interval_s)


def _echo_engine(args: argparse.Namespace):
    from tokenmill.worker.echo_engine import EchoConfig, EchoEngine

    tokenizer, context, name = read_tokenizer(args.model)
    config = EchoConfig(token_delay_s=args.echo_delay, eos_token_ids=tokenizer.eos_token_ids)
    return EchoEngine(config), tokenizer, args.context_length or context, name


ENGINE_BUILDERS = {"real": _real_engine, "echo": _echo_engine, "mocker": _mocker_engine}


def read_tokenizer(model: str | None):
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


# ---- uvicorn ------------------------------------------------------------------------------


def make_server(app: Any, args: argparse.Namespace, drain: Any = None):
    """A uvicorn server for ``app``. SIGINT/SIGTERM: stop accepting, ``await drain(timeout)``
    (in-flight requests finish or are aborted), then uvicorn's own shutdown (a backstop that
    cancels what is still running). Signals are not re-raised afterwards: the process exits 0."""
    import uvicorn

    class _Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self.handle_exit, sig, None)
            try:
                yield
            finally:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(sig)

        async def shutdown(self, sockets=None) -> None:
            for server in self.servers:
                server.close()
            for connection in list(self.server_state.connections):
                connection.shutdown()  # idle keep-alive connections close; streams go on
            if drain is not None:
                await drain(args.shutdown_timeout)
            await super().shutdown(sockets)

    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        loop="none",
        http="httptools",
        lifespan="on",
        log_level="warning",
        access_log=False,
        timeout_keep_alive=args.timeout_keep_alive,
        timeout_graceful_shutdown=SHUTDOWN_BACKSTOP_S,
    )
    return _Server(config)
