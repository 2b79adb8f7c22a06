"""tokenmill's offline ``LLM`` against vLLM's offline ``LLM``, side by side on one machine.

Both engines load the same weights (the default GGUF dequantized once and written as a
Hugging Face safetensors directory, so each casts the same fp32 values to bf16) and get the
same token-id prompts: the first ``num_prompts`` prompts of the AIBrix trace whose text
tokenizes to ``min_tokens``..``max_tokens`` tokens. Greedy, ``max_tokens`` output tokens each
with ``ignore_eos``, ``threads`` CPU threads, load and warm-up excluded. vLLM runs in its own
venv (``--vllm-python``), as a subprocess that stays up and serves one job per stdin line, so
runs interleave (tokenmill, vLLM, tokenmill, vLLM, ...) without reloading either engine.

Workloads (output tok/s = output tokens / wall time, prefill included):

- ``single``: ``num_single`` prompts one after the other (one stream);
- ``c32``: all ``num_prompts`` prompts submitted at once, at most ``concurrency`` running.

Token check: fp32 greedy ids of both engines for ``check_prompts`` prompts, first
``check_tokens`` tokens compared (where they diverge, if they do).

    python benchmarks/engine_vs_vllm.py --vllm-python /work/vllm-venv/bin/python

writes ``benchmarks/results/engine_vs_vllm.json`` (medians, per-run values, ratios
tokenmill/vLLM, the load average before and after).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_TRACE = Path("/work/shared/data/traces/8min_up_and_down.jsonl")
DEFAULT_OUT = Path("benchmarks/results/engine_vs_vllm.json")
ENGINE_JSON = Path("benchmarks/results/engine.json")  # ``tokenmill bench engine``'s results
DEFAULT_HF_DIR = Path("/tmp/tokenmill-smollm2-hf")
WORKLOADS = ("single", "c32")


# ------------------------------------------------------------------ the vLLM side (own venv)


def vllm_worker(model_dir: str, dtype: str, threads: int, concurrency: int) -> None:
    """Loads vLLM once, then answers one JSON job per stdin line with one JSON line.

    Imports nothing from tokenmill: it runs under the vLLM venv's python."""
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams, TokensPrompt

    llm = LLM(
        model=model_dir,
        dtype={"bf16": "bfloat16", "fp32": "float32"}[dtype],
        skip_tokenizer_init=True,
        max_num_seqs=concurrency,
        max_num_batched_tokens=2048,
        max_model_len=2048,
        enable_prefix_caching=True,
    )
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        params = SamplingParams(
            temperature=0.0, max_tokens=job["max_tokens"], ignore_eos=True, detokenize=False
        )
        groups = job["groups"]  # prompts in one group run together; groups run one by one
        start, outs = time.perf_counter(), []
        for group in groups:
            res = llm.generate(
                [TokensPrompt(prompt_token_ids=p) for p in group], params, use_tqdm=False
            )
            outs.extend(list(r.outputs[0].token_ids) for r in res)
        elapsed = time.perf_counter() - start
        print(json.dumps({"seconds": elapsed, "token_ids": outs}), flush=True)


class VllmProcess:
    """The vLLM worker subprocess; ``run`` sends one job and waits for its answer."""

    def __init__(self, python: str, model_dir: Path, dtype: str, threads: int, concurrency: int):
        cmd = [
            python,
            __file__,
            "--vllm-worker",
            str(model_dir),
            dtype,
            str(threads),
            str(concurrency),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        env.pop("PYTHONPATH", None)
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        self._read()  # {"ready": true}

    def _read(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"vLLM worker exited with {self.proc.wait()}")
            if line.startswith("{"):
                return json.loads(line)

    def run(self, groups: list[list[list[int]]], max_tokens: int) -> dict:
        self.proc.stdin.write(json.dumps({"groups": groups, "max_tokens": max_tokens}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


# ------------------------------------------------------------------ the tokenmill side


def export_hf_dir(out: Path) -> Path:
    """The default GGUF, dequantized to fp32, as a Hugging Face directory (idempotent)."""
    if (out / "model.safetensors").is_file():
        return out
    from safetensors.torch import save_file

    from tokenmill.engine.default_model import default_model_path
    from tokenmill.engine.models.gguf_loader import read_gguf
    from tokenmill.engine.tokenizer import Tokenizer

    config, weights, meta = read_gguf(default_model_path())
    tokenizer = Tokenizer.from_gguf(meta)
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.contiguous() for k, v in weights.items() if k != "lm_head.weight"}
    save_file(weights, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(_hf_config(config), indent=1))
    tokenizer._backend.save(str(out / "tokenizer.json"))
    specials = {k: v for k, v in tokenizer.special_tokens.items()}
    specials["chat_template"] = tokenizer.chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(specials, indent=1))
    gen = {"eos_token_id": list(tokenizer.eos_token_ids), "bos_token_id": config.bos_token_id}
    (out / "generation_config.json").write_text(json.dumps(gen))
    return out


def _hf_config(c) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "tie_word_embeddings": c.tie_word_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": list(c.eos_token_ids) or None,
        "torch_dtype": "float32",
    }


