"""``tokenmill nats``: an embedded nats-server (JetStream on) for a multi-machine deployment;
prints its URL and runs until SIGINT/SIGTERM, then stops it (and deletes its temp store)."""

from __future__ import annotations

import argparse
import signal
import threading


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("nats", help="run a NATS server for workers and frontends")
    p.add_argument("--host", default="127.0.0.1", help="listen address (0.0.0.0: all)")
    p.add_argument("--port", type=int, default=4222, help="-1: a free port")
    p.add_argument("--store-dir", default=None, help="JetStream store (default: a temp dir)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tokenmill.runtime.nats_server import NatsServer, NatsServerConfig

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    config = NatsServerConfig(host=args.host, port=args.port, store_dir=args.store_dir)
    with NatsServer(config) as server:
        print(f"tokenmill nats: listening at {server.url} (pid {server.pid})", flush=True)
        stop.wait()
    return 0
