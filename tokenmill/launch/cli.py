"""The ``tokenmill`` command. Each subcommand lives in its own ``launch/cmd_*.py`` module with
``register(subparsers)``, which adds its parser and sets ``func`` (args -> exit code). Modules
are imported when the CLI starts, but heavy imports (torch, FastAPI) stay inside ``func``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS = (
    "generate",
    "serve",
    "replay",
    "profile",
    "bench",
    "nats",
    "worker",
    "frontend",
    "router",
)

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenmill",
        description="tokenmill: a distributed LLM inference server with an OpenAI-compatible API",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=LOG_LEVELS,
        help="DEBUG, INFO, WARNING, ERROR (any case)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"tokenmill.launch.cmd_{name}")
        except ModuleNotFoundError as e:
            if e.name == f"tokenmill.launch.cmd_{name}":
                continue  # command not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from tokenmill.core.errors import TokenmillError

    try:
        return int(args.func(args) or 0)
    except TokenmillError as e:
        print(f"tokenmill: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