def trace_prompts(tokenizer, n: int, lo: int, hi: int, trace: Path = DEFAULT_TRACE):
    """The first ``n`` trace prompts whose text encodes to ``lo``..``hi`` tokens (ids)."""
    out = []
    for line in trace.read_text().splitlines():
        for req in json.loads(line).get("requests", []):
            ids = tokenizer.encode(req.get("prompt") or "")
            if lo <= len(ids) <= hi:
                out.append(ids)
            if len(out) == n:
                return out
    raise ValueError(f"{trace}: only {len(out)} prompts of {lo}..{hi} tokens")


class TokenmillRunner:
    """tokenmill's offline ``LLM`` over the exported directory; ``run`` mirrors vLLM's job."""

    def __init__(self, model_dir: Path, dtype: str, threads: int, concurrency: int, **kwargs):
        import torch

        from tokenmill.engine.llm import LLM

        torch.set_num_threads(threads)
        self.llm = LLM(
            str(model_dir),
            dtype=dtype,
            device="cpu",
            max_num_seqs=concurrency,
            max_num_batched_tokens=2048,
            max_model_len=2048,
            num_threads=threads,
            **kwargs,
        )

    def run(self, groups: list[list[list[int]]], max_tokens: int) -> dict:
        from tokenmill.core.sampling import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        start, outs = time.perf_counter(), []
        for group in groups:
            outs.extend(r.token_ids for r in self.llm.generate(group, params))
        return {"seconds": time.perf_counter() - start, "token_ids": outs}


# ------------------------------------------------------------------ the comparison


def workload_groups(prompts, name: str, num_single: int) -> list[list[list[int]]]:
    if name == "single":
        return [[p] for p in prompts[:num_single]]
    return [prompts]


def tok_s(result: dict) -> float:
    return sum(len(t) for t in result["token_ids"]) / result["seconds"]


def interleaved(engines: dict, prompts, args, dtype: str, rounds: int) -> dict:
    """``rounds`` x (each workload x each engine, alternating); medians and ratios."""
    runs = {w: {e: [] for e in engines} for w in WORKLOADS}
    for r in range(rounds):
        for w in WORKLOADS:
            groups = workload_groups(prompts, w, args.num_single)
            order = list(engines) if r % 2 == 0 else list(reversed(engines))
            for e in order:
                res = engines[e].run(groups, args.max_tokens)
                runs[w][e].append(round(tok_s(res), 2))
                print(f"[{dtype}] round {r} {w} {e}: {runs[w][e][-1]} tok/s", flush=True)
    table = {}
    for w in WORKLOADS:
        med = {e: statistics.median(v) for e, v in runs[w].items()}
        table[w] = {"tok_s_runs": runs[w], "median_tok_s": med}
        if "vllm" in med:
            table[w]["ratio_tokenmill_over_vllm"] = round(med["tokenmill"] / med["vllm"], 3)
    return table


