"""``tokenmill router --nats URL``: a standalone KV router replica. It rebuilds its index from
the workers' KV events (dumps on start, replays on gaps), shares in-flight state with the
other replicas and frontends, and serves ``<namespace>.router.route``; frontends started with
``--remote-router`` ask it instead of routing themselves. Each model's blocks are hashed with
the block size in its workers' model cards (``--block-size`` overrides). Runs until
SIGINT/SIGTERM."""

from __future__ import annotations

import argparse

from tokenmill.launch import event_loop
from tokenmill.launch.event_loop import add_event_loop_arg


def register(subparsers: argparse._SubParsersAction) -> None:
    from tokenmill.launch.cmd_serve import ROUTER_MODES
    from tokenmill.launch.cmd_worker import add_runtime_args

    p = subparsers.add_parser("router", help="standalone KV router replica over NATS")
    p.add_argument("--nats", required=True, help="NATS server URL")
    p.add_argument("--router-mode", choices=[m for m in ROUTER_MODES if m != "round-robin"],
                   default="kv")  # fmt: skip
    p.add_argument("--block-size", type=int, default=None,
                   help="the workers' KV block size (default: from their model cards)")  # fmt: skip
    add_runtime_args(p)
    add_event_loop_arg(p, "uvloop")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return event_loop.run(_main(args), args.event_loop)


async def _main(args: argparse.Namespace) -> int:
    from tokenmill.core.request import RequestOutput
    from tokenmill.launch.cmd_frontend import DEFAULT_COMPONENT, kv_policy_parts
    from tokenmill.launch.cmd_worker import _wait_for_signal, runtime_config
    from tokenmill.routing.models import ModelView
    from tokenmill.routing.remote_router import RouterService
    from tokenmill.runtime.interface import EndpointId
    from tokenmill.runtime.nats_runtime import NatsRuntime

    runtime = await NatsRuntime.connect(args.nats, runtime_config(args))
    client = runtime.client(EndpointId(args.namespace, DEFAULT_COMPONENT, "generate"),
                            RequestOutput)  # fmt: skip
    parts: list = []

    async def make_policy(model: str):
        """The policy of one model's workers (its own KV event feed and replica sync)."""
        view = ModelView(client, model)
        block_size = args.block_size or card_block_size(view.instances())
        policy, model_parts = await kv_policy_parts(args, runtime, view, block_size)
        parts.extend(model_parts)
        return policy

    service = RouterService(runtime, args.namespace, client, make_policy)
    await service.start()
    print(f"tokenmill router: ready ({args.router_mode})", flush=True)
    try:
        await _wait_for_signal()
    finally:
        await service.stop()
        for part in parts:
            await part.stop()
        await runtime.shutdown()
    return 0


def card_block_size(instances) -> int:
    """The block size in the first model card among ``instances`` (the real engine's default
    when none has a card)."""
    from tokenmill.launch.engine_args import REAL_DEFAULTS
    from tokenmill.launch.model_card import ModelCard

    cards = (ModelCard.from_metadata(i.metadata) for i in instances)
    return next((c.block_size for c in cards if c is not None), REAL_DEFAULTS.block_size)
