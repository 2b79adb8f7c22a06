"""The shared metric definitions (used by bench serve and the offline replay)."""

from __future__ import annotations

import numpy as np
import pytest

from tokenmill.bench.metrics import (
    RequestTiming,
    SlaConfig,
    cached_token_ratio,
    distribution_ms,
    e2e_s,
    is_good,
    itl_s,
    percentile,
    summarize,
    ttft_s,
)


def _ok(arrival, first, last, end, n, prompt=None, cached=None) -> RequestTiming:
    return RequestTiming(arrival, first, last, end, n, prompt, cached)


def test_percentile_is_linear_interpolation_like_numpy():
    xs = [3.0, 1.0, 7.0, 10.0, 2.5, 8.0]
    for p in (0, 10, 50, 90, 99, 100):
        assert percentile(sorted(xs), p) == pytest.approx(float(np.percentile(xs, p)), abs=1e-12)
    assert percentile([4.0], 99) == 4.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_distribution_is_in_ms_and_empty_is_none():
    assert distribution_ms([0.001, 0.003]) == {"mean": 2.0, "p50": 2.0, "p90": 2.8, "p99": 2.98}
    assert distribution_ms([]) == {"mean": None, "p50": None, "p90": None, "p99": None}


def test_per_request_definitions():
    t = _ok(1.0, 1.5, 1.8, 1.9, 4)
    assert ttft_s(t) == pytest.approx(0.5)
    assert itl_s(t) == pytest.approx(0.1)  # (1.8 - 1.5) / (4 - 1)
    assert e2e_s(t) == pytest.approx(0.9)
    assert itl_s(_ok(0, 1, 1, 1, 1)) is None


def test_itl_mean_is_averaged_over_requests_not_tokens():
    a = _ok(0, 1.0, 1.0 + 0.010 * 9, 2, 10)  # 10 ms gaps, 9 gaps
    b = _ok(0, 1.0, 1.0 + 0.030, 2, 2)  # one 30 ms gap
    assert summarize([a, b], 1.0)["itl"]["mean"] == pytest.approx(20.0)  # not (90+30)/10


def test_goodput_and_throughput():
    sla = SlaConfig(ttft_ms=100, itl_ms=10)
    good = _ok(0, 0.05, 0.05 + 0.009 * 3, 0.1, 4)
    slow_first = _ok(0, 0.2, 0.2, 0.3, 1)
    slow_itl = _ok(0, 0.05, 0.05 + 0.02 * 3, 0.2, 4)
    failed = RequestTiming(0, None, None, 0.1, 0, error="http_503")
    assert [is_good(t, sla) for t in (good, slow_first, slow_itl, failed)] == [
        True,
        False,
        False,
        False,
    ]
    s = summarize([good, slow_first, slow_itl, failed], duration_s=2.0, sla=sla)
    assert s["goodput"] == {
        "sla_ttft_ms": 100,
        "sla_itl_ms": 10,
        "requests": 1,
        "requests_per_s": 0.5,
        "fraction": 0.25,
    }
    assert s["requests_per_s"] == 1.5 and s["output_tokens_per_s"] == 4.5
    assert s["errors"] == {"http_503": 1}
    assert s["ttft"]["p50"] == pytest.approx(50.0)


def test_cached_ratio_counts_only_reporting_successes():
    ts = [
        _ok(0, 1, 1, 1, 1, prompt=100, cached=50),
        _ok(0, 1, 1, 1, 1, prompt=100),
        _ok(0, 1, 1, 1, 1, prompt=300, cached=0),
    ]
    assert cached_token_ratio(ts) == pytest.approx(50 / 400)
    assert cached_token_ratio([_ok(0, 1, 1, 1, 1, prompt=10)]) is None


def test_agrees_with_the_offline_replay_report():
    """tokenmill replay (tokenmill/sim/report.py) and bench serve report the same numbers for
    the same requests (the replay rounds to 3 decimals)."""
    import random
    from types import SimpleNamespace

    report = pytest.importorskip("tokenmill.sim.report")
    rng = random.Random(7)
    sim_records, timings = [], []
    for i in range(200):
        arrival = rng.uniform(0, 10_000)
        first = arrival + rng.expovariate(1 / 500)
        n = rng.choice([1, 2, 5, 40])
        finish = first + n * rng.uniform(5, 40)
        cached = rng.choice([0, 512, 1024])
        sim_records.append(
            report.RequestRecord(
                f"r{i}",
                arrival,
                2048,
                n,
                worker=0,
                first_token_ms=first,
                finish_ms=finish,
                num_output_tokens=n,
                num_cached_tokens=cached,
            )
        )
        timings.append(
            RequestTiming(arrival / 1e3, first / 1e3, finish / 1e3, finish / 1e3, n, 2048, cached)
        )
    cfg = SimpleNamespace(sla_ttft_ms=600.0, sla_itl_ms=25.0, num_workers=1)
    offline = report.build_report(cfg, sim_records, [], {})
    duration = max(t.end_s for t in timings) - min(t.arrival_s for t in timings)
    online = summarize(timings, duration, SlaConfig(600.0, 25.0))
    for key in ("ttft", "itl", "e2e"):
        for stat, value in online[key].items():
            assert offline[key][stat] == pytest.approx(value, abs=1e-3), (key, stat)
    assert offline["goodput"]["requests"] == online["goodput"]["requests"]
    assert offline["goodput"]["fraction"] == pytest.approx(online["goodput"]["fraction"], abs=1e-4)
    for key in ("requests_per_s", "output_tokens_per_s"):
        assert offline[key] == pytest.approx(online[key], abs=1e-3)
    assert offline["output_tokens"] == online["output_tokens"]
    assert offline["kv_reuse_ratio"] == pytest.approx(online["kv_reuse_ratio"], abs=1e-4)
