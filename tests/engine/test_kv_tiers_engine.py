"""The KV tiers in the real engine (tiny fp32 model, a device pool far smaller than the
conversations): evicted blocks go to host / disk / a real Redis and come back on the next
turn; greedy text is identical to the engine without tiers; a corrupted disk block is a miss
and a recompute, never wrong text; a restarted engine reuses the disk blocks it finds."""

from __future__ import annotations

import os
import threading

import pytest
import torch
from helpers.tiny_models import TEST_DEVICE

from tokenmill.core.events import Tier
from tokenmill.core.request import EngineRequest
from tokenmill.core.sampling import SamplingParams
from tokenmill.engine.builder import build_real_core
from tokenmill.engine.config import CacheConfig, SchedulerConfig
from tokenmill.engine.kv_tiers import GIB, TierSettings, build_tiers, layout_of
from tokenmill.engine.loader import load_model
from tokenmill.kvstore.disk import FILE_NAME
from tokenmill.kvstore.record import HEADER_BYTES

B, NUM_BLOCKS = 4, 24
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    torch.set_num_threads(1)
    return load_model(tiny_model_dir("smollm2"), dtype="fp32", device=TEST_DEVICE)


def make_core(loaded, settings: TierSettings | None):
    tiers = None if settings is None else build_tiers(settings, layout_of(loaded, B), "tiny")
    sides = (
        {} if tiers is None else {"connector": tiers.connector, "worker_connector": tiers.worker}
    )
    config = SchedulerConfig(max_model_len=256, max_num_seqs=2)
    core = build_real_core(loaded, config, cache=CacheConfig(B, NUM_BLOCKS), **sides)
    if tiers is not None:
        tiers.attach(core)
    return core, tiers


def conversations(num_users=3, turns=3, start=5) -> list[list[int]]:
    """Turn t of user u: its previous prompt plus 12 new tokens; users interleave, so each
    user's history is evicted from the 96-token pool by the others before its next turn."""
    prompts, history = [], {u: [] for u in range(num_users)}
    for t in range(turns):
        for u in range(num_users):
            history[u] = history[u] + [
                start + (u * 97 + t * 31 + i) % 250 for i in range(12 + 8 * (t == 0))
            ]
            prompts.append(list(history[u]))
    return prompts


def run(core, prompts) -> list[list[int]]:
    out = []
    for i, prompt in enumerate(prompts):
        core.add_request(EngineRequest(request_id=f"r{i}", prompt_token_ids=prompt, params=GREEDY))
        tokens: list[int] = []
        while core.has_unfinished_requests() or core.has_pending_transfers():
            for o in core.step():
                tokens += o.new_token_ids
        out.append(tokens)
    core.check_integrity()
    assert core.scheduler.kv.num_used_blocks == 0
    return out


@pytest.fixture(scope="module")
def baseline(loaded):
    core, _ = make_core(loaded, None)
    return run(core, conversations())


def onboarded(tiers) -> int:
    return tiers.connector.num_onboarded_blocks


def test_host_tier_onboards_evicted_history_and_text_is_identical(loaded, baseline):
    core, tiers = make_core(
        loaded, TierSettings(host_bytes=64 * layout_of(loaded, B).bytes_per_block)
    )
    assert run(core, conversations()) == baseline
    assert onboarded(tiers) > 0
    stats = tiers.stats()["host"]
    assert stats["hits"] == onboarded(tiers) and stats["onboarded_bytes"] > 0
    tiers.connector.check_integrity()


