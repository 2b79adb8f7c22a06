"""``tokenmill bench``: benchmarks, each a sub-subcommand (``engine`` here; ``serve`` and
others register themselves through their own modules when present)."""

from __future__ import annotations

import argparse
import logging


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="benchmarks (engine, serve, ...)")
    sub = parser.add_subparsers(dest="bench_command", required=True)
    _register_engine(sub)
    try:
        from tokenmill.launch.bench_serve_cli import register_serve
    except ModuleNotFoundError:
        return
    register_serve(sub)


def _register_engine(sub) -> None:
    p = sub.add_parser("engine", help="engine throughput/latency vs transformers (offline)")
    p.add_argument("--model", default=None, help="model path (default: SmolLM2-135M GGUF)")
    p.add_argument("--trace", default=None, help="AIBrix JSONL trace")
    p.add_argument("--dtypes", default="bf16,fp32", help="comma-separated: bf16,fp32")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--sweep", default="1,8,64", help="other concurrencies ('' for none)")
    p.add_argument(
        "--sweep-requests",
        type=int,
        default=None,
        help="requests per sweep point (default: --num-requests)",
    )
    p.add_argument("--max-output-tokens", type=int, default=256)
    p.add_argument("--single-output-tokens", type=int, default=128)
    p.add_argument("--no-baseline", action="store_true", help="skip transformers")
    p.add_argument(
        "--full-dtypes",
        default=None,
        help="dtypes that also run the transformers static-batch baseline and the sweep "
        "(default: all); the others run tokenmill throughput and both single streams",
    )
    p.add_argument("--decode-group-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (both engines)")
    p.add_argument(
        "--random-prompts",
        action="store_true",
        help="random token ids of the trace's lengths (a random-weight model)",
    )
    p.add_argument("--out", default="benchmarks/results/engine.json", help="'' to not write")
    p.add_argument(
        "--only-single",
        action="store_true",
        help="rerun only the single-stream comparison and merge it into --out",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 4 requests, 8 output tokens, fp32, no sweep",
    )
    p.set_defaults(func=run_engine)


def run_engine(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from tokenmill.bench.engine import DEFAULT_TRACE, EngineBenchConfig, run

    cfg = EngineBenchConfig(
        trace=Path(args.trace) if args.trace else DEFAULT_TRACE,
        model=args.model,
        dtypes=tuple(d for d in args.dtypes.split(",") if d),
        num_requests=args.num_requests,
        concurrency=args.concurrency,
        sweep=tuple(int(c) for c in args.sweep.split(",") if c),
        sweep_requests=args.sweep_requests,
        max_output_tokens=args.max_output_tokens,
        single_output_tokens=args.single_output_tokens,
        baseline=not args.no_baseline,
        full_dtypes=tuple(args.full_dtypes.split(",")) if args.full_dtypes else None,
        decode_group_size=args.decode_group_size,
        threads=args.threads,
        device=args.device,
        random_prompts=args.random_prompts,
        out=Path(args.out) if args.out else None,
        only_single=args.only_single,
    )
    if args.quick:
        cfg = _quick(cfg)
    logging.getLogger("tokenmill.bench").setLevel(logging.INFO)
    result = run(cfg)
    print(json.dumps({d: r.get("ratios", {}) for d, r in result["runs"].items()}, indent=2))
    return 0


def _quick(cfg):
    from dataclasses import replace

    return replace(
        cfg,
        dtypes=("fp32",),
        num_requests=4,
        concurrency=2,
        sweep=(),
        max_output_tokens=8,
        single_prompt_tokens=16,
        single_output_tokens=8,
        kv_cache_memory=64 << 20,
    )
