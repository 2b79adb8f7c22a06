"""Disaggregated prefill/decode at the engine level, with real KV tensors moved by NIXL
(two agents in this process, UCX): the decode engine's greedy tokens equal an aggregated
engine's; only blocks past the decode side's own prefix hit move; blocks changed on the
prefill side are caught by the checksum and recomputed; an unreachable prefill worker means
a local recompute; holds end on the READ, on release, on timeout; nothing leaks."""

from __future__ import annotations

import pytest

pytest.importorskip("nixl._api")

from tokenmill.core.kv_transfer import KvTransferParams  # noqa: E402
from tokenmill.core.request import EngineRequest, FinishReason  # noqa: E402
from tokenmill.core.sampling import SamplingParams  # noqa: E402
from tokenmill.engine.builder import build_pd_connectors, build_real_core, kv_layout  # noqa: E402
from tokenmill.engine.config import CacheConfig, SchedulerConfig  # noqa: E402
from tokenmill.engine.loader import load_model  # noqa: E402
from tokenmill.frontend.migration import continuation  # noqa: E402

B = 16
PROMPT = [(7 * i + 3) % 200 + 5 for i in range(75)]  # 75 tokens: 4 full blocks + 11


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(tiny_model_dir("llama3"), dtype="fp32", device="cpu")


def core_for(loaded, role: str = "both", clock=None, timeout_s: float = 30.0):
    layout = kv_layout(loaded.config, "float32", B)
    connectors = {}
    if role != "both":
        kwargs = {"clock": clock} if clock is not None else {}
        sched, worker = build_pd_connectors(layout, timeout_s, f"test-{role}-{id(clock)}", **kwargs)
        connectors = {"connector": sched, "worker_connector": worker}
    return build_real_core(
        loaded, SchedulerConfig(), cache=CacheConfig(B, 64), decode=False, **connectors
    )


def request(rid: str, prompt: list[int], max_tokens: int = 8, params=None) -> EngineRequest:
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return EngineRequest(
        request_id=rid, prompt_token_ids=prompt, params=sampling, kv_transfer_params=params
    )


def run(core, *others, limit: int = 20_000) -> list:
    """Steps ``core`` (and ``others``, so their NIXL notices are read) until it is idle."""
    outputs = []
    for _ in range(limit):
        if not (core.has_unfinished_requests() or core.has_pending_transfers()):
            return outputs
        outputs.extend(core.step())
        for other in others:
            other.step()
    raise AssertionError("engine did not finish")


def tokens(outputs) -> list[int]:
    return [t for o in outputs for t in o.new_token_ids]


def prefill(core, rid: str, prompt: list[int]):
    core.add_request(request(rid, prompt, 1, KvTransferParams(do_remote_decode=True)))
    outs = []
    while not (outs and outs[-1].finished):
        outs.extend(core.step())
    assert outs[-1].finish_reason is FinishReason.LENGTH
    return outs[-1]


def decode_leg(first, prompt: list[int], max_tokens: int, params=None) -> EngineRequest:
    original = request(first.request_id, prompt, max_tokens)
    leg = continuation(original, first.new_token_ids)
    transfer = params if params is not None else first.kv_transfer_params.for_decode()
    return EngineRequest(
        request_id=leg.request_id,
        prompt_token_ids=leg.prompt_token_ids,
        params=leg.params,
        kv_transfer_params=transfer,
    )


def check_clean(*cores) -> None:
    for core in cores:
        core.check_integrity()
        assert core.scheduler.kv.num_used_blocks == 0
        assert core.scheduler.kv.num_held_blocks == 0


@pytest.fixture(scope="module")
def cores(loaded):
    agg, p, d = core_for(loaded), core_for(loaded, "prefill"), core_for(loaded, "decode")
    yield agg, p, d
    for core in (agg, p, d):
        core.shutdown()


def test_greedy_tokens_equal_aggregated_and_nothing_leaks(cores):
    agg, p, d = cores
    agg.add_request(request("x", PROMPT, 10))
    expected = tokens(run(agg))
    first = prefill(p, "x", PROMPT)
    params = first.kv_transfer_params
    assert params.remote_engine_id and len(params.remote_block_ids) == 5
    assert len(params.block_hashes) == 4 and len(params.checksums) == 5
    assert p.scheduler.kv.num_held_blocks == 5
    d.add_request(decode_leg(first, PROMPT, 10))
    outs = run(d, p)
    assert first.new_token_ids + tokens(outs) == expected
    report = next(o.kv_transfer for o in outs if o.kv_transfer is not None)
    assert report.num_blocks == 5 and report.num_bytes > 0
    run(p)  # the READ's notice released the hold
    check_clean(agg, p, d)


