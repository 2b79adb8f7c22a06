"""``tokenmill bench serve``: load-test any OpenAI-compatible server (tokenmill, vLLM, SGLang,
Dynamo) with a trace or a synthetic workload; prints the summary JSON on stdout, a progress bar
on stderr when it is a terminal, and writes results.json + PNG plots to ``--output-dir``.

``cmd_bench.register`` calls :func:`register_serve` with its subparsers; ``python -m
tokenmill.launch.bench_serve_cli ...`` runs the same command on its own."""

from __future__ import annotations

import argparse
import sys


def _window(text: str) -> tuple[float, float | None]:
    start, sep, end = text.partition(":")
    try:
        lo = float(start) if start else 0.0
        hi = float(end) if end else None
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--window wants START:END seconds, got {text!r}"
        ) from None
    if not sep or lo < 0 or (hi is not None and hi <= lo):
        raise argparse.ArgumentTypeError(
            f"--window wants START:END with 0 <= START < END, got {text!r}"
        )
    return lo, hi


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


# == tokenmill.bench.traces.FORMATS (a test checks); kept here so registering the command
# imports neither numpy nor aiohttp.
FORMATS = ("mooncake", "azure", "aibrix", "synthetic-prefix", "multi-turn")


def add_arguments(p: argparse.ArgumentParser) -> None:
    _server_args(p.add_argument_group("server"))
    _workload_args(p.add_argument_group("workload"))
    _mode_args(p.add_argument_group("mode"))
    _output_args(p.add_argument_group("output"))


def _server_args(g) -> None:
    g.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    g.add_argument("--model", required=True, help="model name sent in each request")
    g.add_argument(
        "--endpoint",
        choices=("auto", "completions", "chat"),
        default="auto",
        help="auto: token-id prompts -> /v1/completions, text -> /v1/chat/completions",
    )
    g.add_argument("--api-key", default=None)
    g.add_argument(
        "--no-ignore-eos",
        dest="ignore_eos",
        action="store_false",
        help='do not send "ignore_eos": true (outputs may end before the trace length)',
    )
    g.add_argument("--timeout", type=_positive(float), default=600.0, help="per request, seconds")


def _workload_args(w) -> None:
    w.add_argument("--trace", default=None, help="trace file (mooncake, azure, aibrix)")
    w.add_argument("--format", choices=FORMATS, default="mooncake")
    w.add_argument(
        "--vocab-size",
        type=_positive(int),
        default=32000,
        help="token ids of token-id prompts are drawn from [--min-token-id, this)",
    )
    w.add_argument("--min-token-id", type=int, default=0)
    w.add_argument("--synthetic-requests", type=_positive(int), default=200)
    w.add_argument("--synthetic-rate", type=_positive(float), default=10.0, help="req/s")
    w.add_argument("--prefix-tokens", type=int, default=1024)
    w.add_argument("--suffix-tokens", type=int, default=128)
    w.add_argument("--output-tokens", type=_positive(int), default=64)
    w.add_argument("--num-groups", type=_positive(int), default=8)
    w.add_argument("--num-turns", type=_positive(int), default=4)
    w.add_argument("--think-time", type=float, default=5.0, help="seconds between turns")
    w.add_argument("--seed", type=int, default=0)


def _mode_args(m) -> None:
    m.add_argument(
        "--concurrency",
        type=_positive(int),
        default=None,
        help="closed loop with this many in flight (default: trace timestamps)",
    )
    m.add_argument("--num-requests", type=_positive(int), default=None)
    m.add_argument("--speed", type=_positive(float), default=1.0, help="schedule speed factor")
    m.add_argument("--window", type=_window, default=(0.0, None), help="START:END trace seconds")


