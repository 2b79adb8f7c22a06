"""``tokenmill profile``: measure one worker (prefill time against input length and prefix
hit, decode ITL against batch size and context) into the timing-profile JSON that
``replay --planner sla|dynamo``, ``serve --planner sla`` and the mocker's
``--timing-profile`` read (format: ``tokenmill.core.timing_profile``)."""

from __future__ import annotations

import argparse

from tokenmill.launch import flags


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x)


def register(subparsers) -> None:
    p = subparsers.add_parser("profile", help="measure one worker's timing into a profile JSON")
    flags.add_engine(p)
    p.add_argument("--output", default="profile.json", help="the profile JSON to write")
    p.add_argument("--input-lengths", type=_ints, default=None, help="comma-separated")
    p.add_argument("--prefix-hits", type=_floats, default=None, help="comma-separated [0, 1)")
    p.add_argument("--batch-sizes", type=_ints, default=None, help="comma-separated")
    p.add_argument("--context-lengths", type=_ints, default=None, help="comma-separated")
    p.add_argument("--decode-steps", type=flags.POSITIVE_INT, default=8)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tokenmill.bench.profile import ProfileConfig
    from tokenmill.launch.profiling import run_profile
    from tokenmill.launch.specs import EngineSpec

    given = {
        k: getattr(args, k)
        for k in ("input_lengths", "prefix_hits", "batch_sizes", "context_lengths")
        if getattr(args, k) is not None
    }
    config = ProfileConfig(**given, decode_steps=args.decode_steps)
    profile = run_profile(EngineSpec.from_args(args), config, args.output)
    print(
        f"profile: {len(profile.prefill)} prefill and {len(profile.decode)} decode points "
        f"-> {args.output}"
    )
    return 0
