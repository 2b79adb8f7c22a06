"""``tokenmill frontend --nats URL``: the OpenAI frontend over the NATS runtime, serving the
model whose card (``model_card.py``) the workers registered; and ``run_with_workers``, behind
``tokenmill serve --workers N``: an embedded nats-server (unless ``--nats``), N worker
processes and this frontend in one command.

Child processes get SIGKILL if this process dies (PR_SET_PDEATHSIG), and are stopped on a
normal exit (SIGTERM, then SIGKILL after the drain timeout), so ``serve`` leaves no orphans.
The ready line lists their PIDs: ``tokenmill: serving ... (nats pid P, worker pids A B)``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time

from tokenmill.launch import event_loop
from tokenmill.launch.cmd_serve import add_http_server_args
from tokenmill.launch.cmd_worker import add_runtime_args
from tokenmill.launch.gc_tuning import freeze_startup_heap

DEFAULT_COMPONENT = "backend"
WORKER_WAIT_S = 300.0


def register(subparsers: argparse._SubParsersAction) -> None:
    from tokenmill.launch.cmd_serve import DEFAULT_HOST, DEFAULT_PORT, ROUTER_MODES

    p = subparsers.add_parser("frontend", help="OpenAI frontend for workers found over NATS")
    p.add_argument("--nats", required=True, help="NATS server URL")
    p.add_argument("--host", default=DEFAULT_HOST)
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    p.add_argument("--router-mode", choices=ROUTER_MODES, default="round-robin")
    p.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024)
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds; 504 after")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, help="drain time on exit")
    p.add_argument("--migration-limit", type=int, default=3, help="migrations per request")
    p.add_argument("--allow-pinning", action="store_true",
                   help="honour a request's router.worker_id (pin to an instance)")  # fmt: skip
    p.add_argument("--remote-router", action="store_true",
                   help="ask standalone router replicas (tokenmill router) to route")  # fmt: skip
    add_runtime_args(p)
    add_http_server_args(p)
    p.set_defaults(func=run, workers=0)


def run(args: argparse.Namespace) -> int:
    return event_loop.run(serve_frontend(args, args.nats, time.monotonic()), args.event_loop)


async def serve_frontend(args: argparse.Namespace, nats_url: str, start: float,
                         note: str = "", expect_workers: int = 1, check=None) -> int:  # fmt: skip
    """Serves until SIGINT/SIGTERM; ``note`` is appended to the ready line."""
    from tokenmill.launch.cmd_serve import make_server

    stack = await build_remote_stack(args, nats_url, expect_workers, check)
    server = make_server(stack.app, args)
    task = asyncio.create_task(server.serve())
    while not server.started and not task.done():
        await asyncio.sleep(0.01)
    if server.started:
        freeze_startup_heap()
        print(f"tokenmill: serving {stack.model.name!r} at http://{args.host}:{args.port}/v1 "
              f"(started in {time.monotonic() - start:.2f} s{note})", flush=True)  # fmt: skip
    try:
        await task
    finally:
        await stack.close()
    return 0 if server.started else 1


class RemoteStack:
    """The frontend's parts; ``close()`` stops them and the runtime."""

    def __init__(self, app, model, runtime, loads, parts=()):
        self.app, self.model, self.runtime, self.loads = app, model, runtime, loads
        self.parts = list(parts)  # KvEventFeed / ReplicaSync: objects with async stop()

    async def close(self) -> None:
        for part in [self.loads, *self.parts]:
            await part.stop()
        await self.runtime.shutdown()


async def route_policy(args: argparse.Namespace, runtime, client, block_size: int):
    """Round robin, or the KV router fed by the workers' KV events (``KvEventFeed``) and
    sharing in-flight state with other replicas (``ReplicaSync``); returns (policy, parts)."""
    from tokenmill.routing.dispatch import RoundRobinPolicy

    if getattr(args, "remote_router", False):
        from tokenmill.routing.remote_router import (
            RemoteRoutePolicy,
            RouteDecision,
            route_endpoint,
        )

        router = runtime.client(route_endpoint(args.namespace), RouteDecision)
        return RemoteRoutePolicy(router), []
    if args.router_mode == "round-robin":
        return RoundRobinPolicy(), []
    return await kv_policy_parts(args, runtime, client, block_size)


async def kv_policy_parts(args: argparse.Namespace, runtime, client, block_size: int):
    """``KvRouterPolicy`` + its ``KvEventFeed`` and ``ReplicaSync`` (started)."""
    from tokenmill.routing.kv_events import KvEventFeed
    from tokenmill.routing.kv_policy import KvRouterPolicy
    from tokenmill.routing.replicas import ReplicaSync

    policy = KvRouterPolicy.create(args.router_mode, block_size, events=True)
    feed = KvEventFeed(runtime, client, policy)
    await feed.start()
    replicas = ReplicaSync(runtime, args.namespace, DEFAULT_COMPONENT, policy)
    await replicas.start()
    return policy, [feed, replicas]


