"""The engine settings flags of ``serve`` / ``worker``: per-engine defaults (the mocker's are
``tokenmill replay``'s), and that given values reach the engine's scheduler and pool, the
spawned workers' command lines, the model card and the in-process KV router."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.tiny_models import make_tiny_hf_model

from tokenmill.launch import cmd_frontend, cmd_replay, cmd_serve
from tokenmill.launch.cli import build_parser
from tokenmill.launch.engine_args import MOCKER_DEFAULTS, EngineSettings
from tokenmill.launch.model_card import ModelCard

FLAGS = ["--block-size", "32", "--num-blocks", "500", "--max-num-batched-tokens", "1024",
         "--max-num-seqs", "7", "--watermark", "0.05"]  # fmt: skip
GIVEN = EngineSettings(32, 500, 1024, 7, 0.05)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_hf_model(tmp_path_factory.mktemp("model"), "llama3")


def _mocker_settings(argv: list[str]) -> EngineSettings:
    """What the mocker engine built from ``argv`` runs with (read back from the engine)."""
    args = build_parser().parse_args(argv)
    engine, *_ = cmd_serve._mocker_engine(args)
    try:
        sched = engine.core.scheduler
        cfg, executor = sched.config, engine.core.executor
        assert (executor.block_size, executor.num_blocks) == (sched.block_size, sched.kv.num_blocks)
        return EngineSettings(sched.block_size, sched.kv.num_blocks, cfg.max_num_batched_tokens,
                              cfg.max_num_seqs, cfg.watermark)  # fmt: skip
    finally:
        engine.shutdown()


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_mocker_defaults_are_the_replay_defaults_and_flags_reach_the_engine(model_dir, command):
    base = [command, "--engine", "mocker", "--model", str(model_dir)]
    if command == "worker":
        base += ["--nats", "nats://127.0.0.1:1"]
    assert _mocker_settings(base) == MOCKER_DEFAULTS
    assert _mocker_settings(base + FLAGS) == GIVEN
    replay = cmd_replay.build_config(build_parser().parse_args(["replay", "--trace", "t"]))
    assert MOCKER_DEFAULTS == EngineSettings(replay.block_size, replay.num_blocks,
                                             replay.max_num_batched_tokens, replay.max_num_seqs,
                                             replay.watermark)  # fmt: skip


def test_serve_workers_forward_only_the_flags_given(monkeypatch):
    spawned: list[list[str]] = []
    monkeypatch.setattr(cmd_frontend.subprocess, "Popen", lambda argv, **kw: spawned.append(argv))
    for flags in ([], FLAGS):
        args = build_parser().parse_args(["serve", "--engine", "mocker", "--workers", "2", *flags])
        cmd_frontend.spawn_worker(args, "nats://127.0.0.1:1", 0)
    plain, given = (argv[argv.index("worker") :] for argv in spawned)
    assert not any(flag in plain for flag in FLAGS[::2])  # the worker resolves its defaults
    worker = build_parser().parse_args(given)
    assert [worker.block_size, worker.num_blocks, worker.max_num_batched_tokens,
            worker.max_num_seqs, worker.watermark] == [32, 500, 1024, 7, 0.05]  # fmt: skip


@pytest.mark.parametrize(("flags", "block_size"), [([], 64), (FLAGS, 32)])
async def test_model_card_and_router_get_the_block_size(model_dir, flags, block_size):
    from tokenmill.launch.cmd_worker import start_worker
    from tokenmill.runtime.inprocess import InProcessRuntime

    class BlobRuntime(InProcessRuntime):
        async def put_blob(self, name: str, data: bytes) -> None:
            pass

    argv = [
        "worker",
        "--nats",
        "nats://127.0.0.1:1",
        "--engine",
        "mocker",
        "--model",
        str(model_dir),
    ]
    args = build_parser().parse_args(argv + flags)
    engine, tokenizer, context, name = cmd_serve._mocker_engine(args)
    runtime = BlobRuntime()
    worker = await start_worker(args, runtime, engine, tokenizer, context, name)
    try:
        card = ModelCard.from_metadata(worker.info.metadata)
        assert (card.block_size, card.kv_blocks) == (
            block_size,
            engine.core.scheduler.kv.num_blocks,
        )
    finally:
        await worker.stop(drain_timeout_s=0.0)
        await runtime.shutdown()
        engine.shutdown()
    serve = build_parser().parse_args(
        ["serve", "--engine", "mocker", "--router-mode", "kv", *flags]
    )
    assert cmd_serve._route_policy(serve).router.config.block_size == block_size


def test_standalone_router_hashes_with_the_card_block_size():
    from tokenmill.launch.cmd_router import card_block_size
    from tokenmill.runtime.wire import InstanceInfo

    card = ModelCard(model="m", context_length=1, block_size=64, kv_blocks=1, tokenizer="t")
    bare = InstanceInfo(namespace="n", component="c", endpoint="e", instance_id="a")
    carded = InstanceInfo(namespace="n", component="c", endpoint="e", instance_id="b",
                          metadata=card.metadata())  # fmt: skip
    assert card_block_size([bare, carded]) == 64
    assert card_block_size([bare]) == 16  # no card: the real engine's default


def test_stream_interval_reaches_the_engine_and_the_spawned_workers(model_dir, monkeypatch):
    base = ["serve", "--engine", "mocker", "--model", str(model_dir)]
    for flags, interval_s in (([], 0.001), (["--stream-interval-ms", "0"], 0.0)):
        engine, *_ = cmd_serve._mocker_engine(build_parser().parse_args(base + flags))
        engine.shutdown()
        assert engine.output_interval_s == interval_s
    spawned: list[list[str]] = []
    monkeypatch.setattr(cmd_frontend.subprocess, "Popen", lambda argv, **kw: spawned.append(argv))
    args = build_parser().parse_args(base + ["--workers", "2", "--stream-interval-ms", "2.5"])
    cmd_frontend.spawn_worker(args, "nats://127.0.0.1:1", 0)
    worker = build_parser().parse_args(spawned[0][spawned[0].index("worker") :])
    assert worker.stream_interval_ms == 2.5
