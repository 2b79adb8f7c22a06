"""Every flag the serving commands share, defined once with its default, in one group per
concern. A ``cmd_*`` module adds the groups it needs; ``specs.py`` turns the parsed flags into
typed, frozen specs at the border, so nothing past it (and nothing outside ``launch/``) sees an
``argparse.Namespace``.

The engine settings flags (``--block-size`` ... ``--watermark``) default to None for ``serve``
and ``worker``, meaning "this engine's default" (``specs.ENGINE_DEFAULTS``); ``replay`` passes
the mocker's defaults, so a live mocker fleet and a replay simulate the same engine.
"""

from __future__ import annotations

import argparse

from tokenmill.launch.event_loop import EVENT_LOOPS
from tokenmill.launch.specs import (
    KEEP_ALIVE_S,
    MOCKER_DEFAULTS,
    REAL_DEFAULTS,
    EngineSettings,
    HttpSpec,
    RuntimeSpec,
    WorkerSpec,
)
from tokenmill.launch.supervision import RestartPolicy
from tokenmill.router.router import ROUTER_MODES

__all__ = ["KEEP_ALIVE_S"]  # re-exported: the HTTP flags' keep-alive default
ENGINE_KINDS = ("real", "mocker", "echo", "vllm")  # == engines.ENGINES (a test checks)
KV_ROUTER_MODES = tuple(m for m in ROUTER_MODES if m != "round-robin")

Parser = argparse.ArgumentParser


def bounded(
    kind: type,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
):
    """An argparse type: ``kind(text)`` within the interval from ``low`` to ``high`` (closed
    unless ``*_open``; None: unbounded). Outside it argparse exits 2 with "argument --X: must
    be in ...", no traceback."""
    interval = ("(" if low_open else "[") + ("-inf" if low is None else f"{low:g}") + ", "
    interval += ("inf" if high is None else f"{high:g}") + (
        ")" if high_open or high is None else "]"
    )

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from None
        below = low is not None and (value <= low if low_open else value < low)
        above = high is not None and (value >= high if high_open else value > high)
        if below or above:
            raise argparse.ArgumentTypeError(f"must be in {interval}, got {text}")
        return value

    return parse


POSITIVE_INT = bounded(int, 1)
NON_NEGATIVE_INT = bounded(int, 0)
NON_NEGATIVE = bounded(float, 0.0)
POSITIVE = bounded(float, 0.0, low_open=True)
PORT = bounded(int, 1, 65535)
FRACTION = bounded(float, 0.0, 1.0, high_open=True)  # [0, 1)


def add_event_loop(p: Parser, default: str) -> None:
    p.add_argument(
        "--event-loop",
        choices=EVENT_LOOPS,
        default=default,
        help=f"the asyncio event loop implementation (default {default})",
    )


def add_model(p: Parser) -> None:
    p.add_argument(
        "--model", default=None, help="HF model directory or GGUF file (default: SmolLM2)"
    )
    p.add_argument("--served-model-name", default=None, help="the model name clients use")
    p.add_argument("--context-length", type=POSITIVE_INT, default=None, help="override the model's")


def add_engine(p: Parser) -> None:
    """The engine of ``serve`` / ``worker``: kind, model, device, pacing and KV settings."""
    p.add_argument(
        "--engine",
        choices=ENGINE_KINDS,
        default="real",
        help="real model, simulated (mocker), zero-cost echo, or vLLM (tokenmill[vllm])",
    )
    add_model(p)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--mocker-speedup", type=POSITIVE, default=1.0, help="mocker time compression")
    p.add_argument("--echo-delay", type=NON_NEGATIVE, default=0.0, help="echo engine s per step")
    p.add_argument(
        "--stream-interval-ms",
        type=NON_NEGATIVE,
        default=1.0,
        help="after an output is sent, how long later outputs of the engine may "
        "wait to be sent together (0: every step's outputs at once)",
    )
    p.add_argument(
        "--vllm-args",
        default=None,
        metavar="ARGS",
        help="with --engine vllm: more vLLM engine flags, one string, e.g. "
        '"--enforce-eager --swap-space 1" (tokenmill\'s own flags set the rest)',
    )
    add_engine_settings(p)


def add_engine_settings(p: Parser, defaults: EngineSettings | None = None) -> None:
    """KV pool and step limits. ``defaults`` None: each engine's own (the flags default to
    None); else these values (``replay``: ``MOCKER_DEFAULTS``)."""

    def d(name: str) -> int | float | None:
        return None if defaults is None else getattr(defaults, name)

    m, r = MOCKER_DEFAULTS, REAL_DEFAULTS
    p.add_argument(
        "--block-size",
        type=POSITIVE_INT,
        default=d("block_size"),
        help=f"tokens per KV block (mocker {m.block_size}, real {r.block_size})",
    )
    p.add_argument(
        "--num-blocks",
        type=POSITIVE_INT,
        default=d("num_blocks"),
        help=f"KV blocks per worker (mocker {m.num_blocks}, real: from memory)",
    )
    p.add_argument(
        "--max-num-batched-tokens",
        type=POSITIVE_INT,
        default=d("max_num_batched_tokens"),
        help=f"tokens per step (mocker {m.max_num_batched_tokens}, real {r.max_num_batched_tokens})",
    )
    p.add_argument(
        "--max-num-seqs",
        type=POSITIVE_INT,
        default=d("max_num_seqs"),
        help=f"running requests per step ({m.max_num_seqs})",
    )
    p.add_argument(
        "--watermark",
        type=FRACTION,
        default=d("watermark"),
        help=f"pool fraction kept free at admission (mocker {m.watermark}, real {r.watermark:g})",
    )


