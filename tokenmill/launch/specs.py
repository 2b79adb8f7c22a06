"""Typed, frozen specs built once from the parsed flags (``flags.py``), at the border: the
``cmd_*`` modules call ``*.from_args(args)`` and hand the specs on; the assembly modules
(``engines``, ``stacks``, ``servers``, ``processes``, ...) see specs, never a ``Namespace``.

Engine settings resolve per engine kind: a flag left unset takes that kind's default
(``ENGINE_DEFAULTS``). The mocker's defaults are ``tokenmill replay``'s (Dynamo's replay
anchor), so a live mocker fleet and an offline replay simulate the same engine.
"""

from __future__ import annotations

import dataclasses
import shlex
from argparse import Namespace
from dataclasses import dataclass
from typing import Any

from tokenmill.launch.supervision import RestartPolicy


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
# vLLM's CPU attention takes blocks in multiples of 32; prefix caching needs no watermark
VLLM_DEFAULTS = EngineSettings(32, None, 2_048, 256, 0.0)
ENGINE_DEFAULTS = {
    "mocker": MOCKER_DEFAULTS,
    "real": REAL_DEFAULTS,
    "echo": REAL_DEFAULTS,
    "vllm": VLLM_DEFAULTS,
}
SETTING_FLAGS = tuple(f.name for f in dataclasses.fields(EngineSettings))


def _settings(args: Namespace, defaults: EngineSettings) -> EngineSettings:
    """``defaults`` overridden by the setting flags given (None: not given)."""
    given = {k: v for k in SETTING_FLAGS if (v := getattr(args, k, None)) is not None}
    return dataclasses.replace(defaults, **given)


@dataclass(frozen=True)
class KvTierSpec:
    """The lower KV tiers of a real engine (docs/kv_tiers.md). ``host_gib`` None: a quarter
    of the free memory; 0: no host tier. ``disk_dir`` None: no disk tier. ``remote``: None,
    ``"nats"`` (the deployment's NATS at ``nats_url``) or ``redis://HOST:PORT``."""

    host_gib: float | None = None
    disk_dir: str | None = None
    disk_gib: float = 10.0
    remote: str | None = None
    write_through: bool = False
    # resolved from --nats where the command has it; a property of the process, not the engine
    nats_url: str | None = dataclasses.field(default=None, compare=False)

    @classmethod
    def from_args(cls, args: Namespace) -> KvTierSpec:
        return cls(
            host_gib=args.kv_host_gib,
            disk_dir=args.kv_disk_dir,
            disk_gib=args.kv_disk_gib,
            remote=args.kv_remote,
            write_through=args.kv_write_through,
            nats_url=getattr(args, "nats", None),
        )

    def argv(self) -> list[str]:
        argv = ["--kv-disk-gib", str(self.disk_gib)]
        if self.host_gib is not None:
            argv += ["--kv-host-gib", str(self.host_gib)]
        if self.disk_dir is not None:
            argv += ["--kv-disk-dir", self.disk_dir]
        if self.remote is not None:
            argv += ["--kv-remote", self.remote]
        return argv + (["--kv-write-through"] if self.write_through else [])


@dataclass(frozen=True)
class EngineSpec:
    """What engine a process runs (``engines.build_engine`` builds it)."""

    kind: str = "real"  # a name in engines.ENGINES
    model: str | None = None  # HF directory or GGUF file; None: the default model
    served_model_name: str | None = None
    context_length: int | None = None  # None: the model's (the mocker's at least 131,072)
    dtype: str = "auto"
    device: str = "auto"
    settings: EngineSettings = REAL_DEFAULTS
    mocker_speedup: float = 1.0
    echo_delay_s: float = 0.0
    stream_interval_ms: float = 1.0  # AsyncEngine.output_interval_s, in ms
    role: str = "both"  # prefill / decode: the engine gets the NIXL KV connector
    kv_transfer_timeout_s: float = 30.0  # held blocks' lease; a READ's deadline
    kv_tiers: KvTierSpec = KvTierSpec()
    vllm_args: tuple[str, ...] = ()  # ``--vllm-args``: vLLM engine flags (engine ``vllm``)

    @classmethod
    def from_args(cls, args: Namespace) -> EngineSpec:
        return cls(
            kind=args.engine,
            model=args.model,
            served_model_name=args.served_model_name,
            context_length=args.context_length,
            dtype=args.dtype,
            device=args.device,
            settings=_settings(args, ENGINE_DEFAULTS[args.engine]),
            mocker_speedup=args.mocker_speedup,
            echo_delay_s=args.echo_delay,
            stream_interval_ms=args.stream_interval_ms,
            role=getattr(args, "role", "both"),
            kv_transfer_timeout_s=getattr(args, "kv_transfer_timeout_s", 30.0),
            kv_tiers=KvTierSpec.from_args(args),
            vllm_args=tuple(shlex.split(getattr(args, "vllm_args", None) or "")),
        )

    @property
    def stream_interval_s(self) -> float:
        return self.stream_interval_ms / 1000.0

    def argv(self) -> list[str]:
        """The ``worker`` flags that rebuild this spec in a child process. Settings equal to
        the kind's defaults are left out, so the child resolves them the same way."""
        argv = [
            "--engine",
            self.kind,
            "--dtype",
            self.dtype,
            "--device",
            self.device,
            "--mocker-speedup",
            str(self.mocker_speedup),
            "--echo-delay",
            str(self.echo_delay_s),
            "--stream-interval-ms",
            str(self.stream_interval_ms),
            "--role",
            self.role,
            "--kv-transfer-timeout-s",
            str(self.kv_transfer_timeout_s),
        ]
        optional = (
            ("--model", self.model),
            ("--served-model-name", self.served_model_name),
            ("--context-length", self.context_length),
        )
        argv += [str(x) for flag, value in optional if value is not None for x in (flag, value)]
        argv += self.kv_tiers.argv()
        if self.vllm_args:
            argv += ["--vllm-args", shlex.join(self.vllm_args)]
        defaults = ENGINE_DEFAULTS[self.kind]
        for name in SETTING_FLAGS:
            value = getattr(self.settings, name)
            if value is not None and value != getattr(defaults, name):
                argv += ["--" + name.replace("_", "-"), str(value)]
        return argv