def test_only_blocks_past_the_decode_prefix_hit_move(cores):
    agg, p, d = cores
    prompt = [t + 5 for t in PROMPT]
    d.add_request(request("warm", prompt[:48] + [9] * 20, 1))  # decode caches 3 blocks
    run(d)
    agg.add_request(request("y", prompt, 6))
    expected = tokens(run(agg))
    first = prefill(p, "y", prompt)
    d.add_request(decode_leg(first, prompt, 6))
    outs = run(d, p)
    assert first.new_token_ids + tokens(outs) == expected
    report = next(o.kv_transfer for o in outs if o.kv_transfer is not None)
    assert report.num_blocks == 2  # blocks 3 and 4 only
    run(p)
    check_clean(p, d)


def test_changed_blocks_are_detected_and_recomputed(cores):
    agg, p, d = cores
    prompt = [t + 1 for t in PROMPT]
    agg.add_request(request("z", prompt, 6))
    expected = tokens(run(agg))
    first = prefill(p, "z", prompt)
    block = first.kv_transfer_params.remote_block_ids[2]
    p.executor.attn.k_cache[0][block].add_(1.0)  # the sender's block changed under the hold
    failures = d.scheduler.num_kv_load_failures
    d.add_request(decode_leg(first, prompt, 6))
    outs = run(d, p)
    assert first.new_token_ids + tokens(outs) == expected  # recomputed locally
    assert d.scheduler.num_kv_load_failures == failures + 1
    run(p)
    check_clean(p, d)


def test_unreachable_prefill_worker_means_a_local_recompute(cores):
    agg, p, d = cores
    prompt = [t + 2 for t in PROMPT]
    agg.add_request(request("u", prompt, 5))
    expected = tokens(run(agg))
    first = prefill(p, "u", prompt)
    params = first.kv_transfer_params.for_decode()
    gone = KvTransferParams(
        do_remote_prefill=True,
        remote_engine_id="gone",
        remote_agent_metadata=b"not an agent",
        remote_request_id="u",
        remote_block_ids=params.remote_block_ids,
        block_hashes=params.block_hashes,
        num_tokens=params.num_tokens,
        checksums=params.checksums,
        layout=params.layout,
    )
    d.add_request(decode_leg(first, prompt, 5, gone))
    assert first.new_token_ids + tokens(run(d)) == expected
    p.release_transfers(["u"])  # as the frontend does when the decode leg fails
    run(p)
    check_clean(p, d)


def test_hold_times_out_and_release_frees_at_once(loaded):
    clock = FakeClock()
    p = core_for(loaded, "prefill", clock, timeout_s=5.0)
    try:
        prefill(p, "t1", PROMPT)
        prefill(p, "t2", [t + 3 for t in PROMPT])
        assert p.scheduler.kv.num_held_blocks == 10 and p.has_pending_transfers()
        p.release_transfers(["t2"])  # a decode worker rejected it: freed at the next step
        p.step()
        assert p.scheduler.kv.num_held_blocks == 5
        clock.now = 4.9
        p.step()
        assert p.scheduler.kv.num_held_blocks == 5
        clock.now = 5.0
        p.step()
        check_clean(p)
        assert p.scheduler.connector.num_hold_timeouts == 1
    finally:
        p.shutdown()


def test_layout_mismatch_is_not_loaded(cores):
    _, p, d = cores
    first = prefill(p, "m", PROMPT)
    params = first.kv_transfer_params.for_decode()
    other = type(params.layout)(
        dtype="bfloat16", block_size=B, num_layers=1, num_kv_heads=1, head_dim=8
    )
    import msgspec

    d.add_request(decode_leg(first, PROMPT, 3, msgspec.structs.replace(params, layout=other)))
    run(d, p)  # computed locally; the abandon notice releases the prefill side's hold
    run(p, d)
    check_clean(p, d)
