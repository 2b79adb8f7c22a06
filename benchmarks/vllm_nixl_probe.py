"""Does vLLM's NixlConnector move KV between two vLLM-cpu engines on this machine?

Two ``AsyncLLM`` engines in one process (each spawns its own engine process), both with
``NixlConnector`` (``kv_role=kv_both``, ``kv_buffer_device=cpu``), different NIXL side-channel
ports. The prefill engine runs a prompt with ``do_remote_decode`` (max_tokens 1) and returns
``kv_transfer_params``; the decode engine gets the prompt with those params
(``do_remote_prefill``), reads the prompt's KV blocks over NIXL and decodes. Checks: the
decode engine reports the prompt's full blocks as cached (not recomputed) and its greedy
tokens equal a local run's. Run with vLLM's venv python (``nixl`` and ``nixl-cu12``
installed there with ``--no-deps``); prints one JSON line.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import traceback

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def build(model: str, side_port: int):
    from vllm.config import KVTransferConfig
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    os.environ["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(side_port)
    args = AsyncEngineArgs(
        model=model,
        dtype="bfloat16",
        block_size=32,
        max_model_len=2048,
        enable_prefix_caching=True,
        kv_transfer_config=KVTransferConfig(
            kv_connector="NixlConnector", kv_role="kv_both", kv_buffer_device="cpu"
        ),
    )
    return AsyncLLM.from_engine_args(args)


async def run(llm, prompt, rid, max_tokens, kv_params=None):
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(
        temperature=0,
        max_tokens=max_tokens,
        detokenize=False,
        extra_args=None,
        ignore_eos=True,
    )
    if kv_params is not None:
        params.extra_args = {"kv_transfer_params": kv_params}
    last = None
    async for out in llm.generate(TokensPrompt(prompt_token_ids=prompt), params, rid):
        last = out
    return last


async def main(model: str) -> dict:
    result: dict = {"model": model}
    t = time.monotonic()
    prefill = build(model, 5600)
    decode = build(model, 5601)
    result["startup_s"] = time.monotonic() - t
    prompt = [100 + (i * 7) % 4000 for i in range(200)]
    local = await run(decode, prompt, "local", 8)
    result["local_tokens"] = list(local.outputs[0].token_ids)
    first = await run(prefill, [p + 1 for p in prompt], "p1", 1, {"do_remote_decode": True})
    result["kv_transfer_params"] = first.kv_transfer_params
    out = await run(decode, [p + 1 for p in prompt], "d1", 8, first.kv_transfer_params)
    result["remote_num_cached_tokens"] = out.num_cached_tokens
    ref = await run(prefill, [p + 1 for p in prompt], "ref", 8)
    result["remote_tokens"] = list(out.outputs[0].token_ids)
    result["reference_tokens"] = list(ref.outputs[0].token_ids)
    result["tokens_match"] = result["remote_tokens"] == result["reference_tokens"]
    prefill.shutdown()
    decode.shutdown()
    return result


if __name__ == "__main__":
    try:
        print(json.dumps(asyncio.run(main(sys.argv[1]))), flush=True)
    except Exception as e:
        print(json.dumps({"error": repr(e), "trace": traceback.format_exc()[-3000:]}), flush=True)
        raise
