"""``tokenmill replay``: offline replay of a Mooncake trace on router + N mocker workers.

Defaults equal Dynamo's offline replay anchor (block size 64, trace block size 512, 16,384 KV
blocks per worker, max_num_seqs 256, max_num_batched_tokens 8,192, watermark 0.01, chunked
prefill and prefix caching on); the engine ones are ``specs.MOCKER_DEFAULTS``, which
live mocker workers (``serve``/``worker --engine mocker``) use too. Writes the report JSON to
``--output`` (and prints a one-line summary).

``--prefill-workers P --decode-workers D`` replays a P/D split instead (``--disagg``,
``--disagg-control``, the KV transfer flags: ``flags.add_replay_disagg``); ``--slo-ttft-ms``
and ``--slo-itl-ms`` set the goodput bounds.
"""

from __future__ import annotations

import argparse

from tokenmill.launch import flags
from tokenmill.launch.specs import MOCKER_DEFAULTS


def register(subparsers) -> None:
    p = subparsers.add_parser("replay", help="simulate a trace on router + mocker workers")
    p.add_argument("--trace", required=True, help="Mooncake JSONL, Azure CSV or AIBrix JSONL")
    p.add_argument("--workers", type=int, default=8)
    flags.add_router_mode(p, default="kv")
    p.add_argument("--output", default=None, help="report JSON path")
    p.add_argument("--arrival-speed", type=float, default=1.0, help="divide arrival times by this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-requests", type=int, default=None)
    flags.add_engine_settings(p, MOCKER_DEFAULTS)
    p.add_argument("--trace-block-size", type=int, default=512)
    p.add_argument("--no-chunked-prefill", action="store_true")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--timing-profile", default=None, help="JSON profile instead of the polynomial")
    p.add_argument("--prefill-load-scale", type=float, default=None)
    p.add_argument("--decode-weight", type=float, default=None)
    p.add_argument("--lower-tier-credit", type=float, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--busy-prefill-tokens", type=int, default=None, help="queue above this")
    p.add_argument("--max-queued", type=int, default=1024, help="shed above this")
    p.add_argument("--queue-order", choices=("fcfs", "spf"), default="fcfs")
    p.add_argument("--no-fast-forward", action="store_true", help="step every decode step")
    p.add_argument(
        "--save-requests", action="store_true", help="per-request records in the report JSON"
    )
    flags.add_replay_disagg(p)
    flags.add_planner(p, replay=True)
    p.set_defaults(func=run)


def _policy_config(args: argparse.Namespace):
    from tokenmill.router.policy import default_policy_config

    overrides = {
        k: getattr(args, k)
        for k in ("prefill_load_scale", "decode_weight", "lower_tier_credit", "temperature")
        if getattr(args, k) is not None
    }
    return default_policy_config(args.router_mode, **overrides)


def _transfer_config(args: argparse.Namespace):
    from tokenmill.sim.transfer import TransferConfig, kv_bytes_per_token

    bytes_per_token = args.kv_bytes_per_token
    if args.kv_model_shape:
        parts = args.kv_model_shape.split(",")
        if len(parts) != 4:
            raise SystemExit("--kv-model-shape: expected LAYERS,KV_HEADS,HEAD_DIM,DTYPE")
        try:
            bytes_per_token = kv_bytes_per_token(
                int(parts[0]), int(parts[1]), int(parts[2]), parts[3]
            )
        except ValueError as e:
            raise SystemExit(f"--kv-model-shape: {e}") from None
    return TransferConfig(
        bytes_per_token=bytes_per_token,
        bandwidth_gbps=args.kv_transfer_bandwidth,
        latency_ms=args.kv_transfer_latency_ms,
        tokens=args.kv_transfer_tokens,
        link=args.kv_transfer_link,
    )


def build_config(args: argparse.Namespace):
    from tokenmill.router.disagg import DisaggConfig, DisaggMode
    from tokenmill.router.queue import QueueConfig
    from tokenmill.router.router import RouterConfig
    from tokenmill.sim.replay import ReplayConfig

    router = RouterConfig(
        mode=args.router_mode,
        block_size=args.block_size,
        policy=_policy_config(args),
        queue=QueueConfig(args.busy_prefill_tokens, args.max_queued, args.queue_order),
        seed=args.seed,
    )
    return ReplayConfig(
        num_workers=args.workers,
        block_size=args.block_size,
        trace_block_size=args.trace_block_size,
        num_blocks=args.num_blocks,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_chunked_prefill=not args.no_chunked_prefill,
        enable_prefix_caching=not args.no_prefix_caching,
        watermark=args.watermark,
        seed=args.seed,
        fast_forward=not args.no_fast_forward,
        sla_ttft_ms=args.slo_ttft_ms,
        sla_itl_ms=args.slo_itl_ms,
        router=router,
        num_prefill_workers=args.prefill_workers,
        num_decode_workers=args.decode_workers,
        control=args.disagg_control,
        disagg=DisaggConfig(
            mode=DisaggMode(args.disagg),
            min_remote_prefill_tokens=args.min_remote_prefill_tokens,
            max_prefill_queue_tokens=args.max_prefill_queue_tokens,
        ),
        transfer=_transfer_config(args),
    )


def run(args: argparse.Namespace) -> int:
    import json
    import time

    from tokenmill.launch.planning import plot_timeline, run_planned_replay
    from tokenmill.launch.profiling import load_step_timing
    from tokenmill.launch.specs import PlannerSpec
    from tokenmill.sim.cluster import static_cost_metrics
    from tokenmill.sim.replay import Replay
    from tokenmill.sim.report import request_json
    from tokenmill.sim.workload import read_trace

    if args.prefill_workers and not args.decode_workers:
        raise SystemExit("replay: --prefill-workers needs --decode-workers")
    if args.disagg_control == "dynamo" and args.decode_workers and not args.prefill_workers:
        raise SystemExit("replay: --disagg-control dynamo needs --prefill-workers")
    cfg = build_config(args)
    planner = PlannerSpec.from_args(args)
    requests = read_trace(args.trace, args.max_requests, args.arrival_speed, args.trace_block_size)
    timing = load_step_timing(args.timing_profile) if args.timing_profile else None
    t0 = time.perf_counter()
    if planner.mode is None:
        replay = Replay(cfg, requests, timing)
        report = replay.run()
        report.update(static_cost_metrics(report, {"both": args.workers}))
    else:
        report, replay = run_planned_replay(planner, cfg, requests, timing)
        if args.timeline_plot:
            plot_timeline(report, args.timeline_plot)
    report["wall_s"] = round(time.perf_counter() - t0, 2)
    report["config"] = {
        "router_mode": args.router_mode,
        "workers": args.workers,
        "prefill_workers": args.prefill_workers,
        "decode_workers": args.decode_workers,
        "disagg": args.disagg if cfg.split else None,
        "disagg_control": args.disagg_control if cfg.split else None,
        "kv_transfer_bandwidth": args.kv_transfer_bandwidth,
        "planner": planner.mode,
        "arrival_speed": args.arrival_speed,
        "seed": args.seed,
        "trace": args.trace,
    }
    if args.save_requests:
        report["requests"] = [request_json(r) for r in replay.records.values()]
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=1)
    ttft, gaps = report["ttft"], report["itl_gaps"]
    shape = f"{args.prefill_workers}P{args.decode_workers}D " if cfg.split else ""
    print(
        f"{shape}{args.router_mode}: {report['completed']} requests, TTFT mean "
        f"{_f(ttft['mean'], 1)} p99 {_f(ttft['p99'], 1)} ms, ITL mean "
        f"{_f(report['itl']['mean'], 2)} ms (all gaps: mean {_f(gaps['mean'], 2)} p99 "
        f"{_f(gaps['p99'], 2)}), "
        f"reuse {_f(report['kv_reuse_ratio'], 3)}, shed {report['shed_requests']}, "
        f"SLA {_f(report['sla_attainment'], 4)}, {report['worker_seconds']:.0f} worker-s, "
        f"wall {report['wall_s']} s"
    )
    return 0


def _f(x: float | None, digits: int) -> str:
    """A report number for the summary line; "-" for no data (the report's None)."""
    return "-" if x is None else f"{x:.{digits}f}"
