"""The shared metric definitions (used by bench serve and the offline replay)."""

from __future__ import annotations

import numpy as np
import pytest

from tokenmill.bench.metrics import (
    RequestTiming,
    SlaConfig,
    cached_token_ratio,
    distribution,
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
    dist = distribution([4.0, 1.0, 3.0, 2.0])  # any unit, unsorted input
    assert dist == pytest.approx({"mean": 2.5, "p50": 2.5, "p90": 3.7, "p99": 3.97}, abs=1e-12)


def test_no_data_is_none_never_zero():
    failed = RequestTiming(0, None, None, 0.1, 0, error="timeout")
    s = summarize([failed], duration_s=0.0)
    assert s["ttft"]["mean"] is None and s["itl"]["p99"] is None and s["e2e"]["p50"] is None
    assert s["requests_per_s"] is None and s["goodput"]["requests_per_s"] is None
    assert s["goodput"]["fraction"] == 0.0 and s["kv_reuse_ratio"] is None
    assert summarize([], duration_s=1.0)["goodput"]["fraction"] is None


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
