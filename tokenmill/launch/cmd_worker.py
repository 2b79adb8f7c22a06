"""``tokenmill worker --nats URL --model ...``: one engine replica served over the NATS runtime
(``worker_service.serve_worker``)."""

from __future__ import annotations

import argparse

from tokenmill.launch import event_loop, flags, specs


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("worker", help="serve one engine replica over NATS")
    flags.add_runtime(p)
    flags.add_engine(p)
    flags.add_worker(p)
    flags.add_worker_role(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tokenmill.launch.worker_service import serve_worker

    engine = specs.EngineSpec.from_args(args)
    worker = specs.WorkerSpec.from_args(args)
    main = serve_worker(engine, specs.RuntimeSpec.from_args(args), worker)
    return event_loop.run(main, worker.event_loop)
