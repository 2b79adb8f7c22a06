"""The replay report: bench.metrics' definitions on the replay's records, rounded."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tokenmill.bench.metrics import itl_s, ttft_s
from tokenmill.bench.traces import TraceRequest as BenchRequest
from tokenmill.sim.report import RequestRecord, build_report, to_timing
from tokenmill.sim.trace import TraceRequest, TraceTokens

CFG = SimpleNamespace(sla_ttft_ms=100.0, sla_itl_ms=10.0, num_workers=2)


def _done(i: int, arrival: float, first: float, finish: float, n: int, **kw) -> RequestRecord:
    return RequestRecord(
        f"r{i}", arrival, 1000, n, first_token_ms=first, finish_ms=finish, num_output_tokens=n, **kw
    )


def _stats(rep: dict) -> dict:
    return {k: rep[k] for k in ("ttft", "itl", "e2e", "goodput", "kv_reuse_ratio")}


def test_record_as_timing():
    t = to_timing(_done(0, 1000.0, 1050.0, 1250.0, 5, num_cached_tokens=64))
    assert ttft_s(t) == pytest.approx(0.05) and itl_s(t) == pytest.approx(0.05)
    assert (t.num_prompt_tokens, t.num_cached_tokens, t.ok) == (1000, 64, True)
    shed = to_timing(RequestRecord("s", 5.0, 10, 3, shed=True))
    assert (shed.ok, shed.error) == (False, "shed")


def test_report_values():
    records = [
        _done(0, 0.0, 10.0, 40.0, 4, worker=0, num_cached_tokens=500),  # ITL 10: good
        _done(1, 0.0, 20.0, 80.0, 4, worker=1, num_cached_tokens=250),  # ITL 20: not good
        _done(2, 100.0, 300.0, 300.0, 1, worker=0, queued_ms=50.0),  # TTFT 200: not good
        _done(3, 100.0, 140.0, 1000.0, 1, worker=0),  # no ITL, TTFT 40: good
        RequestRecord("r4", 100.0, 1000, 2, shed=True),
    ]
    rep = build_report(CFG, records, [], {"x": 1})
    assert rep["num_requests"] == 5 and rep["completed"] == 4 and rep["shed_requests"] == 1
    assert rep["ttft"] == {"mean": 67.5, "p50": 30.0, "p90": 152.0, "p99": 195.2}
    assert rep["itl"] == {"mean": 15.0, "p50": 15.0, "p90": 19.0, "p99": 19.9}
    assert rep["e2e"] == {"mean": 305.0, "p50": 140.0, "p90": 690.0, "p99": 879.0}
    assert rep["router_queue_ms"] == {"mean": 12.5, "p50": 0.0, "p90": 35.0, "p99": 48.5}
    assert rep["sim_duration_s"] == 1.0 and rep["requests_per_s"] == 4.0
    assert rep["output_tokens"] == 10 and rep["output_tokens_per_s"] == 10.0
    assert rep["kv_reuse_ratio"] == 0.1875  # 750 / 4000
    good = {"sla_ttft_ms": 100.0, "sla_itl_ms": 10.0, "requests": 2}
    assert rep["goodput"] == good | {"fraction": 0.4, "requests_per_s": 2.0}  # shed in 5
    assert rep["load_balance"]["requests"] == {"per_worker": [3, 1], "max_over_mean": 1.5}
    assert rep["load_balance"]["computed_prompt_tokens"]["per_worker"] == [2500, 750]
    assert rep["x"] == 1


def test_report_rounds_to_3_and_4_digits():
    records = [_done(0, 0.0, 1.0 / 3, 3.0, 3, num_cached_tokens=1), _done(1, 0.0, 1.0, 3.0, 2)]
    rep = build_report(CFG, records, [], {})
    assert rep["ttft"]["mean"] == 0.667 and rep["itl"]["mean"] == 1.667
    assert rep["kv_reuse_ratio"] == 0.0005 and rep["goodput"]["fraction"] == 1.0


def test_empty_report_is_null_not_zero():
    rep = build_report(CFG, [RequestRecord("s", 0.0, 10, 3, shed=True)], [], {})
    assert rep["ttft"] == {"mean": None, "p50": None, "p90": None, "p99": None}
    assert rep["requests_per_s"] is None and rep["kv_reuse_ratio"] is None
    assert rep["goodput"]["fraction"] == 0.0 and rep["goodput"]["requests_per_s"] is None
    assert rep["load_balance"]["requests"]["max_over_mean"] is None
    assert build_report(CFG, [], [], {})["goodput"]["fraction"] is None


def test_replay_prompts_equal_bench_serve_prompts():
    """The replay assembles prompts from whole-block rows; bench serve from segments."""
    tokens = TraceTokens(trace_block_size=512, block_size=64, vocab_size=32000)
    req = TraceRequest("r", 0.0, 600, 5, (7, 9))
    online = BenchRequest(0.0, 600, 5, ((7, 512), (9, 88))).prompt_token_ids()
    assert tokens.prompt_tokens(req) == online