def add_http(p: Parser) -> None:
    """The HTTP server of ``serve`` / ``frontend``."""
    d = HttpSpec
    p.add_argument("--host", default=d.host)
    p.add_argument("--port", type=PORT, default=d.port)
    add_event_loop(p, d.event_loop)
    p.add_argument(
        "--timeout-keep-alive",
        type=POSITIVE,
        default=d.timeout_keep_alive_s,
        help="seconds an idle HTTP connection stays open",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=NON_NEGATIVE,
        default=d.shutdown_timeout_s,
        help="drain time on exit",
    )
    p.add_argument(
        "--header-timeout",
        type=POSITIVE,
        default=d.header_timeout_s,
        help="seconds to receive a request's headers (from the connection or the "
        "request's first byte); 408 and close after",
    )


def add_frontend(p: Parser) -> None:
    """The OpenAI frontend's own settings (``frontend.app.FrontendConfig``)."""
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1")
    p.add_argument(
        "--protect-metrics", action="store_true", help="require the --api-key on /metrics too"
    )
    p.add_argument(
        "--max-tokens-default",
        type=POSITIVE_INT,
        default=None,
        metavar="N",
        help="max_tokens of a chat request that sets none (default: the rest of "
        "the context; completions default to 16, as OpenAI's)",
    )
    p.add_argument("--max-body-bytes", type=POSITIVE_INT, default=4 * 1024 * 1024)
    p.add_argument(
        "--body-timeout",
        type=POSITIVE,
        default=60.0,
        help="seconds to receive a request's body once its headers arrived; 408 and close after",
    )
    p.add_argument("--request-timeout", type=POSITIVE, default=600.0, help="seconds; 504 after")
    p.add_argument(
        "--migration-limit", type=NON_NEGATIVE_INT, default=3, help="migrations per request"
    )
    p.add_argument(
        "--allow-pinning",
        action="store_true",
        help="honour a request's router.worker_id (pin to an instance)",
    )
    p.add_argument(
        "--request-log",
        metavar="PATH",
        default=None,
        help="append one JSON line per completion request: its stage times "
        "(body read, routed, first token, first write, end), status, token "
        "counts and workers",
    )


def add_router_mode(
    p: Parser, modes: tuple[str, ...] = ROUTER_MODES, default: str = "round-robin"
) -> None:
    p.add_argument("--router-mode", choices=modes, default=default)


def add_runtime(p: Parser, nats_help: str = "NATS server URL, e.g. nats://10.0.0.1:4222") -> None:
    """The NATS runtime of ``worker`` / ``frontend`` / ``router`` (``--nats`` required)."""
    d = RuntimeSpec
    p.add_argument("--nats", required=True, help=nats_help)
    p.add_argument("--namespace", default=d.namespace)
    p.add_argument("--listen-host", default=d.listen_host, help="TCP request plane bind address")
    p.add_argument(
        "--advertise-host", default=d.advertise_host, help="address others dial (multi-host)"
    )
    p.add_argument(
        "--plane-token", default=d.plane_token, help="shared token of the TCP request plane"
    )
    p.add_argument("--request-plane", choices=("tcp", "nats"), default=d.request_plane)


def add_fleet(p: Parser) -> None:
    """``serve --workers N``: worker processes over NATS instead of one in-process engine."""
    p.add_argument(
        "--workers",
        type=NON_NEGATIVE_INT,
        default=0,
        help="N > 0: N worker processes over NATS (embedded unless --nats)",
    )
    p.add_argument("--nats", default=None, help="with --workers: an existing NATS server URL")
    p.add_argument(
        "--worker-event-loop",
        choices=EVENT_LOOPS,
        default=WorkerSpec.event_loop,
        help="with --workers: the worker processes' event loop",
    )
    p.add_argument(
        "--worker-restarts",
        type=NON_NEGATIVE_INT,
        default=RestartPolicy.max_restarts,
        help="with --workers: restarts of a dead worker (or of the embedded NATS) "
        "within --restart-window before the server gives up and exits 1; 0: dead "
        "workers are not replaced",
    )
    p.add_argument(
        "--restart-window",
        type=POSITIVE,
        default=RestartPolicy.window_s,
        help="seconds over which --worker-restarts counts",
    )


def add_worker(p: Parser) -> None:
    """One worker process's identity and shutdown."""
    d = WorkerSpec
    p.add_argument("--instance-id", default=d.instance_id, help="default: a random id")
    p.add_argument(
        "--drain-timeout", type=NON_NEGATIVE, default=d.drain_timeout_s, help="seconds, on SIGTERM"
    )
    add_event_loop(p, d.event_loop)