async def build_remote_stack(args: argparse.Namespace, nats_url: str, expect_workers: int = 1,
                             check=None) -> RemoteStack:  # fmt: skip
    """Connects, waits for ``expect_workers`` live workers, serves the first one's model
    (card + tokenizer) and, through a ``ModelWatcher``, every other model that registers.
    ``check()`` (optional) is called while waiting; it raises to give up (a child died)."""
    from tokenmill.core.request import RequestOutput
    from tokenmill.frontend.app import FrontendConfig, build_app
    from tokenmill.frontend.loads import LoadTracker
    from tokenmill.launch.cmd_worker import runtime_config
    from tokenmill.launch.model_watch import ModelWatcher, model_dispatcher, served_model
    from tokenmill.runtime.interface import EndpointId
    from tokenmill.runtime.nats_runtime import NatsRuntime

    runtime = await NatsRuntime.connect(nats_url, runtime_config(args))
    endpoint = EndpointId(args.namespace, DEFAULT_COMPONENT, "generate")
    client = runtime.client(endpoint, response_type=RequestOutput)
    card = await _first_card(client, expect_workers, check)
    model = await served_model(runtime, card)
    config = FrontendConfig(api_key=args.api_key, max_body_bytes=args.max_body_bytes,
                            request_timeout_s=args.request_timeout,
                            migration_limit=args.migration_limit,
                            allow_pinning=args.allow_pinning,
                            request_log=args.request_log)  # fmt: skip
    loads = LoadTracker(runtime, client)
    loads.start()
    dispatcher, parts = await model_dispatcher(args, runtime, client, card)
    app = build_app(model, dispatcher, config, loads.loads)
    watcher = ModelWatcher(args, runtime, client, app.front)  # other models, as they appear
    watcher.start()
    return RemoteStack(app, model, runtime, loads, [*parts, watcher])


async def _first_card(client, expect_workers: int, check=None):
    """Waits for ``expect_workers`` instances with model cards; the first one's card."""
    from tokenmill.launch.model_card import ModelCard

    deadline = time.monotonic() + WORKER_WAIT_S
    while True:
        cards = [ModelCard.from_metadata(i.metadata) for i in client.instances()]
        cards = [c for c in cards if c is not None]
        if len(cards) >= expect_workers:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(cards)} of {expect_workers} workers registered")
        if check is not None:
            check()
        await asyncio.sleep(0.05)
    return cards[0]


# ---- serve --workers N ------------------------------------------------------------------


def run_with_workers(args: argparse.Namespace) -> int:
    """Embedded nats-server (unless ``--nats``), N worker processes, the frontend here."""
    from tokenmill.runtime.nats_server import NatsServer

    start = time.monotonic()
    nats = None if args.nats else NatsServer().start()
    url = args.nats or nats.url
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs = [spawn_worker(args, url, i) for i in range(args.workers)]
        pids = " ".join(str(p.pid) for p in procs)
        note = (f", nats {url} pid {nats.pid}" if nats else "") + f", worker pids {pids}"
        main = _serve_after_workers(args, url, start, note, _alive_check(procs))
        return event_loop.run(main, args.event_loop)
    finally:
        stop_processes(procs, args.shutdown_timeout)
        if nats is not None:
            nats.stop()


def _alive_check(procs: list[subprocess.Popen[bytes]]):
    from tokenmill.core.errors import TokenmillError

    def check() -> None:
        for proc in procs:
            if proc.poll() is not None:
                raise TokenmillError(f"worker process {proc.pid} exited with {proc.returncode}")

    return check


async def _serve_after_workers(args, url: str, start: float, note: str, check) -> int:
    defaults = {"namespace": "tokenmill", "listen_host": "127.0.0.1", "advertise_host": None,
                "plane_token": "", "request_plane": "tcp"}  # fmt: skip
    for name, value in defaults.items():
        setattr(args, name, getattr(args, name, value))
    return await serve_frontend(args, url, start, note, args.workers, check)


def spawn_worker(args: argparse.Namespace, url: str, index: int) -> subprocess.Popen[bytes]:
    """``python -m tokenmill worker`` with this command's engine options; SIGKILLed if this
    process dies."""
    from tokenmill.launch.engine_args import setting_argv
    from tokenmill.runtime.nats_server import _die_with_parent

    argv = [sys.executable, "-m", "tokenmill", "--log-level", "WARNING", "worker",
            "--nats", url, "--engine", args.engine, "--dtype", args.dtype,
            "--device", args.device, "--mocker-speedup", str(args.mocker_speedup),
            "--echo-delay", str(args.echo_delay),
            "--stream-interval-ms", str(args.stream_interval_ms),
            "--drain-timeout", str(args.shutdown_timeout),
            "--event-loop", args.worker_event_loop]  # fmt: skip
    for flag, value in (("--model", args.model), ("--served-model-name", args.served_model_name),
                        ("--context-length", args.context_length)):  # fmt: skip
        if value is not None:
            argv += [flag, str(value)]
    argv += setting_argv(args)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)


def stop_processes(procs: list[subprocess.Popen[bytes]], timeout_s: float) -> None:
    """SIGTERM every process, wait up to ``timeout_s`` (+5 s) for all, SIGKILL the rest."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s + 5.0
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
