"""Flags become specs once, at the border: per-engine defaults of the engine settings (the
mocker's are ``tokenmill replay``'s), given values reaching the engine's scheduler and pool,
the spawned workers' command lines, the model card and the in-process KV router."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenmill.launch import cmd_replay, engines, flags, processes
from tokenmill.launch.cli import build_parser
from tokenmill.launch.model_card import ModelCard
from tokenmill.launch.specs import (
    MOCKER_DEFAULTS,
    EngineSettings,
    EngineSpec,
    FleetSpec,
    RouterSpec,
    WorkerSpec,
)
from tokenmill.launch.stacks import local_policy

FLAGS = [
    "--block-size",
    "32",
    "--num-blocks",
    "500",
    "--max-num-batched-tokens",
    "1024",
    "--max-num-seqs",
    "7",
    "--watermark",
    "0.05",
]
GIVEN = EngineSettings(32, 500, 1024, 7, 0.05)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> Path:
    return tiny_model_dir


def _spec(argv: list[str]) -> EngineSpec:
    return EngineSpec.from_args(build_parser().parse_args(argv))


def _engine_settings(spec: EngineSpec) -> EngineSettings:
    """What the engine built from ``spec`` runs with (read back from the engine)."""
    built = engines.build_engine(spec)
    try:
        sched = built.engine.core.scheduler
        cfg, executor = sched.config, built.engine.core.executor
        assert (executor.block_size, executor.num_blocks) == (sched.block_size, sched.kv.num_blocks)
        return EngineSettings(
            sched.block_size,
            sched.kv.num_blocks,
            cfg.max_num_batched_tokens,
            cfg.max_num_seqs,
            cfg.watermark,
        )
    finally:
        built.engine.shutdown()


def test_engine_kinds_are_the_registry():
    assert set(flags.ENGINE_KINDS) == set(engines.ENGINES)
    assert not engines.ENGINES["echo"].publishes_kv_events
    assert engines.ENGINES["mocker"].publishes_kv_events


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_mocker_defaults_are_the_replay_defaults_and_flags_reach_the_engine(model_dir, command):
    base = [command, "--engine", "mocker", "--model", str(model_dir)]
    if command == "worker":
        base += ["--nats", "nats://127.0.0.1:1"]
    assert _spec(base).settings == MOCKER_DEFAULTS
    assert _engine_settings(_spec(base)) == MOCKER_DEFAULTS
    assert _engine_settings(_spec(base + FLAGS)) == GIVEN
    replay = cmd_replay.build_config(build_parser().parse_args(["replay", "--trace", "t"]))
    assert MOCKER_DEFAULTS == EngineSettings(
        replay.block_size,
        replay.num_blocks,
        replay.max_num_batched_tokens,
        replay.max_num_seqs,
        replay.watermark,
    )


def test_real_engine_defaults_leave_the_pool_to_the_memory_budget():
    spec = _spec(["serve", "--model", "m"])
    assert (spec.kind, spec.settings.block_size, spec.settings.num_blocks) == ("real", 16, None)


def _worker_args(spec: EngineSpec, worker: WorkerSpec = WorkerSpec()):
    argv = processes.worker_argv(spec, worker, "nats://127.0.0.1:1")
    return build_parser().parse_args(argv[argv.index("worker") :])


def test_spawned_workers_get_only_the_settings_given():
    plain = processes.worker_argv(_spec(["serve", "--engine", "mocker"]), WorkerSpec(), "n")
    assert not any(flag in plain for flag in FLAGS[::2])  # the worker resolves its defaults
    given = _spec(["serve", "--engine", "mocker", "--workers", "2", *FLAGS])
    worker = _worker_args(given)
    assert EngineSpec.from_args(worker) == given
    assert [
        worker.block_size,
        worker.num_blocks,
        worker.max_num_batched_tokens,
        worker.max_num_seqs,
        worker.watermark,
    ] == [32, 500, 1024, 7, 0.05]


def test_spawned_workers_rebuild_the_whole_engine_spec():
    argv = [
        "serve",
        "--engine",
        "echo",
        "--model",
        "/m",
        "--served-model-name",
        "x",
        "--context-length",
        "99",
        "--dtype",
        "fp32",
        "--device",
        "cpu",
        "--echo-delay",
        "0.5",
        "--mocker-speedup",
        "3",
        "--stream-interval-ms",
        "2.5",
        "--workers",
        "2",
        "--shutdown-timeout",
        "7",
        "--worker-event-loop",
        "asyncio",
    ]
    args = build_parser().parse_args(argv)
    fleet = FleetSpec.from_args(args)
    assert fleet == FleetSpec(2, None, WorkerSpec(None, 7.0, "asyncio"))
    worker = _worker_args(EngineSpec.from_args(args), fleet.worker)
    assert EngineSpec.from_args(worker) == EngineSpec.from_args(args)
    assert WorkerSpec.from_args(worker) == fleet.worker


@pytest.mark.parametrize(("extra", "block_size"), [([], 64), (FLAGS, 32)])
async def test_model_card_and_router_get_the_block_size(model_dir, extra, block_size):
    from tokenmill.launch.worker_service import start_worker
    from tokenmill.runtime.inprocess import InProcessRuntime

    class BlobRuntime(InProcessRuntime):
        async def put_blob(self, name: str, data: bytes) -> None:
            pass

    spec = _spec(["worker", "--nats", "n", "--engine", "mocker", "--model", str(model_dir), *extra])
    built = engines.build_engine(spec)
    runtime = BlobRuntime()
    worker = await start_worker(runtime, built, "tokenmill", WorkerSpec())
    try:
        card = ModelCard.from_metadata(worker.info.metadata)
        assert (card.block_size, card.kv_blocks) == (
            block_size,
            built.engine.core.scheduler.kv.num_blocks,
        )
    finally:
        await worker.stop(drain_timeout_s=0.0)
        await runtime.shutdown()
        built.engine.shutdown()
    assert local_policy(RouterSpec("kv"), built.block_size).router.config.block_size == block_size


def test_standalone_router_hashes_with_the_card_block_size():
    from tokenmill.launch.router_service import card_block_size
    from tokenmill.runtime.wire import InstanceInfo

    card = ModelCard(model="m", context_length=1, block_size=64, kv_blocks=1, tokenizer="t")
    bare = InstanceInfo(namespace="n", component="c", endpoint="e", instance_id="a")
    carded = InstanceInfo(
        namespace="n", component="c", endpoint="e", instance_id="b", metadata=card.metadata()
    )
    assert card_block_size([bare, carded]) == 64
    assert card_block_size([bare]) == 16  # no card: the real engine's default


def test_stream_interval_reaches_the_engine_and_the_spawned_workers(model_dir):
    base = ["serve", "--engine", "mocker", "--model", str(model_dir)]
    for extra, interval_s in (([], 0.001), (["--stream-interval-ms", "0"], 0.0)):
        built = engines.build_engine(_spec(base + extra))
        built.engine.shutdown()
        assert built.engine.output_interval_s == interval_s
    worker = _worker_args(_spec(base + ["--workers", "2", "--stream-interval-ms", "2.5"]))
    assert worker.stream_interval_ms == 2.5


def test_served_model_name_overrides_the_models(model_dir):
    spec = _spec(
        ["serve", "--engine", "echo", "--model", str(model_dir), "--served-model-name", "x"]
    )
    assert engines.build_engine(spec).model_name == "x"
    assert (
        engines.build_engine(
            _spec(["serve", "--engine", "echo", "--model", str(model_dir)])
        ).model_name
        == model_dir.name
    )


def test_router_specs():
    parse = build_parser().parse_args
    assert RouterSpec.from_args(parse(["serve"])) == RouterSpec("round-robin")
    assert RouterSpec.from_args(parse(["frontend", "--nats", "n", "--remote-router"])).remote
    with pytest.raises(SystemExit):
        parse(["router", "--nats", "n", "--router-mode", "round-robin"])


@pytest.mark.parametrize("command", [["serve"], ["frontend", "--nats", "n"]])
def test_frontend_flags_reach_the_frontend_config(command):
    from tokenmill.launch.specs import frontend_config

    parse = build_parser().parse_args
    config = frontend_config(
        parse([*command, "--api-key", "k", "--protect-metrics", "--max-tokens-default", "512"])
    )
    assert (config.api_key, config.protect_metrics, config.max_tokens_default) == ("k", True, 512)
    plain = frontend_config(parse(command))
    assert (plain.protect_metrics, plain.max_tokens_default) == (False, None)


def test_protect_metrics_without_a_key_is_a_cli_error(capsys):
    from tokenmill.launch.cli import main

    assert main(["serve", "--engine", "echo", "--protect-metrics"]) == 2
    assert "tokenmill: error: --protect-metrics needs --api-key" in capsys.readouterr().err
