"""``tokenmill bench engine`` on a GPU with random-weight models (run by ``gpu_check.sh``).

The default model's GGUF cannot travel to the GPU machine, so this builds Llama-family
checkpoints of real shapes with random weights (transformers' own init, saved in bf16 with
``save_pretrained``) and the engine tests' tiny tokenizer, then runs the engine benchmark
(``tokenmill.bench.engine.run``) on each, with ``random_prompts``: prompts are random token
ids as long as the AIBrix trace's recorded prompt lengths, outputs the trace's lengths capped.

    python3 benchmarks/gpu_bench.py --trace T --out-dir DIR [--device cuda] [--size full]

Shapes (``--size full``): ``smollm2-135m`` (SmolLM2-135M: 30 layers, hidden 576, 9/3 heads,
vocab 49152, tied) and ``llama-1b`` (Llama-3.2-1B: 16 layers, hidden 2048, 32/8 heads,
vocab 128256, tied, llama3 RoPE). ``--size tiny`` is a 2-layer model and a handful of
requests: a dry run of the same code on the CPU. Per model one ``engine_<name>.json`` (the
bench's own format) goes to ``--out-dir``, and a one-line summary per model is printed:
tokenmill's closed loop at ``concurrency`` against transformers' static batches of the same
size, and single stream (concurrency 1) decode tok/s of both.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "engine"))
from tiny_models import write_tokenizer_files  # noqa: E402

from tokenmill.bench.engine import EngineBenchConfig, run  # noqa: E402

LLAMA3_ROPE = dict(
    rope_type="llama3",
    rope_theta=500000.0,
    factor=32.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=8192,
)
SHAPES = {
    "full": {
        "smollm2-135m": dict(
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            vocab_size=49152,
            max_position_embeddings=8192,
            rope_theta=100000.0,
        ),
        "llama-1b": dict(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=64,
            vocab_size=128256,
            max_position_embeddings=131072,
            rope_parameters=LLAMA3_ROPE,
        ),
    },
    "tiny": {
        "tiny-llama": dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=512,
            max_position_embeddings=2048,
            rope_theta=100000.0,
        ),
    },
}


@dataclass(frozen=True)
class Size:
    num_requests: int
    max_output_tokens: int
    concurrency: int
    single_prompt_tokens: int
    single_output_tokens: int
    kv_cache_memory: int


SIZES = {
    "full": Size(128, 128, 32, 128, 128, 2 << 30),
    "tiny": Size(6, 6, 3, 16, 6, 16 << 20),
}


def build_model(root: Path, name: str, shape: dict, device: str) -> Path:
    """A random-weight bf16 Llama checkpoint with the tiny tokenizer under ``root/name``."""
    import transformers

    config = transformers.LlamaConfig(
        **shape,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        hidden_act="silu",
        bos_token_id=2,
        eos_token_id=3,
    )
    torch.manual_seed(0)
    with torch.device(device):  # init on the GPU: seconds instead of a minute for 1B on CPU
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    path = root / name
    model.save_pretrained(path)
    write_tokenizer_files(path)
    del model
    return path


def bench_config(args, model_dir: Path, size: Size, name: str) -> EngineBenchConfig:
    return EngineBenchConfig(
        trace=Path(args.trace),
        model=str(model_dir),
        device=args.device,
        random_prompts=True,
        dtypes=("bf16",),
        num_requests=size.num_requests,
        max_prompt_tokens=1024,
        max_output_tokens=size.max_output_tokens,
        concurrency=size.concurrency,
        sweep=(),
        single_prompt_tokens=size.single_prompt_tokens,
        single_output_tokens=size.single_output_tokens,
        kv_cache_memory=size.kv_cache_memory,
        max_num_batched_tokens=4096,
        decode_group_size=size.concurrency,  # one padded SDPA over all decode rows
        out=Path(args.out_dir) / f"engine_{name}.json",
    )


def summary(name: str, result: dict, seconds: float) -> dict:
    run_ = result["runs"]["bf16"]
    tm, hf = run_["tokenmill"][0], run_.get("transformers", {})
    return {
        "model": name,
        "device": result["machine"]["device"],
        "concurrency": tm["concurrency"],
        "tokenmill_tok_s": tm["output_tok_s"],
        "transformers_static_batch_tok_s": hf.get("static_batch", {}).get("output_tok_s"),
        "tokenmill_single_decode_tok_s": run_["single_stream"]["decode_tok_s"],
        "transformers_single_decode_tok_s": hf.get("single_stream", {}).get("decode_tok_s"),
        "ratios": run_.get("ratios", {}),
        "output_tokens": tm["output_tokens"],
        "workload_output_tokens": run_["workload"]["output_tokens"],
        "num_preemptions": tm["num_preemptions"],
        "bench_s": round(seconds, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", required=True, help="AIBrix JSONL (its first rows suffice)")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--models", default=None, help="comma-separated subset of the shapes")
    parser.add_argument("--model-root", default="/tmp/tokenmill_gpu_models")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("tokenmill.bench").setLevel(logging.INFO)
    shapes = SHAPES[args.size]
    names = args.models.split(",") if args.models else list(shapes)
    size = SIZES[args.size]
    rows = []
    for name in names:
        t0 = time.perf_counter()
        model_dir = build_model(Path(args.model_root), name, shapes[name], args.device)
        print(f"{name}: built in {time.perf_counter() - t0:.1f} s at {model_dir}", flush=True)
        t0 = time.perf_counter()
        result = run(bench_config(args, model_dir, size, name))
        row = summary(name, result, time.perf_counter() - t0)
        if row["output_tokens"] != row["workload_output_tokens"]:
            raise SystemExit(
                f"{name}: tokenmill produced {row['output_tokens']} tokens, the "
                f"workload asks for {row['workload_output_tokens']}"
            )
        print(json.dumps(row), flush=True)
        rows.append(row)
    (Path(args.out_dir) / "bench_summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
