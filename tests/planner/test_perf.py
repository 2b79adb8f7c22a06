import math

import pytest

from tokenmill.core.timing_profile import DecodePoint, PrefillPoint, TimingProfile
from tokenmill.planner.perf import Demand, PerfModel


def linear_profile() -> TimingProfile:
    """prefill: 10 ms + 0.01 ms/token; decode: 5 ms + 0.01 ms per request in the batch."""
    prefill = [PrefillPoint(n, 0.0, 10.0 + 0.01 * n) for n in (0, 1000, 8192)]
    decode = [
        DecodePoint(b, c, 5.0 + 0.01 * b, b * c / 1_000_000)
        for b in (1, 256)
        for c in (100, 10_000)
    ]
    return TimingProfile(
        engine="test",
        block_size=64,
        num_blocks=15_625,
        max_num_batched_tokens=8192,
        max_num_seqs=256,
        prefill=prefill,
        decode=decode,
    )


def test_one_request_alone_costs_its_prefill_and_a_decode_step():
    m = PerfModel(linear_profile())
    lat = m.latency(1, Demand(rate=1e-6, isl=1000, osl=2))
    assert lat.itl_ms == pytest.approx(5.01, rel=1e-3)  # an idle worker: pure decode steps
    assert lat.batch == pytest.approx(0.0, abs=1e-6)


def test_latency_falls_with_workers_and_the_smallest_pool_is_picked():
    m = PerfModel(linear_profile())
    d = Demand(rate=200.0, isl=1000, osl=100)
    lats = [m.latency(n, d) for n in (1, 2, 4, 8)]
    assert math.isinf(lats[0].itl_ms)  # 200k prompt tokens/s: more than one worker clears
    assert lats[1].itl_ms > lats[2].itl_ms > lats[3].itl_ms
    n = m.replicas_needed(d, 2000, 25, 16, headroom=1.0)
    assert m.latency(n, d).itl_ms <= 25 < m.latency(n - 1, d).itl_ms


def test_roles():
    m = PerfModel(linear_profile())
    d = Demand(rate=50.0, isl=1000, osl=100)
    assert m.latency(2, d, "decode").ttft_ms == 0.0
    assert m.latency(2, d, "prefill").itl_ms == 0.0
    assert m.latency(2, d, "decode").itl_ms < m.latency(2, d, "both").itl_ms


def test_dynamo_throughputs():
    m = PerfModel(linear_profile())
    assert m.prefill_throughput_per_worker(1000) == pytest.approx(1000 / 20 * 1000)
    # ITL 5 + 0.01 b <= 6 ms allows b = 100: 100 tokens per 6 ms
    assert m.decode_throughput_per_worker(6.0, 1000) == pytest.approx(100 * 1000 / 6.0, rel=0.05)
