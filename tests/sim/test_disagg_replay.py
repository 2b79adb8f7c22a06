"""The replay's pools, P/D split flows (tokenmill and dynamo controls), KV transfer model and
Dynamo's ITL over all gaps."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tokenmill.engine.mocker import PolynomialTiming
from tokenmill.launch.cli import main
from tokenmill.router.disagg import DisaggConfig, DisaggMode
from tokenmill.sim.replay import Replay, ReplayConfig, Role
from tokenmill.sim.report import GapStats
from tokenmill.sim.trace import TraceRequest
from tokenmill.sim.transfer import TransferConfig, TransferLinks, kv_bytes_per_token

T = PolynomialTiming()


def req(rid: str, t: float, n: int, out: int, base: int = 0) -> TraceRequest:
    return TraceRequest(rid, t, n, out, tuple(base + i for i in range(-(-n // 512))))


def split(p: int = 1, d: int = 1, **kw) -> ReplayConfig:
    return ReplayConfig(num_prefill_workers=p, num_decode_workers=d, num_blocks=2048, **kw)


# ---- metrics and transfer model -----------------------------------------------------------
def test_gap_stats_equal_numpy_over_the_expanded_gaps():
    rng = np.random.default_rng(0)
    g = GapStats()
    expanded: list[float] = []
    for _ in range(300):
        v, w = float(rng.uniform(1, 60)), int(rng.integers(1, 9))
        g.add(v, w)
        expanded += [v] * w
    s = g.summary()
    assert g.count == len(expanded)
    assert s["mean"] == pytest.approx(np.mean(expanded), rel=1e-12)
    for p in (50, 90, 99):
        assert s[f"p{p}"] == pytest.approx(np.percentile(expanded, p), rel=1e-12)
    assert GapStats().summary()["p99"] is None


def test_transfer_time_is_dynamos_formula_and_links_queue():
    cfg = TransferConfig(bytes_per_token=131_072, bandwidth_gbps=10.0)
    # Dynamo's check (anchor README): 6,758 tokens at 10 GB/s wait 88.58 ms
    assert cfg.duration_ms(cfg.num_bytes(6758)) == pytest.approx(88.58, abs=0.01)
    assert TransferConfig().duration_ms(10**9) == 0.0  # no bandwidth: 0 ms, latency too
    assert kv_bytes_per_token(32, 8, 128, "bfloat16") == 131_072
    with pytest.raises(ValueError):
        kv_bytes_per_token(32, 8, 128, "int3")
    fifo = TransferLinks(TransferConfig(bandwidth_gbps=1.0, latency_ms=1.0, link="per_worker"))
    assert fifo.schedule(0, 0.0, 10**6) == (0.0, 2.0)  # 1 MB at 1 GB/s = 1 ms + 1 ms
    assert fifo.schedule(0, 0.5, 10**6) == (2.0, 4.0)  # behind the first on worker 0's link
    assert fifo.schedule(1, 0.5, 10**6) == (0.5, 2.5)  # another worker's link is free
    free = TransferLinks(TransferConfig(bandwidth_gbps=1.0))
    assert free.schedule(0, 0.0, 10**6) == free.schedule(0, 0.0, 10**6) == (0.0, 1.0)


# ---- the dynamo control ---------------------------------------------------------------------
def test_dynamo_control_ttft_is_prefill_transfer_and_one_decode_step():
    """One request alone (anchor README): 1P1D TTFT = aggregated TTFT + one decode step, plus
    the transfer when a bandwidth is set; every output token comes from the decode worker."""
    n, out = 4000, 6
    agg = Replay(ReplayConfig(num_workers=1, num_blocks=2048), [req("r", 0.0, n, out)]).run()
    one_step = T.decode_ms((n // 64 + 1) / 2048)
    d = Replay(split(control="dynamo"), [req("r", 0.0, n, out)]).run()
    assert d["ttft"]["mean"] == pytest.approx(agg["ttft"]["mean"] + one_step, abs=2e-3)
    assert d["output_tokens"] == out and d["disagg"]["by_reason"] == {"mode_always": 1}
    bw = TransferConfig(bandwidth_gbps=10.0, tokens="full_prompt")
    t = Replay(split(control="dynamo", transfer=bw), [req("r", 0.0, n, out)]).run()
    wire = bw.duration_ms(bw.num_bytes(n))
    assert t["ttft"]["mean"] == pytest.approx(d["ttft"]["mean"] + wire, abs=2e-3)
    assert t["disagg"]["transfer"]["ms"]["mean"] == pytest.approx(wire, abs=1e-3)


# ---- the tokenmill control ------------------------------------------------------------------
def test_auto_prefills_long_prompts_remotely_and_short_ones_locally():
    reqs = [req("long", 0.0, 6000, 8), req("short", 5.0, 300, 8, base=100)]
    rep_replay = Replay(split(disagg=DisaggConfig(mode=DisaggMode.AUTO)), reqs)
    rep = rep_replay.run()
    recs = rep_replay.records
    assert rep["disagg"]["by_reason"] == {"long_prefill": 1, "short_prefill": 1}
    assert recs["long"].prefill_worker == 0 and recs["long"].worker == 1
    assert recs["short"].prefill_worker == -1 and recs["short"].worker == 1
    # the long prompt's first token streams when its prefill ends; the decode leg adds the rest
    assert recs["long"].first_token_ms == pytest.approx(T.prefill_ms(6000), abs=1e-6)
    assert recs["long"].num_output_tokens == 8 and rep["output_tokens"] == 16
    never = Replay(split(disagg=DisaggConfig(mode=DisaggMode.NEVER)), reqs).run()
    assert never["disagg"]["by_reason"] == {"mode_never": 2}
    assert never["disagg"]["remote_prefills"] == 0


def test_prefill_blocks_are_held_until_the_transfer_completes_then_freed():
    bw = TransferConfig(bandwidth_gbps=1.0, latency_ms=5.0)  # 3000 tokens: ~393 ms on the wire
    replay = Replay(split(transfer=bw, disagg=DisaggConfig(mode=DisaggMode.ALWAYS)), [])
    replay.requests = [req("a", 0.0, 3000, 4)]
    seen: dict[str, object] = {}

    def probe(r: Replay) -> None:
        kv = r.workers[0].core.scheduler.kv
        seen["held"] = list(kv.held_request_ids)
        decode = r.workers[1].core.scheduler
        seen["parked"] = decode.num_waiting_for_remote_kv  # WAITING_FOR_REMOTE_KV ...
        seen["reserved"] = 2048 - decode.kv.num_free_blocks  # ... with its blocks allocated

    replay.call_at(T.prefill_ms(3000) + 100.0, probe)  # mid-transfer
    rep = replay.run()
    assert seen == {"held": ["a"], "parked": 1, "reserved": 47}  # 3001 tokens: 47 blocks
    prefill = replay.workers[0].core.scheduler
    assert prefill.kv.held_request_ids == [] and prefill.kv.num_free_blocks == 2048
    prefill.check_integrity()
    replay.workers[1].core.scheduler.check_integrity()
    wire = bw.duration_ms(bw.num_bytes(3000))
    assert rep["disagg"]["transfer"]["ms"]["mean"] == pytest.approx(wire, abs=1e-3)
    # the gap after the streamed first token holds the transfer and the decode step
    a = replay.records["a"]
    assert a.decode_first_ms - a.first_token_ms > wire
    assert rep["itl_gaps"]["mean"] * 3 == pytest.approx(a.finish_ms - a.first_token_ms, abs=1e-2)


def test_split_fast_forward_is_exact_and_runs_are_deterministic():
    reqs = [
        req(f"r{i}", 37.0 * i, 800 + 900 * (i % 5), 30 + i, base=10 * (i % 4)) for i in range(40)
    ]
    for control in ("tokenmill", "dynamo"):
        kw = dict(control=control, transfer=TransferConfig(bandwidth_gbps=5.0))
        a = Replay(split(2, 2, **kw), reqs).run()
        b = Replay(split(2, 2, fast_forward=False, **kw), reqs).run()
        assert a["num_fast_forward_steps"] > 0 and b["num_fast_forward_steps"] == 0
        drop = ("num_fast_forward_steps",)
        assert {k: v for k, v in a.items() if k not in drop} == {
            k: v for k, v in b.items() if k not in drop
        }
        assert a["completed"] == 40


# ---- pools: the planner's seams -------------------------------------------------------------
def test_worker_joins_after_its_delay_and_a_removed_worker_drains_then_leaves():
    reqs = [req(f"r{i}", 100.0 * i, 2000, 40, base=10 * i) for i in range(8)]
    replay = Replay(ReplayConfig(num_workers=1, num_blocks=1024), reqs)
    late = replay.add_worker(Role.BOTH, delay_ms=350.0)
    left: list[tuple[int, float]] = []
    replay.on_worker_left = lambda w: left.append((w.worker_id, replay.now))
    replay.call_at(500.0, lambda r: r.remove_worker(0))
    rep = replay.run()
    recs = replay.records
    assert {recs[f"r{i}"].worker for i in range(4)} == {0}  # before the join: worker 0 only
    assert {recs[f"r{i}"].worker for i in range(5, 8)} == {late}  # after the removal
    assert rep["completed"] == 8
    assert left and left[0][0] == 0 and left[0][1] >= 500.0
    assert replay.workers[0].left_ms == left[0][1]
    assert replay.pools[Role.BOTH].workers.keys() == {late}
    for w in replay.workers.values():
        w.core.scheduler.check_integrity()
        assert not w.core.has_unfinished_requests()


def test_cli_split_run_reports_reasons_transfers_and_slo_goodput(tmp_path):
    trace = tmp_path / "t.jsonl"
    lengths = [600 + 700 * (i % 6) for i in range(24)]
    rows = [
        {"timestamp": 20 * i, "input_length": n, "output_length": 12,
         "hash_ids": [i % 3] + [1000 * i + j for j in range(-(-n // 512) - 1)]}
        for i, n in enumerate(lengths)
    ]  # fmt: skip
    trace.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "rep.json"
    args = ["replay", "--trace", str(trace), "--prefill-workers", "1", "--decode-workers", "2"]
    args += ["--kv-transfer-bandwidth", "20", "--kv-model-shape", "24,32,64,bfloat16"]
    args += ["--slo-ttft-ms", "1000", "--slo-itl-ms", "15", "--output", str(out)]
    assert main(args) == 0
    rep = json.loads(out.read_text())
    assert rep["completed"] == 24 and rep["goodput"]["sla_itl_ms"] == 15.0
    dis = rep["disagg"]
    assert dis["remote_prefills"] + dis["local_prefills"] == 24
    assert sum(dis["by_reason"].values()) == 24
    assert dis["transfer"]["count"] == dis["remote_prefills"] > 0
    assert dis["transfer"]["bytes"] == dis["transfer"]["tokens"] * 2 * 24 * 32 * 64 * 2
    assert rep["config"]["decode_workers"] == 2 and rep["itl_gaps"]["mean"] > 0
    with pytest.raises(SystemExit):
        main(["replay", "--trace", str(trace), "--prefill-workers", "1"])