def _output_args(o) -> None:
    o.add_argument("--output-dir", default=None, help="results.json and PNG plots go here")
    o.add_argument("--save-requests", action="store_true", help="per-request records in JSON")
    o.add_argument("--no-plots", dest="plots", action="store_false")
    o.add_argument("--sla-ttft-ms", type=_positive(float), default=2000.0)
    o.add_argument("--sla-itl-ms", type=_positive(float), default=25.0)
    o.add_argument(
        "--worker-metric", default=None, help="metric name (from /metrics) to plot per worker"
    )
    o.add_argument(
        "--worker-metric-pattern",
        default=None,
        help="regex of /metrics names sampled per worker (default: load-like names)",
    )
    o.add_argument("--progress", choices=("auto", "on", "off"), default="auto")
    o.add_argument(
        "--no-uvloop",
        dest="uvloop",
        action="store_false",
        help="use asyncio's default event loop even when uvloop is installed",
    )


def register_serve(bench_subparsers) -> argparse.ArgumentParser:
    """Adds ``serve`` to ``tokenmill bench``'s subparsers and sets ``func``."""
    p = bench_subparsers.add_parser(
        "serve", help="load-test an OpenAI-compatible server", description=__doc__.splitlines()[0]
    )
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def _configs(args):
    from pathlib import Path

    from tokenmill.bench.client import ClientConfig
    from tokenmill.bench.metrics import SlaConfig
    from tokenmill.bench.serve import ServeBenchConfig
    from tokenmill.bench.worker_load import DEFAULT_PATTERN

    client = ClientConfig(
        args.url,
        args.model,
        args.endpoint,
        args.ignore_eos,
        args.timeout,
        args.api_key,
        args.vocab_size,
        args.min_token_id,
    )
    bench = ServeBenchConfig(
        mode="schedule" if args.concurrency is None else "concurrency",
        speed=args.speed,
        window_s=args.window,
        concurrency=args.concurrency or 1,
        num_requests=args.num_requests,
        sla=SlaConfig(args.sla_ttft_ms, args.sla_itl_ms),
        output_dir=Path(args.output_dir) if args.output_dir else None,
        save_requests=args.save_requests,
        worker_metric_pattern=args.worker_metric_pattern or DEFAULT_PATTERN,
        plots=args.plots,
        worker_metric=args.worker_metric,
        progress={"auto": None, "on": True, "off": False}[args.progress],
    )
    return client, bench


def _loop_factory(use_uvloop: bool):
    """uvloop's event loop when wanted and installed (cheaper per chunk), else asyncio's."""
    if use_uvloop:
        try:
            import uvloop

            return uvloop.new_event_loop
        except ImportError:
            pass
    return None


def run(args) -> int:
    """Loads the workload, runs it, prints the summary; exit 0 when every request succeeded,
    1 when some failed. Bad input raises a TokenmillError (the CLI prints it, exit 2)."""
    import asyncio
    import json

    from tokenmill.bench.serve import run_serve_bench
    from tokenmill.bench.traces import SyntheticConfig, load_workload

    synthetic = SyntheticConfig(
        args.synthetic_requests,
        args.synthetic_rate,
        args.num_groups,
        args.prefix_tokens,
        args.suffix_tokens,
        args.output_tokens,
        args.num_turns,
        args.think_time,
        args.seed,
    )
    requests = load_workload(args.format, args.trace, synthetic)
    client, bench = _configs(args)
    with asyncio.Runner(loop_factory=_loop_factory(args.uvloop)) as runner:
        results = runner.run(run_serve_bench(requests, client, bench))
    print(json.dumps(results["summary"], indent=1))
    return 0 if results["summary"]["failed"] == 0 else 1


def main(argv: list[str] | None = None) -> int:
    from tokenmill.core.errors import TokenmillError

    parser = argparse.ArgumentParser(
        prog="tokenmill bench serve", description=__doc__.splitlines()[0]
    )
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except TokenmillError as e:
        print(f"tokenmill: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # results of finished requests are already written
        return 130


if __name__ == "__main__":
    sys.exit(main())
