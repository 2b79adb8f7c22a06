"""The vLLM backend's pure parts, without vLLM: sampling-parameter mapping, KV event
translation (from payloads in vLLM 0.32's wire format), load stats, tokenizer agreement."""

from __future__ import annotations

from types import SimpleNamespace

import msgspec
import pytest

from tokenmill.core.block_hash import block_hash_pairs
from tokenmill.core.errors import InvalidRequestError, ModelLoadError
from tokenmill.core.events import Cleared, Removed, Stored, StoredBlock
from tokenmill.core.sampling import SamplingParams
from tokenmill.vllm_backend import sampling
from tokenmill.vllm_backend.agreement import check_agreement
from tokenmill.vllm_backend.kv_events import KvEventTranslator, decode_batch
from tokenmill.vllm_backend.stats import VllmStats

BS = 4


def payload(*events: dict) -> bytes:
    """A KV event batch as vLLM's ZmqEventPublisher encodes it: [ts, events, dp_rank]."""
    return msgspec.msgpack.encode([1.5, list(events), 0])


def stored(hashes, parent, tokens, *, block_size=BS, extra_keys=None, medium="GPU", **more):
    return {
        "type": "BlockStored",
        "block_hashes": hashes,
        "parent_block_hash": parent,
        "token_ids": tokens,
        "block_size": block_size,
        "lora_id": None,
        "medium": medium,
        "lora_name": None,
        "extra_keys": extra_keys if extra_keys is not None else [None] * len(hashes),
        "group_idx": 0,
        "kv_cache_spec_kind": "full_attention",
        **more,
    }


def translate(translator, *events):
    return translator.translate(decode_batch(payload(*events)))


# ------------------------------------------------------------------ sampling


def test_every_sampling_field_has_a_fate():
    fields = set(SamplingParams.__struct_fields__)
    assert fields == sampling.MAPPED | sampling.ABOVE_ENGINE | sampling.REFUSED


def test_structured_output_is_refused_naming_the_field():
    from tokenmill.core.errors import InvalidRequestError
    from tokenmill.core.sampling import StructuredOutput

    params = SamplingParams(structured=StructuredOutput(json_object=True))
    with pytest.raises(InvalidRequestError) as err:
        sampling.vllm_sampling_kwargs(params, 16)
    assert err.value.param == "structured"


def test_sampling_mapping_values():
    params = SamplingParams(
        max_tokens=None,
        temperature=0.7,
        top_k=5,
        seed=-1,
        stop=("x",),
        stop_token_ids=(7, 9),
        logprobs=3,
        logit_bias={4: 1.5},
    )
    kwargs = sampling.vllm_sampling_kwargs(params, max_tokens=100)
    assert kwargs["max_tokens"] == 100
    assert kwargs["seed"] == 2**64 - 1  # vLLM reads -1 as "no seed"; torch reads it so
    assert kwargs["stop_token_ids"] == [7, 9] and kwargs["logit_bias"] == {4: 1.5}
    assert kwargs["temperature"] == 0.7 and kwargs["top_k"] == 5 and kwargs["logprobs"] == 3
    assert "stop" not in kwargs  # the frontend cuts stop strings


def test_sampling_refuses_n_and_unmapped_fields(monkeypatch):
    with pytest.raises(InvalidRequestError) as e:
        sampling.vllm_sampling_kwargs(SamplingParams(n=2), 16)
    assert e.value.param == "n"
    monkeypatch.setattr(sampling, "MAPPED", sampling.MAPPED - {"min_p"})
    sampling.vllm_sampling_kwargs(SamplingParams(), 16)  # at its default: nothing to drop
    with pytest.raises(InvalidRequestError, match="min_p is not supported") as e:
        sampling.vllm_sampling_kwargs(SamplingParams(min_p=0.1), 16)
    assert e.value.param == "min_p"


# ------------------------------------------------------------------ KV events


def test_stored_blocks_get_our_hashes_chained_across_events():
    t = KvEventTranslator(BS)
    tokens = list(range(10, 22))  # three blocks
    (first,) = translate(t, stored([b"a", b"b"], None, tokens[:8]))
    (second,) = translate(t, stored([b"c"], b"b", tokens[8:12]))
    pairs = block_hash_pairs(tokens, BS)
    assert first == Stored(None, [StoredBlock(h, lh) for h, lh in pairs[:2]])
    assert second == Stored(pairs[1][0], [StoredBlock(*pairs[2])])


def test_removed_and_cleared():
    t = KvEventTranslator(BS)
    translate(t, stored([11, 12], None, list(range(8))))
    ours = [h for h, _ in block_hash_pairs(list(range(8)), BS)]
    assert translate(t, {"type": "BlockRemoved", "block_hashes": [12, 99], "medium": "GPU"}) == [
        Removed([ours[1]])
    ]
    assert translate(t, {"type": "BlockRemoved", "block_hashes": [99], "medium": "GPU"}) == []
    assert translate(t, {"type": "AllBlocksCleared"}) == [Cleared()]
    assert t.blocks == {}


