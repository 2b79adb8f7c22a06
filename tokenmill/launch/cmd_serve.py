"""``tokenmill serve``: frontend + router + one engine in one process over the in-process
runtime (``servers.serve_local``), or with ``--workers N`` (and/or ``--prefill-workers P
--decode-workers D``) the frontend here and the worker processes over NATS
(``servers.serve_fleet``).

SIGINT/SIGTERM: stop accepting connections, let in-flight streams finish for up to
``--shutdown-timeout`` seconds, cancel (abort) what is left, shut the engine down, exit 0.
"""

from __future__ import annotations

import argparse

from tokenmill.launch import flags, specs


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="serve a model over the OpenAI API")
    flags.add_engine(p)
    flags.add_http(p)
    flags.add_frontend(p)
    flags.add_router_mode(p)
    flags.add_fleet(p)
    flags.add_disagg(p)
    flags.add_planner(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tokenmill.launch import servers

    engine = specs.EngineSpec.from_args(args)
    http = specs.HttpSpec.from_args(args)
    config = specs.frontend_config(args)
    router = specs.RouterSpec.from_args(args)
    fleet = specs.FleetSpec.from_args(args)
    planner = specs.PlannerSpec.from_args(args)
    if fleet.roles or planner.mode is not None:
        disagg = specs.DisaggSpec.from_args(args)
        return servers.serve_fleet(engine, fleet, http, config, router, disagg, planner)
    return servers.serve_local(engine, http, config, router)