# Longer than the idle timeout of common client pools (aiohttp 15 s, httpx 5 s, load
# balancers 60 s): the client closes an idle connection first. With uvicorn's 5 s a client
# could reuse a connection the server was closing, and that request failed
# (``connection_dropped`` in tokenmill bench serve).
KEEP_ALIVE_S = 65.0


@dataclass(frozen=True)
class HttpSpec:
    """The uvicorn server of ``serve`` / ``frontend``. The defaults are the flags' defaults
    (``flags.add_http`` reads them from here)."""

    host: str = "127.0.0.1"
    port: int = 8000
    event_loop: str = "asyncio"
    timeout_keep_alive_s: float = KEEP_ALIVE_S
    shutdown_timeout_s: float = 30.0  # in-flight streams' drain time on SIGTERM
    header_timeout_s: float = 30.0  # a request's headers, from its first byte; 408 after

    @classmethod
    def from_args(cls, args: Namespace) -> HttpSpec:
        return cls(
            args.host,
            args.port,
            args.event_loop,
            args.timeout_keep_alive,
            args.shutdown_timeout,
            args.header_timeout,
        )


WORKER_COMPONENT = "backend"  # the discovery component of worker endpoints


@dataclass(frozen=True)
class RuntimeSpec:
    """How a process joins a deployment over NATS (defaults: ``flags.add_runtime``'s)."""

    nats_url: str
    namespace: str = "tokenmill"
    listen_host: str = "127.0.0.1"  # TCP request plane bind address
    advertise_host: str | None = None  # the address others dial (multi-host)
    plane_token: str = ""
    request_plane: str = "tcp"  # or "nats"

    @classmethod
    def from_args(cls, args: Namespace) -> RuntimeSpec:
        return cls(
            args.nats,
            args.namespace,
            args.listen_host,
            args.advertise_host,
            args.plane_token,
            args.request_plane,
        )

    def config(self) -> Any:
        """The ``NatsRuntimeConfig`` of this spec."""
        from tokenmill.runtime.nats_runtime import NatsRuntimeConfig

        return NatsRuntimeConfig(
            request_plane=self.request_plane,
            host=self.listen_host,
            advertise_host=self.advertise_host,
            token=self.plane_token,
        )


@dataclass(frozen=True)
class RouterSpec:
    """How requests pick a worker. ``remote``: ask standalone router replicas; ``block_size``
    None: the workers' (from their model cards, or the engine's)."""

    mode: str = "round-robin"
    remote: bool = False
    block_size: int | None = None

    @classmethod
    def from_args(cls, args: Namespace) -> RouterSpec:
        return cls(args.router_mode, getattr(args, "remote_router", False))


@dataclass(frozen=True)
class WorkerSpec:
    """One worker process: identity, drain time on SIGTERM, event loop (defaults:
    ``flags.add_worker``'s)."""

    instance_id: str | None = None
    drain_timeout_s: float = 30.0
    event_loop: str = "uvloop"

    @classmethod
    def from_args(cls, args: Namespace) -> WorkerSpec:
        return cls(args.instance_id, args.drain_timeout, args.event_loop)


