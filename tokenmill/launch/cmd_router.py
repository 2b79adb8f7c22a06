"""``tokenmill router --nats URL``: a standalone KV router replica
(``router_service.serve_router``). Runs until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse

from tokenmill.launch import event_loop, flags, specs


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("router", help="standalone KV router replica over NATS")
    flags.add_runtime(p, nats_help="NATS server URL")
    flags.add_router_mode(p, flags.KV_ROUTER_MODES, default="kv")
    p.add_argument(
        "--block-size",
        type=flags.POSITIVE_INT,
        default=None,
        help="the workers' KV block size (default: from their model cards)",
    )
    flags.add_event_loop(p, "uvloop")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tokenmill.launch.router_service import serve_router

    router = specs.RouterSpec(mode=args.router_mode, block_size=args.block_size)
    main = serve_router(specs.RuntimeSpec.from_args(args), router)
    return event_loop.run(main, args.event_loop)
