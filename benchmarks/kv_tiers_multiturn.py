"""Multi-turn chat with the real default model (SmolLM2-135M) when the device KV holds only a
fraction of the conversations (issue 16, "Real model, multi-turn"; the shape of LMCache's
multi-round QA benchmark scaled to this CPU): ``--users`` users share a system prompt of
``--system-tokens``; each round every user sends its whole history plus ``--turn-tokens``
new tokens and gets ``--output-tokens`` greedy tokens back, which join its history. The
device pool is ``--device-fraction`` of the final working set, so a user's history is
evicted by the others before its next turn.

Three engines over the same loaded model, side by side, rounds interleaved (round r of
every engine before round r+1 of any), so machine noise hits them alike:

- ``none``: no lower tier (recompute what was evicted);
- ``host``: the host-memory tier (sync onboard, offload on eviction);
- ``disk``: a local-disk tier only (async onboard; files in the page cache).

A round's requests are submitted together and the engine core is stepped until they finish;
TTFT is the time from submission to a request's first token. Greedy text must be identical
across the three. Writes key "multiturn" of ``benchmarks/results/kv_tiers.json``::

    python benchmarks/kv_tiers_multiturn.py [--users 8 --rounds 4 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "kv_tiers.json"

from tokenmill.core.request import EngineRequest  # noqa: E402
from tokenmill.core.sampling import SamplingParams  # noqa: E402
from tokenmill.engine.builder import build_real_core  # noqa: E402
from tokenmill.engine.config import CacheConfig, SchedulerConfig  # noqa: E402
from tokenmill.engine.kv_tiers import GIB, TierSettings, build_tiers, layout_of  # noqa: E402
from tokenmill.engine.loader import load_model  # noqa: E402

BLOCK = 16


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--users", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--system-tokens", type=int, default=256)
    ap.add_argument("--turn-tokens", type=int, default=96)
    ap.add_argument("--output-tokens", type=int, default=16)
    ap.add_argument("--device-fraction", type=float, default=0.25)
    ap.add_argument("--threads", type=int, default=2)
    return ap.parse_args()


class Engine:
    def __init__(
        self, name: str, loaded, num_blocks: int, settings: TierSettings | None, max_len: int
    ):
        self.name = name
        self.tiers = (
            None
            if settings is None
            else build_tiers(settings, layout_of(loaded, BLOCK), loaded.name)
        )
        sides = (
            {}
            if self.tiers is None
            else {"connector": self.tiers.connector, "worker_connector": self.tiers.worker}
        )
        config = SchedulerConfig(
            max_model_len=max_len, max_num_seqs=64, max_num_batched_tokens=2048
        )
        self.core = build_real_core(
            loaded, config, cache=CacheConfig(BLOCK, num_blocks), decode=False, **sides
        )
        if self.tiers is not None:
            self.tiers.attach(self.core)
        self.ttft: list[float] = []
        self.num_prompt_tokens = 0

    def run_round(
        self, prompts: dict[str, list[int]], params: SamplingParams
    ) -> dict[str, list[int]]:
        core, start = self.core, time.perf_counter()
        first: dict[str, float] = {}
        out: dict[str, list[int]] = {rid: [] for rid in prompts}
        for rid, prompt in prompts.items():
            self.num_prompt_tokens += len(prompt)
            core.add_request(EngineRequest(request_id=rid, prompt_token_ids=prompt, params=params))
        while core.has_unfinished_requests():
            num_steps = core.num_steps
            outputs = core.step()
            if core.num_steps == num_steps:  # nothing to compute (loads in flight): as the
                time.sleep(0.0005)  # engine loop does, wait instead of spinning on the GIL
            for o in outputs:
                if o.new_token_ids and o.request_id not in first:
                    first[o.request_id] = time.perf_counter() - start
                out[o.request_id] += o.new_token_ids
        self.ttft += list(first.values())
        return out


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    rng = random.Random(0)
    loaded = load_model(None)
    vocab = loaded.config.vocab_size
    tok = lambda n: [rng.randrange(100, vocab - 100) for _ in range(n)]  # noqa: E731
    system = tok(args.system_tokens)
    final_len = args.system_tokens + args.rounds * (args.turn_tokens + args.output_tokens)
    working_set = args.system_tokens + args.users * (final_len - args.system_tokens)
    num_blocks = max(int(working_set * args.device_fraction) // BLOCK, final_len // BLOCK + 8)
    block_bytes = layout_of(loaded, BLOCK).bytes_per_block
    disk_dir = tempfile.mkdtemp(prefix="kv-multiturn-")
    engines = [
        Engine("none", loaded, num_blocks, None, final_len + 64),
        Engine(
            "host",
            loaded,
            num_blocks,
            TierSettings(host_bytes=4 * working_set // BLOCK * block_bytes),
            final_len + 64,
        ),
        Engine(
            "disk",
            loaded,
            num_blocks,
            TierSettings(host_bytes=0, disk_dir=disk_dir, disk_bytes=GIB),
            final_len + 64,
        ),
    ]
    params = SamplingParams(temperature=0.0, max_tokens=args.output_tokens, ignore_eos=True)
    histories = {e.name: {u: list(system) for u in range(args.users)} for e in engines}
    turns = [[tok(args.turn_tokens) for _ in range(args.users)] for _ in range(args.rounds)]
    identical = True
    round_ttft: dict[str, list[float]] = {e.name: [] for e in engines}
    for r in range(args.rounds):
        outs = {}
        for e in engines[r % 3 :] + engines[: r % 3]:  # rotate the order: no engine always first
            h = histories[e.name]
            prompts = {f"{e.name}-r{r}-u{u}": h[u] + turns[r][u] for u in range(args.users)}
            before = len(e.ttft)
            got = e.run_round(prompts, params)
            round_ttft[e.name].append(statistics.mean(e.ttft[before:]))
            outs[e.name] = [got[f"{e.name}-r{r}-u{u}"] for u in range(args.users)]
            for u in range(args.users):
                h[u] = h[u] + turns[r][u] + outs[e.name][u]
        identical &= outs["none"] == outs["host"] == outs["disk"]
        print(
            f"round {r}: " + ", ".join(f"{n} {1000 * v[-1]:.0f} ms" for n, v in round_ttft.items()),
            flush=True,
        )
        report(args, engines, num_blocks, working_set, identical, round_ttft, r + 1)  # so far
    for e in engines:
        e.core.executor.shutdown()


def p99(xs: list[float]) -> float:
    return sorted(xs)[min(len(xs) - 1, int(0.99 * len(xs)))]


def report(args, engines, num_blocks, working_set, identical, round_ttft, rounds_done) -> None:  # noqa: ANN001
    rows = {}
    for e in engines:
        later = e.ttft[args.users :]  # rounds after the first (cold for all)
        onboarded = 0 if e.tiers is None else e.tiers.connector.num_onboarded_blocks
        rows[e.name] = {
            "ttft_mean_ms": round(1000 * statistics.mean(e.ttft), 1),
            "ttft_p99_ms": round(1000 * p99(e.ttft), 1),
            "ttft_mean_ms_after_round_0": round(1000 * statistics.mean(later), 1)
            if later
            else None,
            "round_ttft_mean_ms": [round(1000 * t, 1) for t in round_ttft[e.name]],
            "prompt_tokens": e.num_prompt_tokens,
            "prompt_tokens_from_device_cache": e.core.scheduler.num_hit_tokens,
            "prompt_tokens_from_tiers": onboarded * BLOCK,
            "prompt_tokens_computed": e.num_prompt_tokens
            - e.core.scheduler.num_hit_tokens
            - onboarded * BLOCK,
            "tiers": None if e.tiers is None else e.tiers.stats(),
        }
    none = rows["none"]["ttft_mean_ms"]
    result = {
        "command": "python benchmarks/kv_tiers_multiturn.py " + " ".join(sys.argv[1:]),
        "shape": {
            k: getattr(args, k)
            for k in (
                "users",
                "rounds",
                "system_tokens",
                "turn_tokens",
                "output_tokens",
                "device_fraction",
                "threads",
            )
        },
        "rounds_done": rounds_done,
        "device_blocks": num_blocks,
        "working_set_tokens": working_set,
        "greedy_text_identical": identical,
        "machine": f"{os.cpu_count()} CPU cores shared with other work; disk files in the page cache",
        "engines": rows,
        "ttft_mean_speedup_vs_none": {n: round(none / rows[n]["ttft_mean_ms"], 2) for n in rows},
        "goal": "host tier >= 3x lower mean TTFT than none",
    }
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data["multiturn"] = result
    RESULTS.write_text(json.dumps(data, indent=1) + "\n")
    print(
        json.dumps({k: result[k] for k in ("greedy_text_identical", "ttft_mean_speedup_vs_none")})
    )
    keys = ("ttft_mean_ms", "ttft_p99_ms", "ttft_mean_ms_after_round_0", "prompt_tokens_computed")
    print(json.dumps({n: {k: r[k] for k in keys} for n, r in rows.items()}), flush=True)


if __name__ == "__main__":
    main()
