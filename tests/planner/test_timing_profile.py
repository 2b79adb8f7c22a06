import pytest

from tokenmill.bench.profile import ProfileConfig, Profiler
from tokenmill.core.timing_profile import TimingProfile
from tokenmill.engine.builder import build_mock_core
from tokenmill.engine.config import CacheConfig, SchedulerConfig
from tokenmill.engine.mocker import PolynomialTiming
from tokenmill.launch.profiling import load_step_timing


def mocker_profile() -> TimingProfile:
    sched = SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=2048, max_model_len=16384)
    core = build_mock_core(CacheConfig(64, 512), sched)
    cfg = ProfileConfig(
        input_lengths=(256, 1024, 4096),
        prefix_hits=(0.0, 0.5),
        batch_sizes=(1, 8, 64),
        context_lengths=(128, 1024),
        decode_steps=4,
    )
    return Profiler(core, "mocker", lambda: core.executor.last_step_ms).run(cfg)


def test_mocker_profile_matches_its_polynomial():
    prof, poly = mocker_profile(), PolynomialTiming()
    by = {(p.input_tokens, p.prefix_hit): p.ms for p in prof.prefill}
    # one request alone: its prefill steps (chunks of 2048) plus the decode of its first token
    assert by[(1024, 0.0)] == pytest.approx(poly.prefill_ms(1024), rel=1e-6)
    assert by[(4096, 0.0)] == pytest.approx(2 * poly.prefill_ms(2048), rel=1e-6)
    assert by[(1024, 0.5)] == pytest.approx(poly.prefill_ms(512), rel=1e-6)  # half cached
    for d in prof.decode:
        assert d.itl_ms == pytest.approx(poly.decode_ms(d.kv_usage), rel=0.02)
    assert prof.itl_ms(8, 1024) > prof.itl_ms(1, 128)  # more KV held: slower steps


def test_profile_round_trip_interpolation_and_step_timing(tmp_path):
    prof = mocker_profile()
    path = tmp_path / "p.json"
    prof.save(path)
    again = load_step_timing(path)
    assert again == prof
    assert again.prefill_ms(640) == pytest.approx(
        (prof.prefill_time_ms(256) * 384 + prof.prefill_time_ms(1024) * 384) / 768
    )
    assert again.prefill_time_ms(10**6) == pytest.approx(prof.prefill_time_ms(4096))  # clamped
    assert again.decode_ms(0.0) == min(d.itl_ms for d in prof.decode)


def test_a_bad_profile_names_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": 1, "engine": "x"}')
    with pytest.raises(ValueError, match="bad.json"):
        TimingProfile.load(bad)


def test_profile_cli_writes_what_replay_reads(tmp_path):
    from tokenmill.launch.cli import main

    out = tmp_path / "mocker.json"
    argv = [
        "profile",
        "--engine",
        "mocker",
        "--num-blocks",
        "512",
        "--max-num-batched-tokens",
        "2048",
        "--input-lengths",
        "256,1024",
        "--prefix-hits",
        "0",
        "--batch-sizes",
        "1,8",
        "--context-lengths",
        "128",
        "--decode-steps",
        "2",
        "--output",
        str(out),
    ]
    assert main(argv) == 0
    prof = TimingProfile.load(out)
    assert prof.engine == "mocker" and prof.num_blocks == 512
    assert [p.input_tokens for p in prof.prefill] == [256, 1024]
    assert [d.batch_size for d in prof.decode] == [1, 8]
    with pytest.raises(SystemExit):
        main(["profile", "--engine", "mocker", "--decode-steps", "0"])
