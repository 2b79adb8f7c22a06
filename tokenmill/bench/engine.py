"""``tokenmill bench engine``: the engine's offline throughput, latency and single-stream
speed against transformers, measured in the same run on the same machine.

Workload: the first ``num_requests`` requests of an AIBrix trace whose prompt (its text,
tokenized by the model's tokenizer, no chat template) fits ``max_prompt_tokens``; output
lengths from the trace capped at ``max_output_tokens`` (at least 1), ``ignore_eos``. With
``random_prompts`` (random-weight models whose tokenizer is not a real one) a prompt is
instead seeded random token ids, as many as the trace's recorded prompt length.

``device`` ("cpu", "cuda", "auto") holds both engines, their KV and the timed work.

- tokenmill: a closed loop of ``concurrency`` clients over one ``EngineCore`` (continuous
  batching): a request is added as soon as one finishes, in arrival order. TTFT is measured
  from a request's add to its first token.
- transformers: ``generate`` in static batches of ``concurrency`` in arrival order (left
  padding, ``max_new_tokens`` = the longest output of the batch, greedy); only each request's
  own output tokens count.
- single stream: one prompt of ``single_prompt_tokens``, ``single_output_tokens`` out; decode
  tok/s excludes the first token (prefill). A decode step is profiled and compared with the
  roofline: bytes read per step / measured memory bandwidth.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from tokenmill.core.request import EngineRequest
from tokenmill.core.sampling import SamplingParams
from tokenmill.engine.builder import build_real_core
from tokenmill.engine.config import SchedulerConfig
from tokenmill.engine.core import EngineCore

log = logging.getLogger(__name__)
DEFAULT_TRACE = Path("/work/shared/data/traces/8min_up_and_down.jsonl")


@dataclass(frozen=True)
class EngineBenchConfig:
    trace: Path = DEFAULT_TRACE
    model: str | None = None
    device: str = "cpu"
    random_prompts: bool = False
    dtypes: tuple[str, ...] = ("bf16", "fp32")
    num_requests: int = 256
    max_prompt_tokens: int = 1024
    max_output_tokens: int = 256
    concurrency: int = 32
    sweep: tuple[int, ...] = (1, 8, 64)
    sweep_requests: int | None = None  # requests per sweep point (default: num_requests)
    single_prompt_tokens: int = 128
    single_output_tokens: int = 128
    baseline: bool = True
    # dtypes whose static-batch transformers baseline and concurrency sweep run (None: all);
    # the single-stream baseline always runs
    full_dtypes: tuple[str, ...] | None = None
    kv_cache_memory: int = 1 << 30
    max_num_batched_tokens: int = 2048
    decode_group_size: int = 8
    threads: int | None = None
    out: Path | None = Path("benchmarks/results/engine.json")
    runner_kwargs: dict = field(default_factory=dict)
    # True: only the single-stream part (tokenmill vs transformers, decode profile), merged
    # into the dtypes' entries of an existing ``out`` file (``run_single``)
    only_single: bool = False


@dataclass
class Workload:
    prompts: list[list[int]]
    outputs: list[int]

    def take(self, n: int) -> Workload:
        return Workload(self.prompts[:n], self.outputs[:n])


def load_workload(cfg: EngineBenchConfig, tokenizer) -> Workload:
    from tokenmill.bench.traces import read_aibrix

    prompts, outputs = [], []
    g = torch.Generator().manual_seed(0)
    for r in read_aibrix(cfg.trace):
        if cfg.random_prompts:
            ids = torch.randint(4, tokenizer.vocab_size, (r.num_input_tokens,), generator=g)
            ids = ids.tolist()
        else:
            ids = tokenizer.encode(r.prompt_text)
        if 0 < len(ids) <= cfg.max_prompt_tokens:
            prompts.append(ids)
            outputs.append(max(1, min(r.num_output_tokens, cfg.max_output_tokens)))
        if len(prompts) == cfg.num_requests:
            break
    return Workload(prompts, outputs)


# ---------------------------------------------------------------------- tokenmill runs


def make_core(loaded, cfg: EngineBenchConfig, max_num_seqs: int) -> EngineCore:
    sched = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=cfg.max_num_batched_tokens,
        max_model_len=cfg.max_prompt_tokens + cfg.max_output_tokens,
    )
    kwargs = {"decode_group_size": cfg.decode_group_size, "num_threads": cfg.threads}
    runner_kwargs = {**kwargs, **cfg.runner_kwargs}
    return build_real_core(loaded, sched, kv_cache_memory=cfg.kv_cache_memory, **runner_kwargs)


def closed_loop(core: EngineCore, work: Workload, concurrency: int) -> dict:
    """Keeps ``concurrency`` requests in flight; returns throughput and TTFT percentiles."""
    pending = deque(range(len(work.prompts)))
    started: dict[str, float] = {}
    ttft: list[float] = []
    num_out = 0
    t0 = time.perf_counter()
    while pending or core.has_unfinished_requests():
        while pending and len(started) < concurrency:
            i = pending.popleft()
            params = SamplingParams(temperature=0.0, max_tokens=work.outputs[i], ignore_eos=True)
            core.add_request(
                EngineRequest(request_id=str(i), prompt_token_ids=work.prompts[i], params=params)
            )
            started[str(i)] = time.perf_counter()
        for out in core.step():
            if out.num_output_tokens == len(out.new_token_ids) and out.new_token_ids:
                ttft.append(time.perf_counter() - started[out.request_id])
            num_out += len(out.new_token_ids)
            if out.finished:
                del started[out.request_id]
    elapsed = time.perf_counter() - t0
    return {
        "concurrency": concurrency,
        "num_requests": len(work.prompts),
        "output_tokens": num_out,
        "elapsed_s": round(elapsed, 2),
        "output_tok_s": round(num_out / elapsed, 2),
        "ttft_s": percentiles(ttft),
        "num_preemptions": core.scheduler.num_preemptions,
    }


def percentiles(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {}
    xs = sorted(xs)
    pick = lambda q: xs[min(len(xs) - 1, int(q * len(xs)))]  # noqa: E731
    return {
        "p50": round(pick(0.5), 4),
        "p90": round(pick(0.9), 4),
        "p99": round(pick(0.99), 4),
        "mean": round(statistics.fmean(xs), 4),
    }


def single_stream(core: EngineCore, prompt: list[int], num_out: int) -> dict:
    params = SamplingParams(temperature=0.0, max_tokens=num_out, ignore_eos=True)
    core.add_request(EngineRequest(request_id="single", prompt_token_ids=prompt, params=params))
    t0 = time.perf_counter()
    first = None
    n = 0
    while core.has_unfinished_requests():
        for out in core.step():
            n += len(out.new_token_ids)
            if first is None and out.new_token_ids:
                first = time.perf_counter()
    end = time.perf_counter()
    return {
        "prompt_tokens": len(prompt),
        "output_tokens": n,
        "ttft_s": round(first - t0, 4),
        "decode_tok_s": round((n - 1) / (end - first), 2),
    }


# ---------------------------------------------------------------------- orchestration


def run(cfg: EngineBenchConfig) -> dict:
    from tokenmill.bench import engine_hf
    from tokenmill.engine.loader import load_model, resolve_device

    if cfg.only_single:
        return run_single(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    result: dict = {"config": _jsonable(asdict(cfg)), "machine": machine_info(), "runs": {}}
    device = resolve_device(cfg.device)
    result["machine"]["device"] = _device_name(device)
    result["memory_bandwidth_gb_s"] = engine_hf.memory_bandwidth_gb_s(device=device)
    for dtype in cfg.dtypes:
        loaded = load_model(cfg.model, dtype=dtype, device=cfg.device)
        work = load_workload(cfg, loaded.tokenizer)
        run_ = {
            "workload": {
                "num_requests": len(work.prompts),
                "prompt_tokens": sum(map(len, work.prompts)),
                "output_tokens": sum(work.outputs),
            }
        }
        hf = engine_hf.load_hf(loaded) if cfg.baseline else None
        full = cfg.full_dtypes is None or dtype in cfg.full_dtypes
        run_.update(_measure(cfg, loaded, hf, work, full, result["memory_bandwidth_gb_s"]))
        result["runs"][dtype] = run_
        _write(cfg, result)  # after each dtype: a cut-short run keeps what it measured
        del loaded, hf
    return result


def run_single(cfg: EngineBenchConfig) -> dict:
    """Reruns only the single stream of each dtype and replaces those entries of ``cfg.out``
    (when it exists) in place: the throughput runs and the file's top-level config stay; each
    rerun dtype records when and under which load it ran in ``single_stream_rerun``."""
    from tokenmill.bench import engine_hf
    from tokenmill.engine.loader import load_model, resolve_device

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    exists = cfg.out is not None and cfg.out.exists()
    result = json.loads(cfg.out.read_text()) if exists else {"runs": {}}
    bandwidth = engine_hf.memory_bandwidth_gb_s(device=resolve_device(cfg.device))
    for dtype in cfg.dtypes:
        loaded = load_model(cfg.model, dtype=dtype, device=cfg.device)
        prompt = _single_prompt(load_workload(cfg, loaded.tokenizer), cfg.single_prompt_tokens)
        hf = engine_hf.load_hf(loaded) if cfg.baseline else None
        run_ = result["runs"].setdefault(dtype, {})
        _merge_single(run_, single_streams(cfg, loaded, hf, prompt, rounds=3))
        run_["decode_profile"] = engine_hf.profile_decode(
            make_core(loaded, cfg, 1), prompt, loaded, bandwidth
        )
        run_["single_stream_rerun"] = {
            "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": machine_info(),
            "memory_bandwidth_gb_s": bandwidth,
        }
        log.info("%s single stream: %s", dtype, run_["single_stream_runs"])
        _write(cfg, result)
        del loaded, hf
    return result


def _merge_single(run_: dict, single: dict) -> None:
    """Single-stream results into a dtype's entry, keeping its other transformers figures."""
    hf_single = single.pop("transformers", None)
    run_.update(single)
    if hf_single is not None:
        run_.setdefault("transformers", {}).update(hf_single)
        ratio = run_["single_stream"]["decode_tok_s"] / hf_single["single_stream"]["decode_tok_s"]
        run_.setdefault("ratios", {})["single_stream_decode_vs_transformers"] = round(ratio, 2)