def token_check(engines: dict, prompts, n_prompts: int, n_tokens: int) -> dict:
    groups = [[p] for p in prompts[:n_prompts]]
    ids = {e: eng.run(groups, n_tokens)["token_ids"] for e, eng in engines.items()}
    per_prompt = []
    for i in range(n_prompts):
        a, b = ids["tokenmill"][i], ids["vllm"][i]
        diverge = next((j for j in range(min(len(a), len(b))) if a[j] != b[j]), None)
        per_prompt.append(
            {
                "prompt_tokens": len(prompts[i]),
                "equal": diverge is None,
                "first_divergence": diverge,
            }
        )
    return {
        "num_equal": sum(p["equal"] for p in per_prompt),
        "num_prompts": n_prompts,
        "num_tokens": n_tokens,
        "prompts": per_prompt,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vllm-python", default="/work/vllm-venv/bin/python")
    p.add_argument("--no-vllm", action="store_true", help="tokenmill only (profiling)")
    p.add_argument("--model-dir", type=Path, default=DEFAULT_HF_DIR)
    p.add_argument("--dtypes", default="bf16,fp32")
    p.add_argument("--rounds", default="5,3", help="rounds per dtype, in --dtypes order")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--num-single", type=int, default=4)
    p.add_argument("--min-tokens", type=int, default=50)
    p.add_argument("--max-prompt-tokens", type=int, default=500)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--check-prompts", type=int, default=4)
    p.add_argument("--check-tokens", type=int, default=32)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument(
        "--merge-into",
        type=Path,
        default=ENGINE_JSON,
        help="JSON file that gets a 'vs_vllm' summary key (if it exists)",
    )
    p.add_argument("--merge-only", action="store_true", help="summarize an existing --out")
    args = p.parse_args(argv)
    if args.merge_only:
        merge_summary(json.loads(args.out.read_text()), args.merge_into, args.out)
        return
    model_dir = export_hf_dir(args.model_dir)
    from tokenmill.engine.tokenizer import Tokenizer

    prompts = trace_prompts(
        Tokenizer.from_hf_dir(model_dir), args.num_prompts, args.min_tokens, args.max_prompt_tokens
    )
    result = {
        "config": {k: str(v) for k, v in vars(args).items()},
        "machine": _machine(),
        "load_avg_before": os.getloadavg(),
        "runs": {},
    }
    result["config"]["prompt_tokens"] = [len(x) for x in prompts]
    for dtype, rounds in zip(
        args.dtypes.split(","), map(int, args.rounds.split(",")), strict=False
    ):
        engines = _engines(args, model_dir, dtype, prompts)
        run = interleaved(engines, prompts, args, dtype, rounds)
        if dtype == "fp32" and "vllm" in engines:
            run["token_check"] = token_check(
                engines, prompts, args.check_prompts, args.check_tokens
            )
        result["runs"][dtype] = run
        for e in engines.values():
            getattr(e, "close", lambda: None)()
        del engines
    result["load_avg_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    merge_summary(result, args.merge_into, args.out)
    print(
        json.dumps(
            {
                d: {w: r[w].get("ratio_tokenmill_over_vllm") for w in WORKLOADS}
                for d, r in result["runs"].items()
            }
        )
    )


def merge_summary(result: dict, target: Path, source: Path) -> None:
    """Adds ``vs_vllm`` (medians and ratios per dtype and workload) to ``target``, keeping
    the rest of that file as it is; does nothing if ``target`` does not exist."""
    if not target.is_file():
        return
    data = json.loads(target.read_text())
    data["vs_vllm"] = {
        "source": str(source),
        "machine": result["machine"],
        "load_avg_before": result["load_avg_before"],
        "load_avg_after": result.get("load_avg_after"),
        "runs": {
            dtype: {w: {k: v for k, v in run[w].items() if k != "tok_s_runs"} for w in WORKLOADS}
            | (
                {
                    "token_check": {
                        k: run["token_check"][k] for k in ("num_equal", "num_prompts", "num_tokens")
                    }
                }
                if "token_check" in run
                else {}
            )
            for dtype, run in result["runs"].items()
        },
    }
    target.write_text(json.dumps(data, indent=2) + "\n")


def _engines(args, model_dir: Path, dtype: str, prompts) -> dict:
    """Both engines loaded and warmed up (one short batch each, not timed)."""
    engines = {"tokenmill": TokenmillRunner(model_dir, dtype, args.threads, args.concurrency)}
    if not args.no_vllm:
        engines["vllm"] = VllmProcess(
            args.vllm_python, model_dir, dtype, args.threads, args.concurrency
        )
    for eng in engines.values():
        eng.run([prompts[:8], prompts[8:9]], 8)
    return engines


def _machine() -> dict:
    import torch

    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
    }


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--vllm-worker":
        vllm_worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    else:
        main()
