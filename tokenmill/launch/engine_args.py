"""The engine options ``serve`` and ``worker`` share, and the KV/scheduler settings they
resolve to.

``--block-size``, ``--num-blocks``, ``--max-num-batched-tokens``, ``--max-num-seqs`` and
``--watermark`` default to None on the command line, meaning "this engine's default":

- mocker: ``MOCKER_DEFAULTS``, the ``tokenmill replay`` defaults (Dynamo's replay anchor),
  so a live mocker fleet and an offline replay simulate the same engine;
- real: ``REAL_DEFAULTS`` (block size 16, a pool sized from the KV memory budget);
- echo: no KV cache; only the block size is used (the model card advertises it).

``serve --workers N`` forwards only the flags given, so its workers resolve the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class EngineSettings:
    """KV pool and step limits of one engine replica. ``num_blocks`` None: sized from the
    KV memory budget (real engine only)."""

    block_size: int
    num_blocks: int | None
    max_num_batched_tokens: int
    max_num_seqs: int
    watermark: float


MOCKER_DEFAULTS = EngineSettings(64, 16_384, 8_192, 256, 0.01)
REAL_DEFAULTS = EngineSettings(16, None, 2_048, 256, 0.0)
ENGINE_DEFAULTS = {"mocker": MOCKER_DEFAULTS, "real": REAL_DEFAULTS, "echo": REAL_DEFAULTS}
SETTING_FLAGS = tuple(f.name for f in dataclasses.fields(EngineSettings))


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default=None, help="HF model directory or GGUF file (default: SmolLM2)"
    )
    p.add_argument("--served-model-name", default=None, help="the model name clients use")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--context-length", type=int, default=None, help="override the model's")
    p.add_argument("--mocker-speedup", type=float, default=1.0, help="mocker time compression")
    p.add_argument("--echo-delay", type=float, default=0.0, help="echo engine s per step")
    p.add_argument("--stream-interval-ms", type=float, default=1.0,
                   help="after an output is sent, how long later outputs of the engine may "
                   "wait to be sent together (0: every step's outputs at once)")  # fmt: skip
    p.add_argument("--block-size", type=int, default=None,
                   help="tokens per KV block (mocker 64, real 16)")  # fmt: skip
    p.add_argument("--num-blocks", type=int, default=None,
                   help="KV blocks per worker (mocker 16384, real: from memory)")  # fmt: skip
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="tokens per step (mocker 8192, real 2048)")  # fmt: skip
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help="running requests per step (256)")  # fmt: skip
    p.add_argument("--watermark", type=float, default=None,
                   help="pool fraction kept free at admission (mocker 0.01, real 0)")  # fmt: skip


def engine_settings(args: argparse.Namespace, defaults: EngineSettings) -> EngineSettings:
    """``defaults`` overridden by the flags given (a namespace without them: ``defaults``)."""
    given = {k: v for k in SETTING_FLAGS if (v := getattr(args, k, None)) is not None}
    return dataclasses.replace(defaults, **given)


def setting_argv(args: argparse.Namespace) -> list[str]:
    """The setting flags given in ``args``, as command-line arguments (for spawned workers)."""
    argv: list[str] = []
    for name in SETTING_FLAGS:
        value = getattr(args, name, None)
        if value is not None:
            argv += ["--" + name.replace("_", "-"), str(value)]
    return argv