def _write(cfg: EngineBenchConfig, result: dict) -> None:
    if cfg.out is not None:
        cfg.out.parent.mkdir(parents=True, exist_ok=True)
        cfg.out.write_text(json.dumps(result, indent=2) + "\n")


def _measure(cfg: EngineBenchConfig, loaded, hf, work: Workload, full: bool, bandwidth) -> dict:
    from tokenmill.bench import engine_hf

    name = str(loaded.dtype).removeprefix("torch.")
    run_: dict = {
        "decode_attention": engine_hf.attention_variants(
            loaded.config, loaded.dtype, device=loaded.device
        )
    }
    log.info("%s decode attention: %s", name, run_["decode_attention"])
    prompt = _single_prompt(work, cfg.single_prompt_tokens)
    run_.update(single_streams(cfg, loaded, hf, prompt))
    run_["decode_profile"] = engine_hf.profile_decode(
        make_core(loaded, cfg, 1), prompt, loaded, bandwidth
    )
    log.info("%s single stream: %s", name, run_["single_stream_runs"])
    run_["tokenmill"] = [
        closed_loop(make_core(loaded, cfg, cfg.concurrency), work, cfg.concurrency)
    ]
    log.info("%s tokenmill c=%d: %s", name, cfg.concurrency, run_["tokenmill"][0])
    sweep_work = work.take(cfg.sweep_requests or cfg.num_requests)
    for c in cfg.sweep if full else ():
        run_["tokenmill"].append(closed_loop(make_core(loaded, cfg, c), sweep_work, c))
        log.info("%s tokenmill c=%d: %s", name, c, run_["tokenmill"][-1])
    if hf is not None:
        if full:
            pad = loaded.tokenizer.eos_token_ids[0]
            static = engine_hf.hf_static_batches(hf, work, cfg.concurrency, pad)
            run_["transformers"]["static_batch"] = static
        run_["ratios"] = _ratios(run_)
        log.info("%s transformers: %s ratios %s", name, run_["transformers"], run_["ratios"])
    return run_


