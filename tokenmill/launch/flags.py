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
    DisaggSpec,
    EngineSettings,
    EngineSpec,
    HttpSpec,
    RuntimeSpec,
    WorkerSpec,
)
from tokenmill.launch.supervision import RestartPolicy
from tokenmill.router.router import ROUTER_MODES

__all__ = ["KEEP_ALIVE_S"]  # re-exported: the HTTP flags' keep-alive default
ENGINE_KINDS = ("real", "mocker", "echo", "vllm")  # == engines.ENGINES (a test checks)
KV_ROUTER_MODES = tuple(m for m in ROUTER_MODES if m != "round-robin")
DEFAULT_KV_REMOTE = "redis://127.0.0.1:6379"  # == engine.kv_tiers.DEFAULT_REMOTE (a test checks)

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
    add_kv_tiers(p)


def _kv_remote(text: str) -> str:
    if text == "nats" or text.startswith("redis://"):
        return text
    raise argparse.ArgumentTypeError(f"must be 'nats' or redis://HOST:PORT, got {text!r}")


def add_kv_tiers(p: Parser) -> None:
    """The lower KV tiers of the real engine (docs/kv_tiers.md): host memory on by default,
    disk and a shared remote store off until named."""
    g = p.add_argument_group("KV tiers")
    g.add_argument(
        "--kv-host-gib",
        type=NON_NEGATIVE,
        default=None,
        help="host-memory KV tier in GiB (default: a quarter of the free memory; 0: off)",
    )
    g.add_argument("--kv-disk-dir", default=None, help="directory of a local-disk KV tier")
    g.add_argument(
        "--kv-disk-gib", type=POSITIVE, default=10.0, help="size of the disk tier in GiB (10)"
    )
    g.add_argument(
        "--kv-remote",
        type=_kv_remote,
        nargs="?",
        const=DEFAULT_KV_REMOTE,
        default=None,
        help="shared KV tier: 'nats' (the deployment's JetStream object store) or "
        f"redis://HOST:PORT; alone: {DEFAULT_KV_REMOTE} (Redis measured faster)",
    )
    g.add_argument(
        "--kv-write-through",
        action="store_true",
        help="a block leaving the device is written to every lower tier at once "
        "(default: write-back, each tier passes it on when it evicts it)",
    )


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


def add_kv_transfer(p: Parser) -> None:
    """How long KV blocks may wait for a transfer (prefill/decode roles)."""
    p.add_argument(
        "--kv-transfer-timeout-s",
        type=POSITIVE,
        default=EngineSpec.kv_transfer_timeout_s,
        help="seconds a prefill worker holds a finished request's KV blocks for its decode "
        "worker's READ (freed at once on abort), and a READ's deadline",
    )


def add_worker_role(p: Parser) -> None:
    """``worker --role``: aggregated, or one side of disaggregated prefill/decode."""
    p.add_argument(
        "--role",
        choices=("both", "prefill", "decode"),
        default=EngineSpec.role,
        help="both: prefill and decode (aggregated); prefill / decode: one side of a P/D "
        "split, KV blocks moved by NIXL",
    )
    add_kv_transfer(p)


def add_disagg(p: Parser, fleet: bool = True) -> None:
    """Conditional disaggregation in the frontend (``router.disagg``); with ``fleet``, the
    prefill and decode worker processes of ``serve``."""
    d = DisaggSpec
    if fleet:
        p.add_argument(
            "--prefill-workers",
            type=NON_NEGATIVE_INT,
            default=0,
            help="P prefill worker processes over NATS (with --decode-workers)",
        )
        p.add_argument(
            "--decode-workers",
            type=NON_NEGATIVE_INT,
            default=0,
            help="D decode worker processes over NATS (with --prefill-workers)",
        )
        add_kv_transfer(p)
    p.add_argument(
        "--disagg",
        choices=("auto", "always", "never"),
        default=d.mode,
        help="prefill remotely: auto (when the prompt left after the decode worker's "
        "prefix hit is long and the prefill pool is not saturated), always, never",
    )
    p.add_argument(
        "--disagg-min-remote-tokens",
        type=NON_NEGATIVE_INT,
        default=d.min_remote_prefill_tokens,
        help="auto: prefill remotely only above this many uncached prompt tokens",
    )
    p.add_argument(
        "--disagg-max-prefill-queue",
        type=NON_NEGATIVE_INT,
        default=d.max_prefill_queue_tokens,
        help="auto: the prefill pool is saturated when its least-loaded worker waits on "
        "more prefill tokens than this",
    )


def add_worker(p: Parser) -> None:
    """One worker process's identity and shutdown."""
    d = WorkerSpec
    p.add_argument("--instance-id", default=d.instance_id, help="default: a random id")
    p.add_argument(
        "--drain-timeout", type=NON_NEGATIVE, default=d.drain_timeout_s, help="seconds, on SIGTERM"
    )
    add_event_loop(p, d.event_loop)


