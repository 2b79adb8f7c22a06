from __future__ import annotations

import json
from pathlib import Path

import pytest

from tokenmill.bench.traces import mooncake_block_tokens
from tokenmill.core.block_hash import block_hashes
from tokenmill.launch.cli import main
from tokenmill.router.queue import QueueConfig
from tokenmill.router.router import RouterConfig
from tokenmill.sim.replay import Replay, ReplayConfig
from tokenmill.sim.trace import TraceRequest, TraceTokens, read_mooncake

TRACE = Path(__file__).resolve().parents[3] / "shared/data/traces/conversation_trace.jsonl"
if not TRACE.exists():
    TRACE = Path("/work/shared/data/traces/conversation_trace.jsonl")
needs_trace = pytest.mark.skipif(not TRACE.exists(), reason="shared trace not present")

SMALL = dict(num_workers=3, num_blocks=2048)  # small pools so eviction happens


def one_request(n_tokens: int, out: int = 3) -> list[TraceRequest]:
    ids = tuple(range(-(-n_tokens // 512)))
    return [TraceRequest("r0", 0.0, n_tokens, out, ids)]


@pytest.mark.parametrize(("n", "ttft"), [(1000, 32.106), (4000, 83.971)])
def test_dynamo_probe_single_request_ttft(n, ttft):
    rep = Replay(ReplayConfig(num_workers=1), one_request(n)).run()
    assert rep["ttft"]["mean"] == pytest.approx(ttft, abs=1e-3)


def test_trace_tokens_and_hashes_agree_with_core():
    tt = TraceTokens(512, 64, vocab_size=1000)
    req = TraceRequest("a", 0.0, 1100, 5, (7, 8, 9))
    tokens, hashes = tt.prompt(req)
    assert len(tokens) == 1100 and max(tokens) < 1000
    assert tokens[:512] == mooncake_block_tokens(7, 512, vocab_size=1000).tolist()
    assert hashes == block_hashes(tokens, 64)
    other = TraceRequest("b", 0.0, 600, 5, (7, 10))
    assert tt.prompt(other)[1][:8] == hashes[:8]  # shared first trace block, shared hashes


@needs_trace
def test_reader_bursts_and_speed():
    reqs = read_mooncake(TRACE, 50, arrival_speed=2.0)
    assert len(reqs) == 50
    assert reqs[0].arrival_ms == reqs[1].arrival_ms == 0.0  # same timestamp: one burst
    raw = [json.loads(x) for x in TRACE.read_text().splitlines()[:50]]
    assert reqs[-1].arrival_ms == (raw[-1]["timestamp"] - raw[0]["timestamp"]) / 2.0


def _cfg(mode: str, seed: int = 0, ff: bool = True, **kw) -> ReplayConfig:
    return ReplayConfig(
        seed=seed, fast_forward=ff, router=RouterConfig(mode=mode, seed=seed, **kw), **SMALL
    )


def _strip(rep: dict) -> dict:
    return {k: v for k, v in rep.items() if k not in ("num_fast_forward_steps",)}


@needs_trace
def test_replay_deterministic_for_a_seed_and_fast_forward_exact():
    reqs = read_mooncake(TRACE, 120, arrival_speed=4.0)
    a = Replay(_cfg("kv", seed=5), reqs).run()
    b = Replay(_cfg("kv", seed=5), reqs).run()
    assert a == b
    assert a["completed"] == 120 and a["shed_requests"] == 0
    assert a["num_fast_forward_steps"] > 0
    stepped = Replay(_cfg("kv", seed=5, ff=False), reqs).run()
    assert stepped["num_fast_forward_steps"] == 0
    assert _strip(stepped) == _strip(a)


def conversations(num_conv: int = 11, turns: int = 4) -> list[TraceRequest]:
    """Multi-turn chats: turn t of chat c extends turn t-1's prompt by one trace block."""
    reqs = []
    for t in range(turns):
        for c in range(num_conv):
            ids = (0, *(1000 * c + j for j in range(t + 2)))
            reqs.append(
                TraceRequest(f"c{c}t{t}", 1500.0 * t + 40.0 * c, 512 * len(ids) - 100, 20, ids)
            )
    return reqs


def test_kv_routing_reuses_more_than_round_robin():
    reqs = conversations()
    rr = Replay(_cfg("round-robin"), reqs).run()
    kv = Replay(_cfg("kv"), reqs).run()
    assert kv["kv_reuse_ratio"] > rr["kv_reuse_ratio"] + 0.2
    assert kv["ttft"]["mean"] < rr["ttft"]["mean"]
    assert kv["num_event_gaps"] == 0


def test_router_queue_and_shedding_in_replay():
    reqs = [
        TraceRequest(f"r{i}", 0.0, 3000, 4, (100 + i, 200 + i, 300 + i, 400 + i, 500 + i, 600 + i))
        for i in range(6)
    ]
    q = QueueConfig(busy_prefill_tokens=0, max_queued=2)
    rep = Replay(_cfg("least-loaded", queue=q), reqs).run()
    # 3 workers take one each (then all busy), 2 wait in the queue, 1 is shed
    assert rep["shed_requests"] == 1 and rep["completed"] == 5
    assert rep["router_queue_ms"]["p99"] > 0


@needs_trace
def test_cli_writes_report(tmp_path):
    out = tmp_path / "report.json"
    code = main(
        [
            "replay",
            "--trace",
            str(TRACE),
            "--workers",
            "2",
            "--router-mode",
            "dynamo",
            "--max-requests",
            "30",
            "--arrival-speed",
            "8",
            "--output",
            str(out),
            "--save-requests",
        ]
    )
    assert code == 0
    rep = json.loads(out.read_text())
    assert rep["completed"] == 30 and set(rep["ttft"]) == {"mean", "p50", "p90", "p99"}
    assert rep["config"]["router_mode"] == "dynamo"
    # --save-requests: one record per request, whose TTFTs give the report's mean
    records = rep["requests"]
    assert len(records) == 30 and {r["worker"] for r in records} <= {0, 1}
    ttfts = [r["first_token_ms"] - r["arrival_ms"] for r in records]
    assert min(ttfts) > 0
    assert sum(ttfts) / len(ttfts) == pytest.approx(rep["ttft"]["mean"], abs=0.01)
    assert all(
        r["num_output_tokens"] > 0 and r["finish_ms"] >= r["first_token_ms"] for r in records
    )


def test_scaled_copies_disjoint_ids_and_shift():
    from tokenmill.sim.trace import scaled_copies

    base = [TraceRequest("a", 0.0, 600, 2, (0, 1)), TraceRequest("b", 100.0, 600, 2, (0, 2))]
    out = scaled_copies(base, 5, shift_ms=10.0)
    assert [r.request_id for r in out] == ["a-c0", "a-c1", "a-c2", "b-c0", "b-c1"]
    assert [r.hash_ids for r in out[:3]] == [(0, 1), (3, 4), (6, 7)]
    assert [r.arrival_ms for r in out] == [0.0, 10.0, 20.0, 100.0, 110.0]


def test_replay_timeline_is_engine_core_step_on_the_virtual_clock():
    """One worker, every request at t=0, no fast-forward: each request's first token and
    finish are where a mocker core built alike, stepped by hand (``step()``, the clock moved
    by ``last_step_ms``), puts them; the KV events are the same too."""
    from tokenmill.core.events import Removed
    from tokenmill.core.request import EngineRequest
    from tokenmill.core.sampling import SamplingParams
    from tokenmill.engine.builder import build_mock_core
    from tokenmill.engine.config import CacheConfig, SchedulerConfig

    reqs = [TraceRequest(f"r{i}", 0.0, 700 + 300 * i, 5 + 3 * i, (0, 1 + i, 9)) for i in range(5)]
    cfg = ReplayConfig(
        num_workers=1, num_blocks=64, fast_forward=False, max_num_batched_tokens=1024
    )
    replay = Replay(cfg, reqs)
    events = []
    replay.router.apply_event = lambda e: events.append(e)  # noqa: E731 - record, route nothing
    replay.run()
    sched = SchedulerConfig(
        max_num_seqs=cfg.max_num_seqs,
        max_num_batched_tokens=1024,
        max_model_len=64 * 64,
        watermark=cfg.watermark,
    )
    hand_events = []
    core = build_mock_core(
        CacheConfig(64, 64), sched, vocab_size=cfg.vocab_size, event_sink=hand_events.append
    )
    tokens = TraceTokens(512, 64, cfg.vocab_size)
    for r in reqs:
        params = SamplingParams(max_tokens=r.output_length, ignore_eos=True)
        core.add_request(
            EngineRequest(
                request_id=r.request_id, prompt_token_ids=tokens.prompt_tokens(r), params=params
            )
        )
    now, first, finish = 0.0, {}, {}
    while core.has_unfinished_requests():
        outs = core.step()
        now += core.executor.last_step_ms
        for o in outs:
            first.setdefault(o.request_id, now)
            if o.finished:
                finish[o.request_id] = now
    recs = replay.records
    assert {rid: recs[rid].first_token_ms for rid in first} == first
    assert {rid: recs[rid].finish_ms for rid in finish} == finish and len(finish) == 5
    assert [e.data for e in events] == hand_events
    assert any(isinstance(e.data, Removed) for e in events)  # the pool was full: eviction