def test_disk_only_loads_asynchronously_and_text_is_identical(loaded, baseline, tmp_path):
    core, tiers = make_core(
        loaded, TierSettings(host_bytes=0, disk_dir=str(tmp_path), disk_bytes=GIB // 64)
    )
    assert run(core, conversations()) == baseline
    assert onboarded(tiers) > 0 and tiers.stats()["disk"]["onboarded_bytes"] > 0
    assert core.scheduler.num_kv_load_failures == 0
    tiers.io.close()


def test_small_host_demotes_to_disk_then_onboards_from_both(loaded, baseline, tmp_path):
    block = layout_of(loaded, B).bytes_per_block
    core, tiers = make_core(
        loaded, TierSettings(host_bytes=8 * block, disk_dir=str(tmp_path), disk_bytes=GIB // 64)
    )
    assert run(core, conversations()) == baseline
    stats = tiers.stats()
    assert stats["host"]["evicted"] > 0 and stats["disk"]["stored"] > 0
    assert stats["disk"]["hits"] > 0 and stats["host"]["hits"] > 0
    tiers.connector.check_integrity()
    tiers.io.close()


def test_corrupted_disk_blocks_are_recomputed_and_a_restart_reuses_the_rest(
    loaded, baseline, tmp_path
):
    settings = TierSettings(host_bytes=0, disk_dir=str(tmp_path), disk_bytes=GIB // 64)
    core, tiers = make_core(loaded, settings)
    prompts = conversations()
    assert run(core, prompts) == baseline
    tiers.io.close()
    store = tiers.io.stores[Tier.DISK]
    size = os.path.getsize(tmp_path / FILE_NAME)
    with open(tmp_path / FILE_NAME, "r+b") as f:  # flip a payload byte in every other slot
        for slot in range(0, size // store.slot_bytes, 2):
            f.seek(slot * store.slot_bytes + HEADER_BYTES + 3)
            b = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([b[0] ^ 0x55]))
    again, tiers2 = make_core(loaded, settings)
    assert tiers2.connector.placement.num_used_blocks(Tier.DISK) > 0  # adopted at start
    assert run(again, prompts) == baseline  # the same text: bad blocks recomputed
    assert onboarded(tiers2) > 0 and again.scheduler.num_kv_load_failures > 0
    assert tiers2.stats()["disk"]["invalid"] > 0
    tiers2.io.close()


def test_remote_redis_tier_onboards_and_text_is_identical(loaded, baseline, redis_server):
    core, tiers = make_core(loaded, TierSettings(host_bytes=0, remote=redis_server.url))
    assert run(core, conversations()) == baseline
    assert onboarded(tiers) > 0 and tiers.stats()["remote"]["onboarded_bytes"] > 0
    tiers.io.close()


def test_unreachable_remote_skips_offload_and_serving_goes_on(loaded, baseline, redis_server):
    core, tiers = make_core(loaded, TierSettings(host_bytes=0, remote=redis_server.url))
    redis_server.stop()
    assert run(core, conversations()) == baseline
    stats = tiers.stats()["remote"]
    assert stats["unavailable"] == 1 and onboarded(tiers) == 0
    tiers.io.close()


def test_abort_while_loading_holds_the_blocks_until_the_load_ends(loaded, tmp_path):
    core, tiers = make_core(
        loaded, TierSettings(host_bytes=0, disk_dir=str(tmp_path), disk_bytes=GIB // 64)
    )
    prompts = conversations()
    run(core, prompts[:6])
    gate = threading.Event()
    tiers.io.stores[Tier.DISK]._pool.submit(gate.wait)  # the disk thread stalls: reads queue up
    core.add_request(EngineRequest(request_id="late", prompt_token_ids=prompts[6], params=GREEDY))
    core.step()
    assert core.scheduler.num_waiting_for_remote_kv == 1  # parked while its history loads
    core.abort_requests(["late"])
    core.step()
    held = core.scheduler.kv.num_used_blocks
    assert held > 0 and core.has_pending_transfers()  # bytes may still land: blocks held
    gate.set()
    while core.has_pending_transfers():
        core.step()
    core.check_integrity()
    assert core.scheduler.kv.num_used_blocks == 0 and not core.has_unfinished_requests()
    assert tiers.connector.placement.bytes_in_flight == 0
    tiers.io.close()