def add_replay_disagg(p: Parser) -> None:
    """``replay``'s P/D split, KV transfer model and SLOs (``tokenmill.sim``)."""
    from tokenmill.router.disagg import DisaggConfig, DisaggMode
    from tokenmill.sim.transfer import TRANSFER_LINKS, TRANSFER_TOKENS, TransferConfig

    d, t = DisaggConfig(), TransferConfig()
    g = p.add_argument_group("P/D split (replay)")
    g.add_argument(
        "--prefill-workers",
        type=NON_NEGATIVE_INT,
        default=0,
        help="a P/D split: prefill workers (with --decode-workers; --workers is ignored)",
    )
    g.add_argument("--decode-workers", type=NON_NEGATIVE_INT, default=0)
    g.add_argument(
        "--disagg",
        choices=[m.value for m in DisaggMode],
        default=d.mode.value,
        help="where a split prefills: auto (long prompts remotely unless the prefill pool "
        "is saturated), always (remotely), never (on the decode worker)",
    )
    g.add_argument(
        "--disagg-control",
        choices=("tokenmill", "dynamo"),
        default="tokenmill",
        help="dynamo: reproduce Dynamo 1.6's disaggregated replay (every request prefills "
        "remotely, decode worker picked by load at the hand-off, TTFT at its first token)",
    )
    g.add_argument(
        "--min-remote-prefill-tokens", type=NON_NEGATIVE_INT, default=d.min_remote_prefill_tokens
    )
    g.add_argument(
        "--max-prefill-queue-tokens", type=NON_NEGATIVE_INT, default=d.max_prefill_queue_tokens
    )
    g.add_argument(
        "--kv-transfer-bandwidth",
        type=NON_NEGATIVE,
        default=None,
        help="decimal GB/s of a prefill-to-decode KV transfer (unset or 0: transfers take 0 "
        "ms, Dynamo's replay default)",
    )
    g.add_argument("--kv-transfer-latency-ms", type=NON_NEGATIVE, default=t.latency_ms)
    g.add_argument(
        "--kv-bytes-per-token",
        type=POSITIVE_INT,
        default=t.bytes_per_token,
        help="KV bytes per token (default Llama-3-8B bf16, 131072)",
    )
    g.add_argument(
        "--kv-model-shape",
        default=None,
        metavar="LAYERS,KV_HEADS,HEAD_DIM,DTYPE",
        help="bytes per token from a model shape instead, e.g. 24,32,64,bfloat16",
    )
    g.add_argument("--kv-transfer-tokens", choices=TRANSFER_TOKENS, default=t.tokens)
    g.add_argument("--kv-transfer-link", choices=TRANSFER_LINKS, default=t.link)


def add_planner(p: Parser, replay: bool = False) -> None:
    """The planner (``--planner``): targets, pool limits, forecasts; ``replay`` adds the
    simulated cluster's start-up time and the ``dynamo`` control mode."""
    from tokenmill.launch.specs import PlannerSpec

    d = PlannerSpec
    g = p.add_argument_group("planner")
    modes = ("sla", "load", "dynamo") if replay else ("sla", "load")
    g.add_argument("--planner", choices=modes, default=None, help="resize the worker pool")
    g.add_argument("--slo-ttft-ms", type=POSITIVE, default=d.slo_ttft_ms)
    g.add_argument("--slo-itl-ms", type=POSITIVE, default=d.slo_itl_ms)
    g.add_argument("--min-workers", type=POSITIVE_INT, default=d.min_workers)
    g.add_argument("--max-workers", type=POSITIVE_INT, default=d.max_workers)
    g.add_argument("--total-budget", type=POSITIVE_INT, default=None, help="workers, all pools")
    g.add_argument(
        "--planner-interval-s",
        type=POSITIVE,
        default=None,
        help="seconds between decisions (default: 10; dynamo 5, with its 180 s throughput step)",
    )
    g.add_argument("--predictor", choices=d.PREDICTORS, default=d.predictor)
    g.add_argument(
        "--planner-profile",
        default=None,
        metavar="PATH",
        help="timing profile (tokenmill profile) for --planner sla/dynamo; default: the "
        "mocker's, measured at start",
    )
    g.add_argument("--planner-log", default=None, metavar="PATH", help="decisions as JSON lines")
    g.add_argument(
        "--drain-deadline-s",
        type=NON_NEGATIVE,
        default=d.drain_deadline_s,
        help="a removed worker's in-flight requests migrate after this",
    )
    if replay:
        g.add_argument(
            "--worker-startup-s",
            type=NON_NEGATIVE,
            default=d.startup_s,
            help="seconds from asking for a worker to its first request",
        )
        g.add_argument("--timeline-plot", default=None, metavar="PNG", help="replica timeline")
