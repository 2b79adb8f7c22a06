"""The disaggregation connector's scheduler side with plain data and a fake clock: what a
prefill worker holds and says, the lease, release, and a decode worker's checks (layout,
block hashes) with abandon notices for what it will not read."""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from tokenmill.core.block_hash import block_hashes
from tokenmill.core.kv_transfer import KvLayout, KvTransferParams
from tokenmill.core.request import FinishReason
from tokenmill.kv.pd_connector import PdSchedulerConnector

LAYOUT = KvLayout(dtype="bfloat16", block_size=4, num_layers=2, num_kv_heads=1, head_dim=8)
PROMPT = list(range(10, 21))  # 11 tokens: 2 full blocks + 3


@dataclass
class Req:
    request_id: str
    all_tokens: list[int]
    kv_transfer_params: KvTransferParams | None = None
    finish_reason: FinishReason | None = None
    num_computed_tokens: int = 0
    block_hashes: list[int] = field(default_factory=list)
    local_hashes: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.block_hashes = block_hashes(self.all_tokens, 4)
        self.num_prompt_tokens = len(self.all_tokens)

    @property
    def num_tokens(self) -> int:
        return len(self.all_tokens)


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


def prefill_params(connector, rid="r") -> KvTransferParams:
    request = Req(rid, PROMPT, KvTransferParams(do_remote_decode=True), FinishReason.LENGTH)
    assert connector.request_finished(request, [7, 8, 9])
    params = connector.transfer_params(rid)
    return msgspec.structs.replace(params, checksums=[1, 2, 3], remote_engine_id="p")


def test_prefill_side_holds_with_a_lease_and_releases():
    clock = Clock()
    connector = PdSchedulerConnector(LAYOUT, 5.0, clock)
    params = prefill_params(connector)
    assert params.remote_block_ids == [7, 8, 9] and params.num_tokens == 11
    assert params.block_hashes == block_hashes(PROMPT, 4)
    meta = connector.build_connector_meta()
    assert [h.request_id for h in meta.holds] == ["r"] and connector.has_pending()
    assert connector.take_releasable() == []
    clock.now = 105.0
    assert connector.take_releasable() == ["r"] and connector.num_hold_timeouts == 1
    assert connector.build_connector_meta().releases == ["r"]
    assert not connector.has_pending() and connector.build_connector_meta() is None


def test_release_and_a_finished_send_free_at_once_and_only_once():
    connector = PdSchedulerConnector(LAYOUT, 5.0, Clock())
    prefill_params(connector, "a")
    prefill_params(connector, "b")
    connector.release(["a", "nobody"])
    from tokenmill.kv.connector import ConnectorOutput

    connector.update_connector_output(ConnectorOutput(finished_sends=["b", "b"]))
    assert sorted(connector.take_releasable()) == ["a", "b"]
    assert connector.take_releasable() == []


def test_not_held_unless_the_prefill_ran_to_its_one_token():
    connector = PdSchedulerConnector(LAYOUT, 5.0, Clock())
    stopped = Req("r", PROMPT, KvTransferParams(do_remote_decode=True), FinishReason.STOP)
    assert not connector.request_finished(stopped, [1, 2, 3])
    plain = Req("r", PROMPT, None, FinishReason.LENGTH)
    assert not connector.request_finished(plain, [1, 2, 3])


def test_decode_side_loads_past_its_hit_when_hashes_and_layout_agree():
    connector = PdSchedulerConnector(LAYOUT, 5.0, Clock())
    params = prefill_params(PdSchedulerConnector(LAYOUT, 5.0, Clock())).for_decode()
    request = Req("r", [*PROMPT, 99], params)
    assert connector.get_num_new_matched_tokens(request, 4) == (7, True)
    connector.update_state_after_alloc(request, [20, 21, 22], 4, 7)
    [load] = connector.build_connector_meta().loads
    assert (load.block_ids, load.first_block, load.num_tokens) == ([21, 22], 1, 7)
    assert load.block_hashes == request.block_hashes[1:2]
    assert connector.get_num_new_matched_tokens(request, 4) == (0, False)  # once only


def test_decode_side_abandons_what_it_will_not_read():
    connector = PdSchedulerConnector(LAYOUT, 5.0, Clock())
    params = prefill_params(PdSchedulerConnector(LAYOUT, 5.0, Clock())).for_decode()
    other = Req("x", [*[t + 1 for t in PROMPT], 99], params)  # different tokens
    assert connector.get_num_new_matched_tokens(other, 0) == (0, False)
    connector.request_not_loaded(other)
    connector.request_not_loaded(other)  # told once
    wrong = KvLayout(dtype="float32", block_size=4, num_layers=2, num_kv_heads=1, head_dim=8)
    mismatched = Req("y", [*PROMPT, 99], msgspec.structs.replace(params, layout=wrong))
    assert connector.get_num_new_matched_tokens(mismatched, 0) == (0, False)
    connector.request_not_loaded(mismatched)
    meta = connector.build_connector_meta()
    assert len(meta.abandoned) == 2 and connector.num_hash_mismatches == 1
