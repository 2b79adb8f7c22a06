"""The baselines and measurements behind ``tokenmill bench engine`` (see ``engine.py``):
transformers ``generate`` (static batches, single stream), memory bandwidth, and a profile
of one tokenmill decode step against its roofline. transformers is imported only here.

Everything runs on the device of the ``LoadedModel`` (the CPU or CUDA); on CUDA every timer
is read after ``torch.cuda.synchronize`` so queued kernels are counted. The decode profile
records host (CPU) time per op: on CUDA that is launch and Python overhead, not kernel time."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from tokenmill.core.request import EngineRequest
from tokenmill.core.sampling import SamplingParams


def sync(device: torch.device) -> None:
    """Waits for queued work on ``device`` (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_bandwidth_gb_s(
    num_bytes: int = 256 << 20, repeats: int = 5, device: torch.device | str = "cpu"
) -> dict:
    """Best of ``repeats``: read (``sum``) and copy (read + write) bandwidth of a buffer far
    larger than the caches, on ``device``."""
    device = torch.device(device)
    src = torch.ones(num_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    read = copy = float("inf")
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        src.sum()
        sync(device)
        read = min(read, time.perf_counter() - t)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        copy = min(copy, time.perf_counter() - t)
    return {"read": round(num_bytes / read / 1e9, 2), "copy": round(2 * num_bytes / copy / 1e9, 2)}


def profile_decode(core, prompt: list[int], loaded, bandwidth: dict, steps: int = 12) -> dict:
    """Prefill ``prompt``, then profile ``steps`` decode steps of one stream."""
    params = SamplingParams(temperature=0.0, max_tokens=steps + 8, ignore_eos=True)
    core.add_request(EngineRequest(request_id="prof", prompt_token_ids=prompt, params=params))
    for _ in range(4):
        core.step()  # prefill (maybe chunked) and a few warm decode steps
    execute = core.executor.execute
    spent = {"execute": 0.0}

    def timed(sched):
        t = time.perf_counter()
        try:
            return execute(sched)
        finally:
            spent["execute"] += time.perf_counter() - t

    core.executor.execute = timed
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            core.step()
    total = time.perf_counter() - t0
    core.executor.execute = execute
    core.abort_requests(["prof"])
    return {
        "steps": steps,
        "step_ms": round(1000 * total / steps, 2),
        "execute_fraction": round(spent["execute"] / total, 3),
        "top_ops": _top_ops(prof, steps),
        "roofline": _roofline(loaded, len(prompt) + 8, bandwidth, total / steps),
    }


def _top_ops(prof, steps: int, n: int = 12) -> list[dict]:
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return [
        {
            "op": e.key,
            "calls_per_step": e.count // steps,
            "self_ms_per_step": round(e.self_cpu_time_total / 1000 / steps, 3),
            "fraction": round(e.self_cpu_time_total / total, 3),
        }
        for e in events[:n]
    ]


def _roofline(loaded, context: int, bandwidth: dict, step_s: float) -> dict:
    """Bytes one decode step must read: every weight once (the embedding table as lm_head;
    its row gather is negligible) plus the sequence's K/V; at the measured read bandwidth."""
    weight_bytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    kv_bytes = context * loaded.config.kv_bytes_per_token * loaded.dtype.itemsize
    bytes_per_step = weight_bytes + kv_bytes
    floor_s = bytes_per_step / (bandwidth["read"] * 1e9)
    return {
        "weight_bytes": weight_bytes,
        "kv_bytes": kv_bytes,
        "roofline_step_ms": round(1000 * floor_s, 2),
        "roofline_tok_s": round(1 / floor_s, 1),
        "measured_step_ms": round(1000 * step_s, 2),
        "fraction_of_roofline": round(floor_s / step_s, 3),
    }


# ---------------------------------------------------------------------- transformers


def load_hf(loaded):
    from transformers import AutoModelForCausalLM

    path = Path(loaded.path)
    if path.is_dir():
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=loaded.dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=loaded.dtype
        )
    return model.to(loaded.device).eval()


@torch.inference_mode()
def _generate(hf, prompts: list[list[int]], num_new: int, pad: int) -> float:
    width, device = max(map(len, prompts)), hf.device
    rows = [[pad] * (width - len(p)) + p for p in prompts]
    ids = torch.tensor(rows, device=device)  # [B, W] left-padded
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    sync(device)
    t = time.perf_counter()
    out = hf.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=num_new,
        min_new_tokens=num_new,
        do_sample=False,
        pad_token_id=pad,
    )
    sync(device)
    elapsed = time.perf_counter() - t
    assert out.shape[1] == width + num_new, "transformers stopped early"
    return elapsed


def hf_single_stream(hf, prompt: list[int], num_out: int, pad: int) -> dict:
    first = _generate(hf, [prompt], 1, pad)
    total = _generate(hf, [prompt], num_out, pad)
    return {
        "prompt_tokens": len(prompt),
        "output_tokens": num_out,
        "ttft_s": round(first, 4),
        "decode_tok_s": round((num_out - 1) / (total - first), 2),
    }


def hf_static_batches(hf, work, batch_size: int, pad: int) -> dict:
    """Arrival-order batches; only each request's own output tokens count."""
    elapsed, useful = 0.0, 0
    for b in range(0, len(work.prompts), batch_size):
        outs = work.outputs[b : b + batch_size]
        elapsed += _generate(hf, work.prompts[b : b + batch_size], max(outs), pad)
        useful += sum(outs)
    return {
        "batch_size": batch_size,
        "num_requests": len(work.prompts),
        "output_tokens": useful,
        "elapsed_s": round(elapsed, 2),
        "output_tok_s": round(useful / elapsed, 2),
    }


def attention_variants(
    config,
    dtype: torch.dtype,
    batch: int = 32,
    repeats: int = 10,
    device: torch.device | str = "cpu",
) -> dict:
    """Decode attention of one layer at the model's shape, ``batch`` sequences with contexts
    spread over 128..640 tokens: per-sequence SDPA vs padded groups of 4, 8 and all rows, on
    ``device``. Best of ``repeats``, in ms per layer."""
    from tokenmill.engine.executor.paged_attention import PagedAttention

    g = torch.Generator().manual_seed(0)
    lens = torch.randint(128, 640, (batch,), generator=g).tolist()
    per_seq = 640 // 16
    seqs = [(n - 1, 1, list(range(i * per_seq, (i + 1) * per_seq))) for i, n in enumerate(lens)]
    hq, hkv, d = config.num_heads, config.num_kv_heads, config.head_dim
    device = torch.device(device)
    q = torch.randn(batch, hq, d, generator=g).to(device, dtype)  # [B, Hq, D]
    k = torch.randn(batch, hkv, d, generator=g).to(device, dtype)  # [B, Hkv, D]
    results = {}
    for name, kwargs in {
        "per_sequence": {"batched_decode": False},
        "group_4": {"decode_group_size": 4},
        "group_8": {"decode_group_size": 8},
        f"group_{batch}": {"decode_group_size": batch},
    }.items():
        attn = PagedAttention(1, batch * per_seq, 16, hkv, d, dtype, device, **kwargs)
        attn.prepare(seqs)
        best = float("inf")
        for _ in range(repeats):
            sync(device)
            t = time.perf_counter()
            attn(0, q, k, k)
            sync(device)
            best = min(best, time.perf_counter() - t)
        results[name] = round(1000 * best, 3)
    return {"batch": batch, "mean_context": round(sum(lens) / batch, 1), "ms_per_layer": results}