def test_cache_salt_seeds_the_whole_chain():
    t = KvEventTranslator(BS)
    tokens = list(range(8))
    (a,) = translate(t, stored([1], None, tokens[:4], extra_keys=[["tenant"]]))
    (b,) = translate(t, stored([2], 1, tokens[4:8]))
    salted = block_hash_pairs(tokens, BS, salt="tenant")
    assert a.blocks[0] == StoredBlock(*salted[0]) and b.blocks[0] == StoredBlock(*salted[1])
    assert salted != block_hash_pairs(tokens, BS)


@pytest.mark.parametrize(
    "event",
    [
        stored([1], None, list(range(8)), block_size=8),  # another block size
        stored([1], 77, list(range(4))),  # the parent's event was lost
        stored([1], None, list(range(4)), extra_keys=[[["mm", "h", 0]]]),  # multimodal
        stored([1], None, list(range(4)), lora_name="adapter"),
    ],
)
def test_unroutable_blocks_are_skipped_and_counted(event):
    t = KvEventTranslator(BS)
    assert translate(t, event) == []
    assert t.num_skipped_blocks == 1 and t.blocks == {}


def test_other_mediums_are_ignored():
    t = KvEventTranslator(BS)
    assert translate(t, stored([1], None, list(range(4)), medium="CPU")) == []


def test_decode_rejects_garbage():
    with pytest.raises(msgspec.DecodeError):
        decode_batch(b"not msgpack")


# ------------------------------------------------------------------ stats


def test_stats_from_scheduler_reports():
    now = [0.0]
    stats = VllmStats(num_total_blocks=100, clock=lambda: now[0])
    prefix = SimpleNamespace(queries=100, hits=40)
    report = SimpleNamespace(
        num_running_reqs=2, num_waiting_reqs=3, kv_cache_usage=0.25, prefix_cache_stats=prefix
    )
    for t in (0.0, 0.05, 0.10):
        now[0] = t
        stats.record(report, SimpleNamespace(num_preempted_reqs=1))
    snap = stats.snapshot()
    assert snap["num_running_requests"] == 2 and snap["num_waiting_requests"] == 3
    assert snap["kv_usage"] == 0.25 and snap["num_total_blocks"] == 100
    assert snap["prefix_hit_rate"] == pytest.approx(0.4)
    assert snap["step_time_ms"] == pytest.approx(50.0)
    assert snap["num_preemptions"] == 3


# ------------------------------------------------------------------ agreement


class FakeHf:
    """vLLM's tokenizer as the check sees it, over our own tokenizer (so it agrees)."""

    def __init__(self, ours, shift_chat=False, eos=None):
        self.ours, self.shift_chat = ours, shift_chat

    def __len__(self):
        return self.ours.vocab_size

    def encode(self, text, add_special_tokens=False):
        return self.ours.encode(text)

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        text = self.ours.apply_chat_template(messages, add_generation_prompt)
        return text + " " if self.shift_chat else text


@pytest.fixture(scope="module")
def ours(tiny_model_factory):
    from tokenmill.engine.tokenizer import Tokenizer

    return Tokenizer.from_hf_dir(tiny_model_factory("llama3"))


def test_agreement_passes_and_refuses(ours):
    eos = set(ours.eos_token_ids)
    check_agreement(ours, FakeHf(ours), eos, "m")
    with pytest.raises(ModelLoadError, match="end-of-sequence ids disagree"):
        check_agreement(ours, FakeHf(ours), eos | {12345}, "m")
    if ours.chat_template is not None:
        with pytest.raises(ModelLoadError, match="chat prompts"):
            check_agreement(ours, FakeHf(ours, shift_chat=True), eos, "m")


# ------------------------------------------------------------------ flags


def test_vllm_args_flag_round_trips_through_worker_argv():
    from tokenmill.launch.cli import build_parser
    from tokenmill.launch.specs import VLLM_DEFAULTS, EngineSpec

    argv = ["worker", "--nats", "nats://x", "--engine", "vllm"]
    argv += ["--vllm-args", "--enforce-eager --swap-space '1'"]
    spec = EngineSpec.from_args(build_parser().parse_args(argv))
    assert spec.vllm_args == ("--enforce-eager", "--swap-space", "1")
    assert spec.settings == VLLM_DEFAULTS and spec.settings.block_size == 32
    again = build_parser().parse_args(["worker", "--nats", "nats://x", *spec.argv()])
    assert EngineSpec.from_args(again) == spec


def test_engine_vllm_without_vllm_is_a_clear_error(monkeypatch):
    import builtins

    from tokenmill.launch.engines import build_engine
    from tokenmill.launch.specs import VLLM_DEFAULTS, EngineSpec

    real_import = builtins.__import__

    def no_vllm(name, *args, **kwargs):
        if name == "vllm" or name.startswith("vllm."):
            raise ImportError("No module named 'vllm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_vllm)
    with pytest.raises(ModelLoadError, match=r"pip install 'tokenmill\[vllm\]'"):
        build_engine(EngineSpec(kind="vllm", settings=VLLM_DEFAULTS))
