"""The KV tier flags: defaults a user expects on one machine (a host tier on, sized from free
memory; disk and remote off until named), values reaching the engine's tiers, the spawned
workers' command lines, bad values refused at the border, and per-tier metrics on /metrics."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from tokenmill.engine.kv_tiers import DEFAULT_REMOTE
from tokenmill.kvstore.metrics import TierCollector
from tokenmill.launch import engines, flags
from tokenmill.launch.cli import build_parser, main
from tokenmill.launch.specs import EngineSpec, KvTierSpec


def spec(*argv: str) -> EngineSpec:
    return EngineSpec.from_args(
        build_parser().parse_args(["worker", "--nats", "nats://n:1", *argv])
    )


def test_defaults_host_on_disk_and_remote_off():
    assert spec().kv_tiers == KvTierSpec() and spec().kv_tiers.nats_url == "nats://n:1"
    assert flags.DEFAULT_KV_REMOTE == DEFAULT_REMOTE


def test_given_values_and_the_worker_command_line_round_trip(tmp_path):
    s = spec(
        "--kv-host-gib",
        "0.5",
        "--kv-disk-dir",
        str(tmp_path),
        "--kv-disk-gib",
        "2",
        "--kv-remote",
        "--kv-write-through",
    )
    assert s.kv_tiers == KvTierSpec(0.5, str(tmp_path), 2.0, DEFAULT_REMOTE, True, "nats://n:1")
    assert spec(*s.argv()).kv_tiers == s.kv_tiers
    assert spec("--kv-remote", "nats").kv_tiers.remote == "nats"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--kv-remote", "memcached://x"], "--kv-remote: must be 'nats' or redis://HOST:PORT"),
        (["--kv-host-gib", "-1"], "--kv-host-gib: must be in [0, inf)"),
        (["--kv-disk-gib", "0"], "--kv-disk-gib: must be in (0, inf)"),
    ],
)
def test_bad_values_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["serve", *argv])
    assert exited.value.code == 2 and message in capsys.readouterr().err


def test_the_real_engine_gets_the_tiers_it_was_given(tiny_model_dir, tmp_path):
    built = engines.build_engine(
        spec(
            "--model",
            str(tiny_model_dir),
            "--dtype",
            "fp32",
            "--kv-host-gib",
            "0.01",
            "--kv-disk-dir",
            str(tmp_path),
        )
    )
    try:
        stats = built.kv_tiers.stats()
        assert set(stats) == {"host", "disk"} and stats["host"]["capacity_blocks"] > 0
        registry = CollectorRegistry()
        registry.register(TierCollector(built.kv_tiers.stats))
        text = generate_latest(registry).decode()
        assert 'tokenmill_kv_tier_capacity_blocks{tier="disk"}' in text
        assert 'tokenmill_kv_tier_onboarded_bytes_total{tier="host"} 0.0' in text
    finally:
        built.engine.shutdown()
    off = engines.build_engine(
        spec("--model", str(tiny_model_dir), "--dtype", "fp32", "--kv-host-gib", "0")
    )
    assert off.kv_tiers is None
    off.engine.shutdown()