def single_streams(cfg: EngineBenchConfig, loaded, hf, prompt: list[int], rounds: int = 2):
    """tokenmill and transformers alternated ``rounds`` times (the machine is shared: both
    see the same load); the best round of each is the reported figure."""
    from tokenmill.bench import engine_hf

    n, pad = cfg.single_output_tokens, loaded.tokenizer.eos_token_ids[0]
    runs: dict[str, list] = {"tokenmill": [], "transformers": []}
    for _ in range(rounds):
        runs["tokenmill"].append(single_stream(make_core(loaded, cfg, 1), prompt, n))
        if hf is not None:
            runs["transformers"].append(engine_hf.hf_single_stream(hf, prompt, n, pad))
    best = lambda rs: max(rs, key=lambda r: r["decode_tok_s"])  # noqa: E731
    out = {"single_stream_runs": runs, "single_stream": best(runs["tokenmill"])}
    if hf is not None:
        out["transformers"] = {"single_stream": best(runs["transformers"])}
    return out


def _single_prompt(work: Workload, n: int) -> list[int]:
    longest = max(work.prompts, key=len)
    return (longest * (n // len(longest) + 1))[:n]


def _ratios(run_: dict) -> dict:
    tm, hf = run_["tokenmill"][0], run_["transformers"]
    single = run_["single_stream"]["decode_tok_s"] / hf["single_stream"]["decode_tok_s"]
    ratios = {"single_stream_decode_vs_transformers": round(single, 2)}
    if "static_batch" in hf:
        static = hf["static_batch"]["output_tok_s"]
        ratios["throughput_vs_transformers"] = round(tm["output_tok_s"] / static, 2)
    return ratios


def machine_info() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_avg_at_start": os.getloadavg(),
    }


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _jsonable(d: dict) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}