@dataclass(frozen=True)
class FleetSpec:
    """``serve --workers N [--prefill-workers P --decode-workers D]``: N aggregated, P
    prefill and D decode worker processes over NATS (an embedded server unless ``nats_url``),
    each with ``worker``'s settings."""

    num_workers: int
    nats_url: str | None = None
    worker: WorkerSpec = WorkerSpec()
    restarts: RestartPolicy = RestartPolicy()
    num_prefill_workers: int = 0
    num_decode_workers: int = 0

    @classmethod
    def from_args(cls, args: Namespace) -> FleetSpec:
        worker = WorkerSpec(None, args.shutdown_timeout, args.worker_event_loop)
        restarts = RestartPolicy(args.worker_restarts, args.restart_window)
        return cls(
            args.workers,
            args.nats,
            worker,
            restarts,
            getattr(args, "prefill_workers", 0),
            getattr(args, "decode_workers", 0),
        )

    @property
    def roles(self) -> list[str]:
        """One role per worker process, in spawn order."""
        return (
            ["both"] * self.num_workers
            + ["prefill"] * self.num_prefill_workers
            + ["decode"] * self.num_decode_workers
        )


@dataclass(frozen=True)
class DisaggSpec:
    """The frontend's conditional disaggregation (``router.disagg``); the defaults are the
    flags' (``flags.add_disagg``)."""

    mode: str = "auto"
    min_remote_prefill_tokens: int = 512
    max_prefill_queue_tokens: int = 16_384

    @classmethod
    def from_args(cls, args: Namespace) -> DisaggSpec:
        return cls(args.disagg, args.disagg_min_remote_tokens, args.disagg_max_prefill_queue)

    def config(self) -> Any:
        from tokenmill.router.disagg import DisaggConfig, DisaggMode

        return DisaggConfig(
            DisaggMode(self.mode), self.min_remote_prefill_tokens, self.max_prefill_queue_tokens
        )


def frontend_config(args: Namespace) -> Any:
    """The ``frontend.app.FrontendConfig`` of the frontend flags (``flags.add_frontend``)."""
    from tokenmill.core.errors import TokenmillError
    from tokenmill.frontend.app import FrontendConfig

    if args.protect_metrics and args.api_key is None:
        raise TokenmillError("--protect-metrics needs --api-key")
    return FrontendConfig(
        api_key=args.api_key,
        protect_metrics=args.protect_metrics,
        max_tokens_default=args.max_tokens_default,
        max_body_bytes=args.max_body_bytes,
        body_timeout_s=args.body_timeout,
        request_timeout_s=args.request_timeout,
        migration_limit=args.migration_limit,
        allow_pinning=args.allow_pinning,
        request_log=args.request_log,
    )


@dataclass(frozen=True)
class PlannerSpec:
    """``--planner`` and its settings (defaults: ``flags.add_planner``'s). ``mode`` None: no
    planner (a static pool)."""

    PREDICTORS = ("constant", "moving-average", "kalman", "arima")

    mode: str | None = None
    slo_ttft_ms: float = 2_000.0
    slo_itl_ms: float = 25.0
    min_workers: int = 1
    max_workers: int = 8
    total_budget: int | None = None
    interval_s: float | None = None
    predictor: str = "kalman"
    profile: str | None = None
    log: str | None = None
    drain_deadline_s: float = 60.0
    startup_s: float = 30.0

    @classmethod
    def from_args(cls, args: Namespace) -> PlannerSpec:
        from tokenmill.core.errors import TokenmillError

        if args.min_workers > args.max_workers:
            raise TokenmillError("--min-workers must not exceed --max-workers")
        return cls(
            args.planner,
            args.slo_ttft_ms,
            args.slo_itl_ms,
            args.min_workers,
            args.max_workers,
            args.total_budget,
            args.planner_interval_s,
            args.predictor,
            args.planner_profile,
            args.planner_log,
            args.drain_deadline_s,
            getattr(args, "worker_startup_s", cls.startup_s),
        )

    def planner_config(self, pools: tuple[str, ...] = ("both",)) -> Any:
        """The ``planner.PlannerConfig`` of this spec (every pool gets the min/max)."""
        from tokenmill.planner.dynamo import DynamoConfig
        from tokenmill.planner.observation import PoolLimits
        from tokenmill.planner.planner import PlannerConfig
        from tokenmill.planner.policies import SlaConfig, Targets

        assert self.mode is not None
        interval = self.interval_s or (5.0 if self.mode == "dynamo" else 10.0)
        limits = {p: PoolLimits(self.min_workers, self.max_workers) for p in pools}
        return PlannerConfig(
            mode=self.mode,
            interval_s=interval,
            targets=Targets(self.slo_ttft_ms, self.slo_itl_ms),
            limits=limits,
            total_budget=self.total_budget,
            startup_s=self.startup_s,
            sla=SlaConfig(predictor=self.predictor),
            dynamo=DynamoConfig(predictor=self.predictor),
        )
