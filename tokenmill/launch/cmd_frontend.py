"""``tokenmill frontend --nats URL``: the OpenAI frontend over the NATS runtime, serving every
model whose workers registered a model card (``stacks.build_remote_stack``)."""

from __future__ import annotations

import argparse

from tokenmill.launch import flags, specs


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("frontend", help="OpenAI frontend for workers found over NATS")
    flags.add_runtime(p, nats_help="NATS server URL")
    flags.add_http(p)
    flags.add_frontend(p)
    flags.add_router_mode(p)
    flags.add_disagg(p, fleet=False)
    p.add_argument(
        "--remote-router",
        action="store_true",
        help="ask standalone router replicas (tokenmill router) to route",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tokenmill.launch.servers import serve_frontend

    runtime = specs.RuntimeSpec.from_args(args)
    http = specs.HttpSpec.from_args(args)
    router = specs.RouterSpec.from_args(args)
    disagg = specs.DisaggSpec.from_args(args)
    return serve_frontend(runtime, http, specs.frontend_config(args), router, disagg)
